"""Synthetic dataset folders for tests, and where the shared real data lives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# The real sets sit beside the repository (../shared/data), never inside it.
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("UNIULTRA_SHARED_DATA", REPO / ".." / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    """Path of a real dataset, or skip the test with the reason."""
    import pytest

    path = SHARED_DATA / name
    if not (path / "images").is_dir():
        pytest.skip(f"real data {path} is absent (set UNIULTRA_SHARED_DATA to its parent folder)")
    return path


def blob_mask(shape=(48, 64), boxes=((10, 12, 20, 30),)) -> np.ndarray:
    """Bool mask with a filled rectangle per (top, left, height, width)."""
    mask = np.zeros(shape, bool)
    for top, left, height, width in boxes:
        mask[top:top + height, left:left + width] = True
    return mask


def write_pair(root: Path, stem: str, mask: np.ndarray, image: np.ndarray | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    if image is None:
        # Distinct pixels per stem, so that no two synthetic images are accidental duplicates.
        rng = np.random.default_rng(list(stem.encode()))
        image = rng.integers(0, 256, mask.shape, dtype=np.uint8)
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{stem}.png")


def write_dataset(root: Path, stems, mask: np.ndarray | None = None) -> Path:
    for stem in stems:
        write_pair(root, stem, blob_mask() if mask is None else mask)
    return root
