"""Prompts derived from a ground-truth mask (SPEC section 3).

One object per connected component of the mask (8-connectivity: pixels touching at a corner
belong to one lesion; on busi 4- and 8-connectivity give the same 662 boxes). Per object:

- box: the component's bounding box `x0, y0, x1, y1` (pixel indices, inclusive, as SAM2's
  `mask_to_box`), each side pushed OUTWARD by an independent uniform 0..J px (J given at 1024
  scale and multiplied by max(H, W) / 1024), clipped to the image. Outward-only jitter
  follows MedSAM's `bbox_shift`; it is what the data README's baselines were measured with.
- point: the interior pixel farthest from the boundary (Euclidean distance transform, the
  image border counts as boundary; ties go to the first pixel in raster order).
- points3: three distinct positive pixels sampled uniformly inside the component.
- box+point: the box and the farthest-interior point.
- box+click: the box, then one corrective click as a user would add it after seeing the box's
  mask: at the farthest-interior pixel of the largest error region of that object's mask,
  positive on a missed part, negative on a wrong one (SAM's interactive protocol, one round).
  The prompt carries each object's truth for this; `segment_objects` runs the two rounds.
- none: no prompt (automatic mode).

Determinism: each (seed, image stem, prompt kind) gets its own random stream from a stable
hash, so prompts do not depend on iteration order, on which other images are evaluated, or
on the method being evaluated. An empty mask has no object: prompted modes return None
(skipped and counted by the caller).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PROMPT_MODES: tuple[str, ...] = ("box", "point", "points3", "box+point", "box+click", "none")
REFERENCE_SIZE = 1024
# 8-connectivity (3x3 block of ones).
CONNECTIVITY = np.ones((3, 3), dtype=bool)
# Separate streams so the boxes of `box` and `box+point` are identical.
_STREAM_IDS = {"box": 1, "points": 2}


@dataclass(frozen=True)
class Prompt:
    """Prompts for the N objects of one image, in the predictor's conventions.

    boxes: (N, 4) float xyxy; points: (N, P, 2) float xy; labels: (N, P) int (1 = positive).
    All None for mode `none`. objects: (H, W) component labels 1..N of the truth, only for mode
    `box+click` (the simulated user looks at the truth to place the corrective click).
    """

    mode: str
    boxes: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    objects: np.ndarray | None = None

    @property
    def n_objects(self) -> int:
        for array in (self.boxes, self.points):
            if array is not None:
                return len(array)
        return 0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components with 8-connectivity, numbered in raster order of first pixel."""
    labels, count = ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY)
    return labels, int(count)


def component_boxes(mask: np.ndarray) -> np.ndarray:
    """(N, 4) float xyxy inclusive pixel-index boxes, one per connected component."""
    labels, count = label_components(mask)
    boxes = np.zeros((count, 4), dtype=np.float64)
    for index, (rows, cols) in enumerate(ndimage.find_objects(labels)):
        boxes[index] = (cols.start, rows.start, cols.stop - 1, rows.stop - 1)
    return boxes


