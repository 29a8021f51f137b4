"""Training samples for zoomed models: each sample is a crop around one prompted object.

The crop is cut from the NATIVE image with uniultra.inference.roi (the functions inference uses)
and resized to the model input like every image (uniultra.inference.transforms), so training sees the
crops `ZoomPredictor` will show the model. What makes a model follow the prompt rather than a
dataset's prior ("the dark blob") is the mix of targets:
- `targets: labels` entries: one connected component of the ground truth;
- `targets: regions` entries: one unsupervised region (uniultra.data.regions) of any brightness,
  from images whose labels are never read;
with any other object of the crop counted as background. Point-only samples are cut either as
the whole image (the first pass of a tap), around the object with a wide, loose margin (the
second pass) or, with `zoom.tap_crops`, as one of the squares centred on the tap that inference
also tries (the object may be cut off by the crop: the model learns to segment it up to the border
instead of filling the crop). An entry's `weight` scales how many of its images an epoch draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.data.image_io import normalize_intensity, read_image, resize_mask
from uniultra.data.prompts import (
    farthest_interior_points,
    jitter_boxes,
    label_components,
    sample_interior_points,
)
from uniultra.data.regions import (
    cache_dataset_regions,
    grow_region,
    load_dataset_regions,
    regions_cache_path,
    sample_region,
)
from uniultra.engine.config import TRAIN_PROMPT_MODES, DataEntry, TrainPromptConfig, ZoomConfig
from uniultra.engine.data import corrective_click, draw_box_kind
from uniultra.inference.roi import TAP_SIDES, Roi, crop, full_roi, mask_box, roi_around_box, tap_square
from uniultra.inference.transforms import resize_for_model

# Point-only samples cut around the object use a looser crop than boxes: the second pass of a tap
# crops around a first-pass mask that may be too small or too large.
POINT_MARGIN_SPREAD = 1.5


@dataclass
class NativeSet:
    """One data entry's training images at native resolution, with labels or region maps."""

    name: str
    stems: list[str]
    images: list[np.ndarray]  # (H, W) or (H, W, C), wider than 8 bits normalised (crops share its contrast)
    masks: list[np.ndarray] | None  # (H, W) bool; None for a `targets: regions` entry
    regions: list[np.ndarray] | None  # (L, h, w) uint8 label maps; None for a labels entry
    weight: float = 1.0
    region_grow: float = 0.0  # map pixels, see ZoomConfig.region_grow

    def __len__(self) -> int:
        return len(self.stems)

    def usable(self) -> np.ndarray:
        """Indices of images with something to segment."""
        if self.masks is not None:
            return np.array([i for i, m in enumerate(self.masks) if m.any()], dtype=np.int64)
        return np.array([i for i, r in enumerate(self.regions) if r.any()], dtype=np.int64)

    def target(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """One object of image i as a native-size bool mask."""
        if self.masks is not None:
            components, count = label_components(self.masks[i])
            return components == int(rng.integers(count)) + 1
        maps = self.regions[i]
        shape = self.images[i].shape[:2]
        region = resize_mask(sample_region(maps, rng), shape)
        return grow_region(region, self.region_grow * max(shape) / max(maps.shape[1:]))


def build_native_set(entry: DataEntry, dataset: SegmentationDataset, zoom: ZoomConfig,
                     progress: bool = False) -> NativeSet:
    """Read an entry's split at native size: images with masks, or with region maps (computed
    once for the whole folder into `zoom.regions_dir`)."""
    samples = dataset.samples
    stems = [s.stem for s in samples]
    if entry.targets == "regions":
        key = f"{entry.label}-{dataset.root.resolve().name}"
        if not regions_cache_path(zoom.regions_dir, key).is_file():
            cache_dataset_regions(dataset.root / "images", zoom.regions_dir, key, progress=progress)
        cache = load_dataset_regions(zoom.regions_dir, key)
        missing = [stem for stem in stems if stem not in cache]
        if missing:
            raise ValueError(f"{regions_cache_path(zoom.regions_dir, key)}: no region maps for {missing[:3]}; "
                             "delete the file to recompute it")
        images = [normalize_intensity(read_image(s.image_path)) for s in _bar(samples, progress, entry.label)]
        return NativeSet(entry.label, stems, images, None, [cache[stem] for stem in stems], entry.weight,
                         zoom.region_grow)
    items = [load_sample(s) for s in _bar(samples, progress, entry.label)]
    # Mapped on the whole image, as ZoomPredictor does, before any crop is cut from it.
    images = [normalize_intensity(it["image"]) for it in items]
    return NativeSet(entry.label, stems, images, [it["mask"] for it in items], None, entry.weight)


def _bar(samples: list, enabled: bool, name: str):
    if not enabled:
        return samples
    from tqdm import tqdm

    return tqdm(samples, desc=f"read {name}", unit="img", leave=False)


class ZoomTrainSet(Dataset):
    """Items addressed by (epoch, index) like uniultra.engine.data.TrainSet, same item layout."""

    def __init__(self, sets: Sequence[NativeSet], prompts: TrainPromptConfig, zoom: ZoomConfig, size: int,
                 seed: int, hflip: float = 0.5) -> None:
        self.sets, self.prompts, self.zoom = list(sets), prompts, zoom
        self.size, self.seed, self.hflip = size, seed, hflip
        self.usable = [s.usable() for s in self.sets]
        self.counts = [int(round(s.weight * len(u))) if len(u) else 0 for s, u in zip(self.sets, self.usable,
                                                                                         strict=True)]
        self.starts = np.cumsum([0] + self.counts)
        self.n_empty = {s.name: len(s) - len(u) for s, u in zip(self.sets, self.usable, strict=True)}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        si = int(np.searchsorted(self.starts, index, side="right")) - 1
        usable = self.usable[si]
        # An entry drawn less than once per epoch walks through its images across epochs.
        i = int(usable[(index - self.starts[si] + epoch * self.counts[si]) % len(usable)])
        s = self.sets[si]
        image, target = s.images[i], s.target(i, rng)
        if rng.random() < self.hflip:
            image, target = image[:, ::-1], target[:, ::-1]
        kind = self._kind(rng)
        roi, coords, labels = self._prompt(target, kind, rng)
        pixels = resize_for_model(crop(np.ascontiguousarray(image), roi), self.size)
        pixels = random_intensity(pixels, self.zoom.intensity, rng)
        cropped = crop(target, roi)
        truth = resize_mask(cropped, (self.size, self.size))
        scale = np.array([self.size / roi.width, self.size / roi.height])
        # The object's area beyond the crop, at model-input scale (a tap crop may cut the object off).
        outside = (np.count_nonzero(target) - np.count_nonzero(cropped)) * float(scale[0] * scale[1])
        return {"image": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
                "target": torch.from_numpy(truth.astype(np.float32)), "outside": outside,
                "coords": torch.from_numpy(((coords - roi.offset) * scale).astype(np.float32)),
                "labels": torch.from_numpy(labels), "kind": kind, "set": si, "index": index}

    def _kind(self, rng: np.random.Generator) -> str:
        kinds = [k for k in TRAIN_PROMPT_MODES if self.prompts.modes.get(k, 0) > 0]
        probs = np.array([self.prompts.modes[k] for k in kinds], dtype=np.float64)
        return kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]

    def _prompt(self, target: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[Roi, np.ndarray, np.ndarray]:
        """(crop window, prompt coords in native pixels (P, 2), labels (P,)) for one sample."""
        # Every sample draws a box: a point-only sample's crop is cut around it.
        jitter, corner_labels = draw_box_kind(self.prompts, rng, can_be_exact="box" in kind)
        box = jitter_boxes(mask_box(target)[None], target.shape, jitter, rng)[0]
        box[2:] = np.maximum(box[2:], box[:2] + 1)
        coords, labels = [], []
        if "box" in kind:
            coords += [box[:2], box[2:]]
            labels += list(corner_labels)
            roi = roi_around_box(box, target.shape, rng.uniform(*self.zoom.margin))
        elif rng.random() < self.zoom.whole_image_points:
            roi = full_roi(target.shape)
        else:
            low, high = self.zoom.margin
            roi = roi_around_box(box, target.shape, rng.uniform(low, high * POINT_MARGIN_SPREAD))
        if kind in ("point", "box+point"):
            central = rng.random() < self.prompts.center_point_prob
            coords.append(farthest_interior_points(target)[0] if central
                          else sample_interior_points(target, 1, rng)[0, 0])
            labels.append(1)
        elif kind == "points3":
            coords += list(sample_interior_points(target, 3, rng)[0])
            labels += [1, 1, 1]
        elif kind == "box+click":
            point, label = corrective_click(target, box, rng)
            coords.append(point)
            labels.append(label)
        coords = np.stack(coords).astype(np.float64)
        # Drawn last and only when asked for, so recipes without tap crops keep their random stream.
        if "box" not in kind and self.zoom.tap_crops and rng.random() < self.zoom.tap_crops:
            roi = tap_square(coords, TAP_SIDES[int(rng.integers(len(TAP_SIDES)))], target.shape)
        return roi, coords, np.array(labels, dtype=np.int64)


def random_intensity(pixels: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """Random gamma and contrast: gain settings differ between scanners and users."""
    if rng.random() >= probability:
        return pixels
    gamma = float(np.exp(rng.uniform(-0.4, 0.4)))
    contrast = rng.uniform(0.75, 1.25)
    out = np.clip(pixels, 0.0, 1.0) ** gamma
    mean = out.mean()
    return np.clip((out - mean) * contrast + mean, 0.0, 1.0)
