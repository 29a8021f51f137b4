"""What this CPU offers the runtimes: its model name and the ISA flags that decide bf16 speed.

Read from /proc/cpuinfo (Linux, stdlib only, so the torch-free predictors can ask too); elsewhere
torch's own CPU probe answers the bf16 question. bf16 pays off only with hardware bf16 units
(AVX512_BF16 dot products or AMX tiles): without them PyTorch emulates bf16 (slower than fp32)
and OpenVINO silently runs fp32.
"""

from __future__ import annotations

import platform
from functools import cache

# The flags the speed benchmark reports (names as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_model() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; empty when /proc/cpuinfo is not there (not Linux)."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def isa_report() -> dict[str, bool]:
    """{flag: present} for the flags in ISA_FLAGS, plus `bf16_units`."""
    flags = cpu_flags()
    return {**{name: name in flags for name in ISA_FLAGS}, "bf16_units": has_bf16_units()}


@cache
def has_bf16_units() -> bool:
    """Whether bf16 matrix arithmetic runs in hardware here (see the module docstring)."""
    flags = cpu_flags()
    if flags:
        return any(flag in flags for flag in BF16_FLAGS)
    return _torch_says_bf16()


def _torch_says_bf16() -> bool:
    # Not Linux: torch's probe (private but stable since 2.1); torch is a core dependency.
    try:
        import torch

        probe = torch._C._cpu
        return bool(probe._is_avx512_bf16_supported() or probe._is_amx_tile_supported())
    except (ImportError, AttributeError):
        return False


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []
