"""Validation of user prompts, shared by the torch and the ONNX predictors (numpy only, no torch).

Prompts are given in pixel coordinates of the ORIGINAL image; errors name what is wrong in words
a user can act on.
"""

from __future__ import annotations

import numpy as np

# The official predictor clamps stored low-res logits to this range before returning them.
LOGIT_CLAMP = 32.0


class PromptSet:
    """Validated prompts in original-image pixels, always batched (N, ...)."""

    def __init__(self, boxes, points, labels, batched: bool) -> None:
        self.boxes, self.points, self.labels, self.batched = boxes, points, labels, batched

    @classmethod
    def from_user(cls, box, points, labels, hw: tuple[int, int]) -> PromptSet:
        if box is None and points is None:
            raise ValueError("give a box or points: this model needs a prompt")
        boxes, batched_box = _check_boxes(box, hw) if box is not None else (None, False)
        pts, lbl, batched_pts = _check_points(points, labels, hw) if points is not None else (None, None, False)
        if boxes is not None and pts is not None and len(boxes) != len(pts):
            raise ValueError(f"{len(boxes)} boxes but {len(pts)} point sets: give one point set per box")
        return cls(boxes, pts, lbl, batched_box or batched_pts)


def check_exact_box(exact_box: bool, supported: bool, boxes: np.ndarray | None) -> None:
    """`exact_box` needs a box and a model trained with exact-box tokens (`decoder.exact_box_tokens`)."""
    if not exact_box:
        return
    if not supported:
        raise ValueError("exact_box: this model has no exact-box tokens (decoder.exact_box_tokens); "
                         "its boxes are always read as possibly loose")
    if boxes is None:
        raise ValueError("exact_box says the box touches the object, but no box was given")


def _check_boxes(box, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape not in {(4,)} and not (arr.ndim == 2 and arr.shape[1] == 4):
        raise ValueError(f"box must have shape (4,) or (N, 4) as x0 y0 x1 y1, got {arr.shape}")
    batched = arr.ndim == 2
    arr = arr.reshape(-1, 4)
    h, w = hw
    for box in arr:
        x0, y0, x1, y1 = (float(v) for v in box)
        shown = f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}]"  # plain numbers, not numpy reprs
        if not np.isfinite(box).all():
            raise ValueError(f"box {shown} has non-finite coordinates")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"degenerate box {shown}: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise ValueError(f"box {shown} lies outside the image ({w} x {h} pixels, x in [0, {w}], y in [0, {h}])")
    return arr, batched


def _check_points(points, labels, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, bool]:
    if labels is None:
        raise ValueError("points need labels (1 = foreground, 0 = background)")
    pts = np.asarray(points, dtype=np.float64)
    lbl = np.asarray(labels)
    if pts.ndim not in (2, 3) or pts.shape[-1] != 2:
        raise ValueError(f"points must have shape (P, 2) or (N, P, 2), got {pts.shape}")
    if lbl.shape != pts.shape[:-1]:
        raise ValueError(f"labels shape {lbl.shape} does not match points shape {pts.shape}")
    if not np.isin(lbl, (-1, 0, 1)).all():
        found = np.unique(lbl).tolist()
        raise ValueError(f"point labels must be 1 (foreground), 0 (background) or -1 (padding), got {found}")
    h, w = hw
    if not np.isfinite(pts).all() or (pts[..., 0] < 0).any() or (pts[..., 1] < 0).any() \
            or (pts[..., 0] > w).any() or (pts[..., 1] > h).any():
        raise ValueError(f"a point lies outside the image ({w} x {h} pixels)")
    batched = pts.ndim == 3
    return pts.reshape(-1, *pts.shape[-2:]), lbl.reshape(-1, lbl.shape[-1]), batched
