"""Honest cost of a model: parameters, FLOPs with attention counted, latency, peak memory.

Conventions: FLOPs are those of `torch.utils.flop_counter.FlopCounterMode`, i.e. 2 per
multiply-add, counting matmuls, convolutions and attention only (elementwise ops, softmax and
normalisation are free). Latency is wall time (`time.perf_counter`) with a fixed thread count,
reported as a median over repeated runs after warm-up. Memory is the peak resident set size.
"""

from __future__ import annotations

import gc
import math
import pickle
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

# The fused CPU attention kernels that F.scaled_dot_product_attention dispatches to on CPU.
# torch ships FLOP formulas for the CUDA flash / efficient / cuDNN kernels but not for these,
# so without a registration their FLOPs are silently counted as zero.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

# Leaf kernels with these words in their name are fused attention/transformer blocks; if one
# reaches execution without a formula the count would be silently low, so we refuse instead.
_FUSED_ATTENTION_WORDS = ("attention", "multi_head", "transformer_encoder")


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters; tied (shared) parameters are counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# FLOPs


def _attention_matmul_flops(query_shape, key_shape, value_shape) -> int:
    """FLOPs of Q @ K^T and P @ V, the only matmuls of attention.

    Shapes are (..., heads_q, L, E) for the query and (..., heads_kv, S, E|Ev) for key/value;
    key/value heads are broadcast to the query heads (grouped-query attention), so the cost
    is taken over the query's leading dimensions.
    """
    batch_heads = math.prod(query_shape[:-2])
    q_len, qk_dim = query_shape[-2], query_shape[-1]
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * q_len * kv_len * (qk_dim + v_dim)


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # Causal or masked attention is counted as full attention, as torch does for every kernel
    # and as the math backend actually computes.
    return _attention_matmul_flops(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    # Flash backward recomputes the scores Q @ K^T (one matmul the math backend keeps from
    # its forward), then dV, dP, dQ, dK: the same five matmuls torch counts for the CUDA
    # flash kernel.
    batch_heads = math.prod(query_shape[:-2])
    q_len, qk_dim = query_shape[-2], query_shape[-1]
    kv_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * batch_heads * q_len * kv_len * (3 * qk_dim + 2 * v_dim)


def register_attention_flop_formulas() -> None:
    """Teach FlopCounterMode the CPU fused attention kernels (idempotent).

    After this, any FlopCounterMode created in the process counts CPU attention, not only
    `count_flops`. A formula torch itself provides in a later version is left in place.
    """
    for op, formula in ((_CPU_SDPA, _cpu_sdpa_flop), (_CPU_SDPA_BACKWARD, _cpu_sdpa_backward_flop)):
        if op not in flop_counter.flop_registry:
            register_flop_formula(op)(formula)


class _UncountedKernelGuard(TorchDispatchMode):
    """Records fused attention kernels that run without a FLOP formula.

    Entered *outside* FlopCounterMode, it sees exactly the leaf kernels the counter executed
    after trying to decompose them, i.e. the ones whose FLOPs could not be attributed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.missed: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if getattr(func, "_overloadpacket", func) not in flop_counter.flop_registry and any(
            word in name for word in _FUSED_ATTENTION_WORDS
        ):
            self.missed.add(name)
        return func(*args, **(kwargs or {}))


@contextmanager
def _mha_fastpath_disabled():
    # nn.MultiheadAttention / nn.TransformerEncoderLayer in eval mode without grad take a
    # fused "fast path" (aten._native_multi_head_attention, ...) that has no FLOP formula,
    # hiding even their projections. The slow path does the same arithmetic, op by op.
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def flops_by_op(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, int]:
    """FLOPs of one call `fn(*args, **kwargs)`, per aten op (e.g. {"aten.mm": ..., ...}).

    Attention is counted with the backend torch really uses: on CPU the fused kernel
    `aten._scaled_dot_product_flash_attention_for_cpu`, for which this module registers a
    formula (`register_attention_flop_formulas`; the test suite checks it against the count of
    the same module run with `sdpa_kernel(SDPBackend.MATH)`, where attention is plain bmm).
    The nn.MultiheadAttention fast path is switched off while counting (same arithmetic, but
    countable). If a fused attention kernel without a formula still runs, RuntimeError is
    raised rather than returning a silently low number.
    """
    register_attention_flop_formulas()
    guard = _UncountedKernelGuard()
    # The guard is entered first so it sits below the counter on the mode stack.
    with _mha_fastpath_disabled(), guard, FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    if guard.missed:
        raise RuntimeError(
            f"FLOPs not counted for fused kernels {sorted(guard.missed)}: register a formula with "
            "torch.utils.flop_counter.register_flop_formula or force the math attention backend"
        )
    return {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Total FLOPs (2 per multiply-add) of `fn(*args, **kwargs)`, attention included.

    Use `count_flops(model, x)` or `count_flops(lambda: model(x))`; the call runs once, in the
    caller's grad mode (wrap it in torch.inference_mode() for a forward-only count, or put a
    backward inside `fn` for a training-step count). See `flops_by_op` for how attention is
    counted.
    """
    return sum(flops_by_op(fn, *args, **kwargs).values())


# ---------------------------------------------------------------------------------------------
# Latency


@dataclass(frozen=True)
class LatencyStats:
    """Wall time of repeated calls, in milliseconds; `samples_ms` keeps every timed run."""

    samples_ms: tuple[float, ...]
    median_ms: float
    mean_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    min_ms: float
    threads: int
    warmup: int
    items_per_call: int = 1

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms

    @property
    def throughput(self) -> float:
        """Items per second at the median latency (items = images in a batch, say)."""
        return self.items_per_call * 1000.0 / self.median_ms if self.median_ms > 0 else math.inf

    def summary(self) -> str:
        return (
            f"median {self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f}; "
            f"n={len(self.samples_ms)}, warm-up {self.warmup}, threads {self.threads}), "
            f"{self.throughput:.1f} items/s"
        )


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def _stats(samples_ms: list[float], threads: int, warmup: int, items_per_call: int) -> LatencyStats:
    ordered = sorted(samples_ms)
    return LatencyStats(
        samples_ms=tuple(samples_ms),
        median_ms=statistics.median(ordered),
        mean_ms=statistics.fmean(ordered),
        p10_ms=_percentile(ordered, 10),
        p25_ms=_percentile(ordered, 25),
        p75_ms=_percentile(ordered, 75),
        p90_ms=_percentile(ordered, 90),
        min_ms=ordered[0],
        threads=threads,
        warmup=warmup,
        items_per_call=items_per_call,
    )


@contextmanager
def _torch_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _gc_paused():
    # A garbage collection landing inside one timed run is noise that belongs to no model
    # (timeit pauses the collector for the same reason).
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def measure_latency(
    fn: Callable[[], Any],
    warmup: int = 3,
    repeats: int = 10,
    threads: int | None = None,
    inference_mode: bool = False,
    items_per_call: int = 1,
) -> LatencyStats:
    """Time `fn()`: `warmup` untimed calls (allocator, caches, lazy init), then `repeats` timed.

    `threads` fixes torch's intra-op thread count for the measurement and restores the previous
    value afterwards (None keeps the current one, which is then reported). With
    `inference_mode=True` every call runs under torch.inference_mode(). CPU timing: a CUDA
    `fn` must synchronise itself. No threshold is implied: speed targets belong in benchmarks.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    samples_ms: list[float] = []
    mode = torch.inference_mode if inference_mode else nullcontext
    with _torch_threads(threads) as used_threads, mode(), _gc_paused():
        for _ in range(warmup):
            fn()
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples_ms.append((time.perf_counter() - start) * 1000.0)
    return _stats(samples_ms, used_threads, warmup, items_per_call)


# ---------------------------------------------------------------------------------------------
# Peak memory


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    ru_maxrss is a high-water mark over the whole process life: it never goes down, so it
    bounds the memory of a piece of work only if that work ran first, and a forked or spawned
    child starts from its parent's RSS at fork time. Use `measure_peak_rss` for one piece of
    work.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


@dataclass(frozen=True)
class PeakRss:
    """Peak RSS of a fresh process before and after a call, in MiB."""

    baseline_mb: float
    peak_mb: float

    @property
    def work_mb(self) -> float:
        """What the call added above the interpreter, its imports and its arguments."""
        return self.peak_mb - self.baseline_mb


# Run in the child with `python -c`: stdlib only, so the baseline holds just the interpreter
# and whatever `fn` itself imports (not torch, unless `fn` needs it). Anything `fn` prints
# goes to stderr; the result travels on a duplicate of the original stdout.
_CHILD_SCRIPT = """
import os, pickle, resource, sys
result = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
sys.path[:0] = pickle.load(sys.stdin.buffer)
fn, args = pickle.load(sys.stdin.buffer)

def status_mb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))

