"""Reading what a training / distillation run wrote (shared by test_engine and test_distill)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def same_state(a: dict, b: dict) -> bool:
    """Same names and bit-identical tensors (exact resume, DDP replicas)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
