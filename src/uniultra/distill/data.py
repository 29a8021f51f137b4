"""Distillation images and the optional on-disk cache of teacher taps.

Images come from the training engine's resized cache (uniultra.engine.data.build_cached_set), so
`uniultra train` and `uniultra distill` share one `cache_dir`. Distillation needs no mask and no
prompt: EVERY image of a split is used, including images with an empty mask (nothing to skip).
Each sample's augmentation is a function of (seed, epoch, sample index), like the engine's, so a
resumed run sees the same images.

Teacher cache (`teacher_cache.enabled`): the teacher runs once per image (un-augmented) and its
taps are stored as `.npy` files that every process memory-maps. When all three taps are asked,
only D2 and D3 are stored and D1 = D2 + D3 is recomputed (exact in float32; what the block
computes). The cache key covers the teacher file's sha256, the images (names, sizes, modification
times), the input size, levels, stored taps and dtype, so a changed teacher or dataset is never
served stale features; MDKD's general teacher (another file, other taps) gets stems of its own
in the same directory. Files are written under temporary names and renamed when complete; a
marker file written last makes a half-built cache invisible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import Dataset
from tqdm import tqdm

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import SegmentationDataset
from uniultra.distill.config import term_name
from uniultra.engine import data as D
from uniultra.engine.config import AugmentConfig

CACHE_VERSION = 1
# Stages whose taps the teacher cache holds (SPEC 4 distils stages 1-3).
CACHED_LEVELS = (1, 2, 3)


def stored_taps(taps: Sequence[str]) -> tuple[str, ...]:
    """Taps kept on disk: D1 is derived from D2 + D3 when all three are asked."""
    taps = tuple(taps)
    return ("D2", "D3") if set(taps) == {"D1", "D2", "D3"} else taps


def complete_taps(features: dict[str, torch.Tensor], levels: Sequence[int], taps: Sequence[str]) -> dict:
    """Add the derived D1 = D2 + D3 to features loaded from a cache."""
    if "D1" in taps and stored_taps(taps) != tuple(taps):
        for level in levels:
            features[term_name(level, "D1")] = features[term_name(level, "D2")] + features[term_name(level, "D3")]
    return features


@dataclass
class DistillSample:
    set_index: int
    index: int


class DistillSet(Dataset):
    """All images of several cached sets; items addressed by (epoch, index) (engine EpochSampler).

    `teacher` (and `general`, MDKD's general teacher): per set, {term name: (N, C, H, W) array}
    of cached teacher taps, or None. `modalities` (MDKD): per set, the modality id of its images."""

    def __init__(
        self,
        sets: Sequence[D.CachedSet],
        augment_cfg: AugmentConfig | None,
        seed: int,
        teacher: Sequence[dict[str, np.ndarray]] | None = None,
        general: Sequence[dict[str, np.ndarray]] | None = None,
        modalities: Sequence[int] | None = None,
    ) -> None:
        self.sets = list(sets)
        self.augment = augment_cfg
        self.seed = seed
        self.cached = {key: list(value) for key, value in (("teacher", teacher), ("general", general))
                       if value is not None}
        self.modalities = list(modalities) if modalities is not None else None
        self.items = [DistillSample(si, i) for si, s in enumerate(self.sets) for i in range(len(s))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        item = self.items[index]
        image = self.sets[item.set_index].image(item.index)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            # A full-frame mask: the engine's augment keeps any warp that leaves something in view.
            frame = np.ones(image.shape[-2:], dtype=bool)
            image, _ = D.augment(image, frame, self.augment, rng)
        out = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)), "index": index}
        for key, per_set in self.cached.items():
            cached = per_set[item.set_index]
            out[key] = {k: torch.from_numpy(np.array(v[item.index], dtype=np.float32)) for k, v in cached.items()}
        if self.modalities is not None:
            out["modality"] = self.modalities[item.set_index]
        return out


def collate(items: list[dict]) -> dict:
    batch = {"images": torch.stack([it["image"].expand(3, -1, -1) for it in items]),
             "indices": [it["index"] for it in items]}
    for key in ("teacher", "general"):
        if key in items[0]:
            batch[key] = {k: torch.stack([it[key][k] for it in items]) for k in items[0][key]}
    if "modality" in items[0]:
        batch["modality"] = torch.tensor([it["modality"] for it in items], dtype=torch.long)
    return batch


# --- teacher cache ------------------------------------------------------------------------------

def dataset_key(dataset: SegmentationDataset) -> str:
    """Identity of a split's files (names, sizes, modification times)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([str(dataset.root.resolve()), dataset.split]).encode())
    for sample in dataset.samples:
        stat = sample.image_path.stat()
        digest.update(f"{sample.image_path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def cache_stem(name: str, dataset: SegmentationDataset, teacher_sha256: str, size: int, levels: Sequence[int],
               taps: Sequence[str], dtype: str) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, dataset_key(dataset), teacher_sha256, size, list(levels),
                                        list(stored_taps(taps)), dtype]).encode()).hexdigest()[:16]
    return f"{name}-{dataset.split or 'all'}-{size}-{digest}"


