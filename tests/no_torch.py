"""Running a snippet in a fresh Python where importing torch fails (shared by test_export and
test_openvino: the exported predictors must work on a machine without torch)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_BLOCKER = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
        return None

sys.meta_path.insert(0, NoTorch())
"""
_CHECK = """
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
"""


def run_without_torch(body: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `body` (dedented) with torch blocked, then check torch never got imported."""
    script = _BLOCKER + textwrap.dedent(body) + _CHECK
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
