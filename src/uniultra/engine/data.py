"""Training and validation data: images resized to the model size once and cached, then
augmented and prompted per sample with a random stream fixed by (seed, epoch, sample index).

- Images are resized by uniultra.inference.transforms, as every prediction is (to_rgb_float,
  antialiased bilinear), stored as float16 (one channel when the image is gray), so training sees
  what inference sees up to float16 rounding (< 2.5e-4). Masks are resized nearest-neighbour.
- The cache lives in memory, or in `cache_dir` as .npy files that every process memory-maps
  (keyed by the files' names, sizes and modification times, so edited data is re-read).
- Training samples: one random object (8-connected component) of the resized, augmented mask is
  the target; its prompt (box with jitter J drawn from a list, point, 3 points or box + point)
  comes from that object. Images with an empty mask have no object: they are left out of
  box/point training and counted per dataset.
- A data entry's `subset:` file (written by `uniultra data coreset`) keeps only the training
  images it lists for that entry; validation sets are never filtered.
- Validation: the evaluation protocol of `uniultra evaluate` (uniultra.data.prompts.make_prompt
  on the native mask with a fixed seed, every object, union of the per-object masks, Dice at the
  native resolution).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset, DistributedSampler

from uniultra.atomic import atomic_write, atomic_write_text
from uniultra.config_io import to_dict
from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.data.image_io import read_mask, resize_mask
from uniultra.data.prompts import (
    farthest_interior_points,
    jitter_boxes,
    label_components,
    make_prompt,
    sample_interior_points,
)
from uniultra.data.subset import restrict_to_subset
from uniultra.engine.config import TRAIN_PROMPT_MODES, AugmentConfig, DataEntry, PhantomSpec, TrainPromptConfig
from uniultra.inference.coords import prompt_tokens
from uniultra.inference.transforms import resize_for_model
from uniultra.models.prompt_labels import BOX_CORNER_LABELS, EXACT_BOX_CORNER_LABELS

CACHE_VERSION = 1


# --- resizing and caching ----------------------------------------------------------------------

@dataclass
class CachedSet:
    """One dataset split at model resolution."""

    name: str
    root: str
    split: str | None
    stems: list[str]
    images: np.ndarray  # (N, C, S, S) float16, C = 1 or 3
    masks: np.ndarray  # (N, S, S) bool
    native_hw: list[tuple[int, int]]
    native_masks: list[np.ndarray] | None = None  # kept for validation only

    def __len__(self) -> int:
        return len(self.stems)

    def image(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index], dtype=np.float32)


def cache_key(dataset: SegmentationDataset, size: int) -> str:
    """Identity of a dataset's samples at `size`: its root, split and the names, sizes and
    modification times of every image and mask in it (so a subset of a split gets its own key)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, str(dataset.root.resolve()), dataset.split, size]).encode())
    for sample in dataset.samples:
        for path in (sample.image_path, sample.mask_path):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def build_cached_set(
    name: str,
    dataset: SegmentationDataset,
    size: int,
    *,
    cache_dir: str | Path | None = None,
    keep_native_masks: bool = False,
    progress: bool = False,
) -> CachedSet:
    """Resize every image of `dataset` once (or memory-map an earlier result from `cache_dir`)."""
    stems = [s.stem for s in dataset.samples]
    files = None
    if cache_dir is not None:
        stem = f"{name}-{dataset.split or 'all'}-{size}-{cache_key(dataset, size)}"
        files = {k: Path(cache_dir) / f"{stem}.{k}" for k in ("images.npy", "masks.npy", "json")}
        if all(p.is_file() for p in files.values()):
            meta = json.loads(files["json"].read_text())
            native_masks = [read_mask(s.mask_path) for s in dataset.samples] if keep_native_masks else None
            return CachedSet(name, str(dataset.root), dataset.split, stems,
                             np.load(files["images.npy"], mmap_mode="r"), np.load(files["masks.npy"], mmap_mode="r"),
                             [tuple(hw) for hw in meta["native_hw"]], native_masks)
    images, masks, native_hw, native_masks = [], [], [], []
    samples = dataset.samples
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, desc=f"cache {name} {dataset.split or ''} @{size}", unit="img", leave=False)
    for sample in samples:
        item = load_sample(sample)
        images.append(resize_for_model(item["image"], size).astype(np.float16))
        masks.append(resize_mask(item["mask"], (size, size)))
        native_hw.append(tuple(item["mask"].shape))
        if keep_native_masks:
            native_masks.append(item["mask"])
    channels = max((im.shape[0] for im in images), default=1)
    stacked = np.zeros((len(images), channels, size, size), dtype=np.float16)
    for i, im in enumerate(images):
        stacked[i] = im  # a gray image broadcasts to 3 channels when the set also holds colour
    mask_array = np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)
    if files is not None:
        save_npy(files["images.npy"], stacked)
        save_npy(files["masks.npy"], mask_array)
        atomic_write_text(files["json"], json.dumps({"stems": stems, "native_hw": native_hw}))
    return CachedSet(name, str(dataset.root), dataset.split, stems, stacked, mask_array, native_hw,
                     native_masks if keep_native_masks else None)