def build_teacher_cache(
    stem: str,
    directory: str | Path,
    images: D.CachedSet,
    shapes: dict[str, tuple[int, int, int]],
    compute: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    dtype: str,
    *,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Memory-mapped teacher taps {term: (N, C, H, W)} of every image of `images`, computed by
    `compute(images (B, 3, S, S) in [0, 1]) -> {term: (B, C, H, W)}` unless already on disk.

    Every process calls this; each computes its share (rank::world_size) into files process 0
    created, and process 0 publishes them when all are done. Two jobs that share `directory` (two
    seeds side by side) build a stem one after the other: process 0 of each holds a file lock while
    its job builds, and the job that waited finds the cache published."""
    directory = Path(directory)
    marker = directory / f"{stem}.json"
    final = {k: directory / f"{stem}.{k}.npy" for k in shapes}
    if _published(marker, final):
        return _load(final)
    barrier()  # every process saw "not cached" before process 0 starts writing
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    with FileLock(directory / f".{stem}.lock") if rank == 0 else contextlib.nullcontext():
        barrier()  # process 0 holds the lock: no other job publishes this stem until it is released
        if not _published(marker, final):
            writer = _CacheWriter(stem, directory, images, shapes, dtype, rank, world_size, barrier)
            writer.fill(compute, batch_size, progress)
            writer.publish(marker, final)
        barrier()
    return _load(final)


def _published(marker: Path, final: dict[str, Path]) -> bool:
    return marker.is_file() and all(p.is_file() for p in final.values())


def _load(final: dict[str, Path]) -> dict[str, np.ndarray]:
    return {k: np.load(p, mmap_mode="r") for k, p in final.items()}


@dataclass
class _CacheWriter:
    """One job's build of a cache stem: temporary files, each process's share, the rename."""

    stem: str
    directory: Path
    images: D.CachedSet
    shapes: dict[str, tuple[int, int, int]]
    dtype: str
    rank: int
    world_size: int
    barrier: Callable[[], None]

    def __post_init__(self) -> None:
        self.partial = {k: self.directory / f".{self.stem}.{k}.npy.partial" for k in self.shapes}
        n = len(self.images)
        if self.rank == 0:
            for k, p in self.partial.items():
                np.lib.format.open_memmap(p, mode="w+", dtype=np.dtype(self.dtype), shape=(n, *self.shapes[k])).flush()
        self.barrier()

    def fill(self, compute: Callable[[torch.Tensor], dict[str, torch.Tensor]], batch_size: int,
             progress: bool) -> None:
        arrays = {k: np.lib.format.open_memmap(p, mode="r+") for k, p in self.partial.items()}
        mine = list(range(self.rank, len(self.images), self.world_size))
        chunks = range(0, len(mine), batch_size)
        if progress:
            chunks = tqdm(chunks, desc=f"teacher cache {self.images.name}", unit="batch", leave=False)
        for start in chunks:
            idx = mine[start:start + batch_size]
            batch = torch.stack([torch.from_numpy(self.images.image(i)).expand(3, -1, -1) for i in idx])
            features = compute(batch)
            for k, array in arrays.items():
                array[idx] = features[k].float().cpu().numpy().astype(array.dtype)
        for array in arrays.values():
            array.flush()
        del arrays
        self.barrier()

    def publish(self, marker: Path, final: dict[str, Path]) -> None:
        if self.rank != 0:
            return
        for k in self.shapes:
            self.partial[k].replace(final[k])
        atomic_write_text(marker, json.dumps({"version": CACHE_VERSION, "set": self.images.name, "n": len(self.images),
                                              "shapes": {k: list(v) for k, v in self.shapes.items()},
                                              "dtype": self.dtype}))
