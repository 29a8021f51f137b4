"""Dataset folders: `DATASET/images/<stem>.<ext>` paired with `DATASET/masks/<stem>.png`.

A dataset is named after its directory (`../shared/data/busi` -> `busi`); that name travels
with every sample so several datasets can be trained on together and reported separately.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uniultra.data.image_io import IMAGE_EXTENSIONS, MASK_EXTENSIONS, read_image, read_mask
from uniultra.shipped import shipped_split_path

SPLITS_FILENAME = "splits.json"
SPLITS_DIR_ENV = "UNIULTRA_SPLITS_DIR"

IMAGES_DIR = "images"
MASKS_DIR = "masks"


@dataclass(frozen=True)
class Sample:
    """One image/mask pair on disk; `mask_path` is None only in an unlabelled folder."""

    dataset: str
    stem: str
    image_path: Path
    mask_path: Path | None


@dataclass
class FolderListing:
    """What `images/` and `masks/` contain, before any file is decoded."""

    images: dict[str, list[Path]] = field(default_factory=dict)
    masks: dict[str, list[Path]] = field(default_factory=dict)
    ignored: list[Path] = field(default_factory=list)

    def paired_stems(self) -> list[str]:
        return natural_sorted(set(self.images) & set(self.masks))


def dataset_name(root: str | Path) -> str:
    return Path(root).resolve().name


def natural_sorted(stems: Iterable[str]) -> list[str]:
    """Sort so `img2` comes before `img10` (the order users expect when editing a split file)."""

    def key(stem: str) -> list[tuple[int, int | str]]:
        return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", stem) if part]

    return sorted(stems, key=key)


def list_folder(root: str | Path) -> FolderListing:
    """Index image and mask files by stem; hidden files are skipped, other extensions ignored."""
    root = Path(root)
    listing = FolderListing()
    for subdir, extensions, index in (
        (IMAGES_DIR, IMAGE_EXTENSIONS, listing.images),
        (MASKS_DIR, MASK_EXTENSIONS, listing.masks),
    ):
        for path in sorted((root / subdir).iterdir()) if (root / subdir).is_dir() else []:
            if path.name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in extensions:
                index.setdefault(path.stem, []).append(path)
            else:
                listing.ignored.append(path)
    return listing


def require_dataset_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    if not (root / IMAGES_DIR).is_dir():
        raise FileNotFoundError(f"{root} has no {IMAGES_DIR}/ folder (expected images/ and masks/)")
    return root


def image_content_hash(image: np.ndarray) -> str:
    """Hash of the decoded pixels, so the same image saved twice with different encoders matches."""
    digest = hashlib.sha1(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


class SampleList:
    """Indexable list of image/mask pairs on disk, decoded on access."""

    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return load_sample(self.samples[index])

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))


class SegmentationDataset(SampleList):
    """The pairs of one dataset folder, optionally restricted to one split.

    `split=None` means every paired image. Items are dicts with `dataset`, `stem`, `image`
    (native dtype, see `read_image`) and `mask` (HxW bool).
    """

    def __init__(self, root: str | Path, split: str | None = None, splits_file: str | Path | None = None):
        self.root = require_dataset_dir(root)
        self.name = dataset_name(self.root)
        listing = list_folder(self.root)
        _refuse_ambiguous(listing)
        stems = listing.paired_stems()
        if split is not None:
            stems = load_split_stems(self.root, split, splits_file, available=stems)
        self.split = split
        self.samples = [
            Sample(self.name, stem, listing.images[stem][0], listing.masks[stem][0]) for stem in stems
        ]


class MultiDataset(SampleList):
    """Several datasets behind one index, each item still naming its dataset for per-set reports."""

    def __init__(self, datasets: Sequence[SegmentationDataset]):
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"datasets must have distinct directory names, got {names}")
        self.datasets = list(datasets)
        self.samples = [sample for d in self.datasets for sample in d.samples]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]


def load_sample(sample: Sample) -> dict:
    image = read_image(sample.image_path)
    mask = read_mask(sample.mask_path) if sample.mask_path is not None else None
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(
            f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
            f"{sample.image_path.name} size {image.shape[1]}x{image.shape[0]}"
        )
    return {"dataset": sample.dataset, "stem": sample.stem, "image": image, "mask": mask}


def _refuse_ambiguous(listing: FolderListing) -> None:
    for stem, paths in listing.images.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise ValueError(f"stem {stem!r} has several images ({names}); keep one")


# --- which split file a dataset folder uses (written by uniultra.data.split) ---------------------

def split_file_candidates(root: str | Path, splits_file: str | Path | None = None) -> list[Path]:
    """Where a split file is looked for, in priority order."""
    root = Path(root)
    name = dataset_name(root)
    candidates = [Path(splits_file)] if splits_file else []
    candidates.append(root / SPLITS_FILENAME)
    if os.environ.get(SPLITS_DIR_ENV):
        candidates.append(Path(os.environ[SPLITS_DIR_ENV]) / f"{name}.json")
    candidates.append(shipped_split_path(name))
    return candidates


def resolve_split_file(root: str | Path, splits_file: str | Path | None = None) -> Path:
    """Pick the split file for a dataset: an explicit file first, then the dataset's own
    splits.json, then $UNIULTRA_SPLITS_DIR/<name>.json, then the split file shipped in the
    package for that dataset name (uniultra/splits/<name>.json)."""
    if splits_file and not Path(splits_file).is_file():
        raise FileNotFoundError(f"split file {splits_file} does not exist")
    candidates = split_file_candidates(root, splits_file)
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no split file for dataset {dataset_name(root)!r}; looked in:\n  {looked}\n"
        f"create one with `uniultra data split {root}`, pass --splits FILE, set {SPLITS_DIR_ENV}, "
        "or omit --split to use every image"
    )


def load_split_stems(
    root: str | Path,
    split: str,
    splits_file: str | Path | None = None,
    available: Sequence[str] | None = None,
) -> list[str]:
    path = resolve_split_file(root, splits_file)
    document = json.loads(path.read_text())
    names = [key for key, value in document.items() if isinstance(value, list) and key != "ratios"]
    if split not in names:
        raise ValueError(f"{path}: no split named {split!r} (available: {', '.join(names)})")
    stems = [str(stem) for stem in document[split]]
    if available is not None:
        missing = sorted(set(stems) - set(available))
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise ValueError(f"{path}: split {split!r} names {len(missing)} stems without an image/mask pair "
                             f"in {root} ({shown})")
    return stems