# --- phantoms -----------------------------------------------------------------------------------

def phantom_root(entry: DataEntry, out_dir: str | Path) -> Path:
    return Path(entry.path) if entry.path else Path(out_dir) / "data" / entry.label


def ensure_phantoms(entry: DataEntry, out_dir: str | Path) -> Path:
    """Generate the phantom folder of `entry` unless an identical one is already there."""
    from uniultra.data.phantom import write_phantom_dataset
    from uniultra.data.split import write_split

    spec = entry.phantom
    root = phantom_root(entry, out_dir)
    spec_file = root / "phantom.json"
    wanted = to_dict(spec)
    if spec_file.is_file():
        found = json.loads(spec_file.read_text())
        if _same_phantoms(found, wanted):
            return root
        raise ValueError(f"{root} holds other phantoms ({found}) than the config asks for ({wanted}); "
                         "delete the folder or give the entry another path")
    write_phantom_dataset(root, spec.n, seed=spec.seed, size=spec.size, kind=spec.kind,
                          n_lesions=spec.n_lesions, geometry=spec.geometry, lesion_scale=spec.lesion_scale)
    stems = [f"phantom_{i:04d}" for i in range(spec.n)]
    n_val = math.ceil(spec.n * spec.val_fraction) if spec.val_fraction > 0 else 0
    train, val = stems[: spec.n - n_val], stems[spec.n - n_val:]
    write_split({"dataset": root.name, "generated": "uniultra train (phantom data entry)", "phantom": wanted,
                 "counts": {"train": len(train), "val": len(val), "test": 0},
                 "train": train, "val": val, "test": []}, root / "splits.json")
    atomic_write_text(spec_file, json.dumps(wanted, indent=1) + "\n")
    return root


def _same_phantoms(found: dict, wanted: dict) -> bool:
    """Whether a folder's recorded spec is `wanted`; a field added since it was written counts at its default."""
    try:
        return to_dict(PhantomSpec(**found)) == wanted
    except (TypeError, ValueError):
        return False


def ensure_all_phantoms(entries: Sequence[DataEntry], out_dir: str | Path, ctx) -> None:
    """Generate every phantom data entry on the main process while the others wait (`ctx`:
    uniultra.engine.distributed's context), so no two processes write the same folder."""
    if ctx.is_main:
        for entry in entries:
            if entry.phantom is not None:
                ensure_phantoms(entry, out_dir)
    ctx.barrier()


@contextlib.contextmanager
def main_fills_cache_first(ctx, cache_dir: str | None):
    """Around the building of cached sets: with a disk cache shared by several processes, the
    main process fills it first and the others then memory-map it (no concurrent writes)."""
    shared_cache = ctx.distributed and cache_dir is not None
    if shared_cache and not ctx.is_main:
        ctx.barrier()
    yield
    if shared_cache and ctx.is_main:
        ctx.barrier()


def entry_root(entry: DataEntry, out_dir: str | Path) -> Path:
    return phantom_root(entry, out_dir) if entry.phantom is not None else Path(entry.path)


def open_split(entry: DataEntry, root: Path, split: str | None) -> SegmentationDataset:
    """The entry's folder restricted to `split` ("all" = every image); the training split is
    further restricted to the entry's `subset` file, when it has one (never the validation split:
    the config refuses a subset when split_train == split_val, so the two cannot be confused)."""
    dataset = SegmentationDataset(root, split=None if split == "all" else split, splits_file=entry.splits_file)
    if entry.subset is not None and split == entry.split_train:
        restrict_to_subset(dataset, entry.subset, entry.label)
    return dataset


# --- augmentation and prompts -------------------------------------------------------------------