def jitter_boxes(
    boxes: np.ndarray, shape: tuple[int, int], jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """Push each side outward by uniform [0, J * max(H, W) / 1024] px and clip to the image."""
    boxes = np.asarray(boxes, dtype=np.float64).copy()
    if jitter > 0 and len(boxes):
        shift = rng.uniform(0.0, jitter * max(shape[:2]) / REFERENCE_SIZE, size=boxes.shape)
        boxes += shift * np.array([-1.0, -1.0, 1.0, 1.0])
    return _clip_boxes(boxes, shape)


def pad_boxes(boxes: np.ndarray, shape: tuple[int, int], padding: float) -> np.ndarray:
    """Push each side outward by `padding * max(H, W) / 1024` px (the jitter's scale), clipped to the image
    but never inside the given box."""
    boxes = np.asarray(boxes, dtype=np.float64)
    padded = _clip_boxes(boxes + padding * max(shape[:2]) / REFERENCE_SIZE * np.array([-1.0, -1.0, 1.0, 1.0]),
                         shape)
    return np.concatenate([np.minimum(padded[..., :2], boxes[..., :2]), np.maximum(padded[..., 2:], boxes[..., 2:])],
                          axis=-1)


def _clip_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape[:2]
    boxes[..., [0, 2]] = np.clip(boxes[..., [0, 2]], 0, width - 1)
    boxes[..., [1, 3]] = np.clip(boxes[..., [1, 3]], 0, height - 1)
    return boxes


def farthest_interior_points(mask: np.ndarray) -> np.ndarray:
    """(N, 2) xy of each component's pixel farthest from its boundary."""
    labels, count = label_components(mask)
    # Pad so that the image border counts as boundary: a click on the edge is a poor centre.
    distance = ndimage.distance_transform_edt(np.pad(labels > 0, 1))[1:-1, 1:-1]
    points = np.zeros((count, 2), dtype=np.float64)
    for index in range(count):
        component_distance = np.where(labels == index + 1, distance, -1.0)
        row, col = np.unravel_index(int(np.argmax(component_distance)), component_distance.shape)
        points[index] = (col, row)
    return points


def sample_interior_points(mask: np.ndarray, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """(N, n_points, 2) xy sampled uniformly inside each component (distinct when possible)."""
    labels, count = label_components(mask)
    points = np.zeros((count, n_points, 2), dtype=np.float64)
    for index in range(count):
        rows, cols = np.nonzero(labels == index + 1)
        chosen = rng.choice(rows.size, size=n_points, replace=rows.size < n_points)
        points[index] = np.stack([cols[chosen], rows[chosen]], axis=1)
    return points


def prompt_rng(seed: int, stem: str, stream: str) -> np.random.Generator:
    """A random stream fixed by (seed, image stem, kind); stable across runs and platforms."""
    stem_key = int.from_bytes(hashlib.sha256(stem.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, stem_key, _STREAM_IDS[stream]])


def make_prompt(
    mask: np.ndarray, mode: str, *, stem: str, seed: int = 0, jitter: float = 0.0
) -> Prompt | None:
    """The evaluation prompt of one image, or None when the mode needs an object and there is none."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {mode!r}; choose from {', '.join(PROMPT_MODES)}")
    if mode == "none":
        return Prompt(mode)
    if not np.any(mask):
        return None
    boxes = points = None
    if mode.startswith("box"):
        boxes = jitter_boxes(component_boxes(mask), mask.shape, jitter, prompt_rng(seed, stem, "box"))
    if mode in ("point", "box+point"):
        points = farthest_interior_points(mask)[:, None, :]
    elif mode == "points3":
        points = sample_interior_points(mask, 3, prompt_rng(seed, stem, "points"))
    labels = None if points is None else np.ones(points.shape[:2], dtype=np.int64)
    objects = label_components(mask)[0] if mode == "box+click" else None
    return Prompt(mode, boxes=boxes, points=points, labels=labels, objects=objects)


def corrective_clicks(predicted: np.ndarray, objects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((N, 1, 2) xy, (N, 1) labels): per object, the click on the largest error region of its mask
    (N, H, W): positive where the object was missed, negative where the mask is wrong; a perfect
    mask gets a positive click at the object's centre (it changes nothing a good model does)."""
    points, labels = [], []
    for i, pred in enumerate(np.asarray(predicted, dtype=bool)):
        truth = objects == i + 1
        regions = [(truth & ~pred, 1), (pred & ~truth, 0)]
        best = max(((_largest_component(r), label) for r, label in regions), key=lambda t: t[0].sum())
        region, label = best if best[0].any() else (truth, 1)
        points.append(farthest_interior_points(region)[:1])
        labels.append(label)
    return np.stack(points).astype(np.float64), np.array(labels, dtype=np.int64)[:, None]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = label_components(mask)
    if count <= 1:
        return components > 0
    return components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
