"""Exact-weights fingerprints, the check that DDP processes end a run with identical weights.

With `$UNIULTRA_TRAIN_HASH_DIR` set, each process writes `<prefix>rank<r>.json` holding the
sha256 of its final weights (used by the two-process tests of train and distill).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from uniultra.atomic import atomic_write_text

HASH_DIR_ENV = "UNIULTRA_TRAIN_HASH_DIR"


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names and exact bytes of a state dict (order-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_weights_hash(prefix: str, rank: int, world_size: int, step: int,
                       state: dict[str, torch.Tensor]) -> None:
    """Write this process's fingerprint when $UNIULTRA_TRAIN_HASH_DIR asks for it (else nothing)."""
    target = os.environ.get(HASH_DIR_ENV)
    if not target:
        return
    atomic_write_text(Path(target) / f"{prefix}rank{rank}.json",
                      json.dumps({"rank": rank, "world_size": world_size, "sha256": state_hash(state),
                                  "step": step}))