def augment(image: np.ndarray, mask: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator):
    """Random flips and scale/shift/rotation of a (C, S, S) image and its (S, S) mask."""
    if rng.random() < cfg.hflip:
        image, mask = image[..., ::-1], mask[:, ::-1]
    if rng.random() < cfg.vflip:
        image, mask = image[..., ::-1, :], mask[::-1, :]
    image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
    if rng.random() >= cfg.affine_prob:
        return image, mask
    size = mask.shape[0]
    scale = rng.uniform(*cfg.scale)
    shift = rng.uniform(-cfg.shift, cfg.shift, size=2) * size
    angle = math.radians(rng.uniform(-cfg.rotate, cfg.rotate)) if cfg.rotate else 0.0
    # Output pixel o maps to input pixel  R^-1 (o - c - shift) / scale + c  (row, col order).
    cos, sin = math.cos(angle), math.sin(angle)
    inverse = np.array([[cos, sin], [-sin, cos]]) / scale
    center = np.array([(size - 1) / 2.0] * 2)
    offset = center - inverse @ (center + shift)
    warped = np.stack([ndimage.affine_transform(channel, inverse, offset, order=1, mode="constant", cval=0.0)
                       for channel in image])
    warped_mask = ndimage.affine_transform(mask.astype(np.uint8), inverse, offset, order=0, mode="constant") > 0
    if not warped_mask.any():  # the object left the frame: keep the un-warped sample
        return image, mask
    return warped.astype(np.float32), warped_mask


def draw_box_kind(cfg: TrainPromptConfig, rng: np.random.Generator, can_be_exact: bool = True
                  ) -> tuple[float, tuple[int, int]]:
    """(jitter J, corner labels) of one training box: with probability `cfg.exact_box` (and only when
    `can_be_exact`) the exact box with the exact-box tokens, else a box jittered by a J of `cfg.jitter`.
    The exact draw is skipped when `exact_box` is 0, so recipes without it keep their random stream."""
    if can_be_exact and cfg.exact_box > 0 and rng.random() < cfg.exact_box:
        return 0.0, EXACT_BOX_CORNER_LABELS
    return float(cfg.jitter[int(rng.integers(len(cfg.jitter)))]), BOX_CORNER_LABELS


def training_prompt(mask: np.ndarray, cfg: TrainPromptConfig, rng: np.random.Generator):
    """(target object mask, coords (P, 2) xy, labels (P,), kind) for one random object of `mask`."""
    components, count = label_components(mask)
    obj = components == int(rng.integers(count)) + 1
    kinds = [k for k in TRAIN_PROMPT_MODES if cfg.modes.get(k, 0) > 0]
    probs = np.array([cfg.modes[k] for k in kinds], dtype=np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=probs / probs.sum()))]
    coords: list[np.ndarray] = []
    labels: list[int] = []
    if "box" in kind:
        rows, cols = np.nonzero(obj)
        box = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=np.float64)
        jitter, corner_labels = draw_box_kind(cfg, rng)
        x0, y0, x1, y1 = jitter_boxes(box, obj.shape, jitter, rng)[0]
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)  # a one-pixel object still gets a proper box
        coords += [np.array([x0, y0]), np.array([x1, y1])]
        labels += list(corner_labels)
    if kind in ("point", "box+point"):
        if rng.random() < cfg.center_point_prob:
            coords.append(farthest_interior_points(obj)[0])
        else:
            coords.append(sample_interior_points(obj, 1, rng)[0, 0])
        labels.append(1)
    elif kind == "points3":
        coords += list(sample_interior_points(obj, 3, rng)[0])
        labels += [1, 1, 1]
    elif kind == "box+click":
        point, label = corrective_click(obj, np.concatenate(coords[:2]), rng)
        coords.append(point)
        labels.append(label)
    return obj, np.stack(coords).astype(np.float32), np.array(labels, dtype=np.int64), kind