def maxrss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

try:
    # ru_maxrss of a child starts at its parent's RSS at fork (Linux keeps it across exec);
    # the address space's own high-water mark, reset here to the current RSS, does not.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline, peak_mb = status_mb("VmRSS"), lambda: status_mb("VmHWM")
except OSError:  # no /proc: ru_maxrss, an upper bound
    baseline, peak_mb = maxrss_mb(), maxrss_mb
fn(*args)
pickle.dump((baseline, peak_mb()), result)
result.close()
"""


def measure_peak_rss(fn: Callable[..., Any], *args: Any, timeout: float | None = 600.0) -> PeakRss:
    """Run `fn(*args)` in a fresh Python process and return its peak RSS before and after.

    Why a subprocess: ru_maxrss is a per-process high-water mark, so in-process it would
    include whatever ran before (other models, test fixtures). The child is a new interpreter
    (`python -c`, not fork), given this process's sys.path. `fn` and `args` are pickled, so
    `fn` must be importable by name (a module-level function or a functools.partial of one,
    not a lambda or something defined in __main__). They are unpickled before the baseline is
    read, so their imports and the arguments themselves are in `baseline_mb`: to charge a
    model's weights to the work, build the model inside `fn`. The return value is discarded.
    On Linux the child reads its own high-water mark (/proc/self/status VmHWM, reset through
    /proc/self/clear_refs), not ru_maxrss, which a child inherits from its parent.
    """
    payload = pickle.dumps(list(sys.path)) + pickle.dumps((fn, args))
    done = subprocess.run([sys.executable, "-c", _CHILD_SCRIPT], input=payload, capture_output=True,
                          timeout=timeout, check=False)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"measure_peak_rss: {fn!r} failed in the child: " + " | ".join(tail))
    baseline, peak = pickle.loads(done.stdout)
    return PeakRss(baseline_mb=baseline, peak_mb=peak)
