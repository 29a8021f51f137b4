"""Per-image segmentation metrics (SPEC section 6) and their per-dataset aggregation.

Definitions match MONAI (DiceMetric with ignore_empty=False, compute_hausdorff_distance):
- surface = mask XOR binary_erosion(mask) with scipy's default cross structuring element and
  zero outside the image, i.e. the mask's own boundary pixels;
- directed distances from every surface pixel of one mask to the nearest surface pixel of the
  other, Euclidean, in pixels (or mm with `spacing` = (row, col) pixel size);
- HD = max over both directions of the directed maximum; HD95 = max over both directions of
  the directed 95th percentile (linear interpolation, as torch.quantile / np.percentile).
The nearest-surface distances come from one Euclidean distance transform per direction over
the bounding box of both masks (exact: every surface pixel lies inside it), never pairwise.

Empty masks, where MONAI returns nan/inf, are defined here:
- both empty: Dice 1, IoU 1, HD 0, HD95 0 (a correct "nothing here");
- exactly one empty: Dice 0, IoU 0, HD = HD95 = the image diagonal sqrt(H^2 + W^2) (scaled by
  spacing), flagged so reports count them instead of dropping them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd", "hd95")


@dataclass(frozen=True)
class ImageMetrics:
    dice: float
    iou: float
    hd: float
    hd95: float
    empty_pred: bool  # prediction empty while the truth is not
    empty_truth: bool

    def as_dict(self) -> dict:
        return asdict(self)


def dice_score(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = _as_bool_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou_score(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = _as_bool_pair(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, truth).sum()) / union


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask, as MONAI's get_mask_edges (erosion, zero border)."""
    return mask ^ ndimage.binary_erosion(mask, border_value=0)


def hausdorff_distances(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[float, float]:
    """(HD, HD95) between two bool masks; see the module docstring for empty masks."""
    pred, truth = _as_bool_pair(pred, truth)
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if not pred_any and not truth_any:
        return 0.0, 0.0
    if pred_any != truth_any:
        diagonal = image_diagonal(pred.shape, spacing)
        return diagonal, diagonal
    pred, truth = _crop_to_union(pred, truth)
    pred_surface, truth_surface = surface(pred), surface(truth)
    pred_to_truth = _nearest_surface_distance(truth_surface, spacing)[pred_surface]
    truth_to_pred = _nearest_surface_distance(pred_surface, spacing)[truth_surface]
    hd = max(pred_to_truth.max(), truth_to_pred.max())
    hd95 = max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
    return float(hd), float(hd95)


def image_diagonal(shape: Sequence[int], spacing: Sequence[float] | None = None) -> float:
    height, width = (float(n) for n in shape[:2])
    row_size, col_size = (float(s) for s in spacing) if spacing else (1.0, 1.0)
    return math.hypot(height * row_size, width * col_size)


def image_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None
) -> ImageMetrics:
    pred, truth = _as_bool_pair(pred, truth)
    hd, hd95 = hausdorff_distances(pred, truth, spacing)
    truth_any = bool(truth.any())
    return ImageMetrics(
        dice=dice_score(pred, truth),
        iou=iou_score(pred, truth),
        hd=hd,
        hd95=hd95,
        empty_pred=truth_any and not pred.any(),
        empty_truth=not truth_any,
    )


def _as_bool_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"prediction and truth must be HxW masks of one shape: {pred.shape}, {truth.shape}")
    return pred, truth


def _crop_to_union(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # One pixel of margin keeps the zero border that the full-image erosion would see.
    rows, cols = np.nonzero(pred | truth)
    top, bottom = max(rows.min() - 1, 0), rows.max() + 2
    left, right = max(cols.min() - 1, 0), cols.max() + 2
    return pred[top:bottom, left:right], truth[top:bottom, left:right]


def _nearest_surface_distance(target_surface: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """Distance from every pixel to the nearest pixel of `target_surface`."""
    return ndimage.distance_transform_edt(~target_surface, sampling=spacing)


# --- aggregation ---------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> dict:
    """Mean, sample std and a normal-approximation 95% confidence interval of the mean."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    half_width = 1.96 * std / math.sqrt(array.size)
    return {"mean": mean, "std": std, "ci95": [mean - half_width, mean + half_width], "n": int(array.size)}


def summarize_images(rows: Sequence[ImageMetrics]) -> dict:
    """Per-dataset summary: every metric summarised, plus counts of empty predictions/truths."""
    summary = {name: summarize([getattr(row, name) for row in rows]) for name in METRIC_NAMES}
    summary["n"] = len(rows)
    summary["n_empty_pred"] = sum(row.empty_pred for row in rows)
    summary["n_empty_truth"] = sum(row.empty_truth for row in rows)
    return summary