def corrective_click(target: np.ndarray, box: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A click like a user's second one: positive inside the object, or negative inside the box on
    what is not the object (what a box-only mask most often wrongly includes)."""
    if rng.random() < 0.5:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        outside = np.zeros_like(target)
        outside[y0:y1 + 1, x0:x1 + 1] = True
        outside &= ~target
        if outside.any():
            return random_pixel(outside, rng), 0
    return random_pixel(target, rng), 1


def random_pixel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    k = int(rng.integers(rows.size))
    return np.array([cols[k], rows[k]], dtype=np.float64)


class TrainSet(Dataset):
    """Samples of several cached sets; items are addressed by (epoch, index) from EpochSampler."""

    def __init__(self, sets: Sequence[CachedSet], prompts: TrainPromptConfig, augment_cfg: AugmentConfig,
                 seed: int) -> None:
        self.sets = list(sets)
        self.prompts = prompts
        self.augment = augment_cfg
        self.seed = seed
        self.items: list[tuple[int, int]] = []
        self.n_empty: dict[str, int] = {}
        for si, s in enumerate(self.sets):
            has_object = np.asarray(s.masks).reshape(len(s), -1).any(axis=1)
            self.items += [(si, i) for i in np.flatnonzero(has_object).tolist()]
            self.n_empty[s.name] = int((~has_object).sum())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        si, i = self.items[index]
        s = self.sets[si]
        image, mask = augment(s.image(i), np.asarray(s.masks[i]), self.augment, rng)
        target, coords, labels, kind = training_prompt(mask, self.prompts, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "target": torch.from_numpy(target.astype(np.float32)),
                "coords": torch.from_numpy(coords), "labels": torch.from_numpy(labels),
                "kind": kind, "set": si, "index": index}


@dataclass
class PromptGroup:
    """Samples of a batch sharing one prompt kind (same number of prompt tokens)."""

    kind: str
    index: torch.Tensor  # (n,) positions in the batch
    coords: torch.Tensor  # (n, P, 2) model-input pixels
    labels: torch.Tensor  # (n, P)


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [0, 1], not normalised
    targets: torch.Tensor  # (B, S, S) float 0/1
    groups: list[PromptGroup] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    sets: torch.Tensor | None = None  # (B,) each sample's cached set (TrainSet.sets): its data entry
    outside: torch.Tensor | None = None  # (B,) object pixels (S x S scale) the sample's crop cut off

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.groups, self.indices, self.sets,
                     self.outside)

    def to(self, device: torch.device) -> Batch:
        groups = [PromptGroup(g.kind, g.index.to(device), g.coords.to(device), g.labels.to(device))
                  for g in self.groups]
        return Batch(self.images.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     groups, self.indices, None if self.sets is None else self.sets.to(device),
                     None if self.outside is None else self.outside.to(device))


def collate(items: list[dict]) -> Batch:
    images = torch.stack([it["image"].expand(3, -1, -1) for it in items])
    targets = torch.stack([it["target"] for it in items])
    groups = []
    for kind in TRAIN_PROMPT_MODES:
        members = [i for i, it in enumerate(items) if it["kind"] == kind]
        if members:
            groups.append(PromptGroup(kind, torch.tensor(members),
                                      torch.stack([items[i]["coords"] for i in members]),
                                      torch.stack([items[i]["labels"] for i in members])))
    # Only zoomed samples can cut their object off (uniultra.engine.zoom_data); elsewhere nothing is outside.
    outside = torch.tensor([float(it.get("outside", 0.0)) for it in items])
    return Batch(images, targets, groups, [it["index"] for it in items], torch.tensor([it["set"] for it in items]),
                 outside)


class EpochSampler(DistributedSampler):
    """DistributedSampler (order fixed by seed + epoch, shard by rank) that yields (epoch, index)
    and can skip the samples this rank already consumed in the epoch (mid-epoch resume)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in order])

    def __len__(self) -> int:
        return max(super().__len__() - self.skip, 0)


# --- validation ---------------------------------------------------------------------------------

@dataclass
class ValImage:
    set_index: int
    index: int
    coords: torch.Tensor  # (N, P, 2) model-input pixels, N objects
    labels: torch.Tensor  # (N, P)


@dataclass
class ValData:
    sets: list[CachedSet]
    images: list[ValImage]
    skipped: dict[str, int]


def build_val_data(sets: Sequence[CachedSet], mode: str, jitter: float, seed: int) -> ValData:
    """Prompts of `uniultra evaluate` (native resolution, fixed seed) mapped to model pixels the way
    Predictor maps them; images without an object are skipped and counted."""
    from uniultra.inference.objects import widen_degenerate_boxes

    images, skipped = [], {}
    for si, s in enumerate(sets):
        skipped[s.name] = 0
        for i, stem in enumerate(s.stems):
            prompt = make_prompt(s.native_masks[i], mode, stem=stem, seed=seed, jitter=jitter)
            if prompt is None:
                skipped[s.name] += 1
                continue
            boxes = None if prompt.boxes is None else widen_degenerate_boxes(prompt.boxes)
            xy, labels = prompt_tokens(boxes, prompt.points, prompt.labels, s.native_hw[i], s.images.shape[-1])
            images.append(ValImage(si, i, torch.from_numpy(xy), torch.from_numpy(labels).int()))
    return ValData(list(sets), images, skipped)
