"""From per-object prompts to one mask: the step every model consumer shares.

Each object (one box, or one point set) gets its own single-mask prediction; the image's mask is
their union. Logits of different objects are never summed (a defect of the authors' code).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from uniultra.data.prompts import REFERENCE_SIZE, Prompt, corrective_clicks

# Clip margin around each (already jittered) box for post-processing, in px at 1024 scale.
POSTPROCESS_MARGIN = 10.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def widen_degenerate_boxes(boxes: np.ndarray) -> np.ndarray:
    """A one-pixel-wide object has x0 == x1 in inclusive pixel indices, but the predictor needs
    x0 < x1: extend such a side by one pixel (boxes are clipped to W-1, so x1 stays <= W)."""
    boxes = np.asarray(boxes, dtype=np.float64).copy()
    for low, high in ((0, 2), (1, 3)):
        flat = boxes[:, high] <= boxes[:, low]
        boxes[flat, high] = boxes[flat, low] + 1
    return boxes


def union_of_object_masks(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One mask per object (C=1 each) -> their union; logits are never summed across objects."""
    if masks.ndim not in (3, 4) or masks.shape[-2:] != tuple(shape):
        raise ValueError(f"predictor returned masks of shape {masks.shape}; expected (C,H,W) or (N,C,H,W) "
                         f"with H, W = {shape}")
    return np.asarray(_first_candidates(masks), dtype=bool).any(axis=0)


def clean_object_mask(mask: np.ndarray, box: np.ndarray | None, margin: float) -> np.ndarray:
    """Keep what can belong to one prompted object: inside its box (+ margin), the largest
    8-connected component, holes filled."""
    mask = np.asarray(mask, dtype=bool).copy()
    if box is not None:
        h, w = mask.shape
        x0, y0 = (max(0, int(np.floor(v - margin))) for v in box[:2])
        x1, y1 = (int(np.ceil(v + margin)) for v in box[2:])
        inside = np.zeros_like(mask)
        inside[y0 : min(h, y1 + 1), x0 : min(w, x1 + 1)] = True
        mask &= inside
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        mask = labels == 1 + int(np.argmax(sizes))
    return ndimage.binary_fill_holes(mask)


def segment_objects(predictor, image: np.ndarray, prompt: Prompt, postprocess: bool = False) -> np.ndarray:
    """Set the image, predict every object of `prompt`, optionally clean each, return the union.

    Prompt mode `none` asks the predictor for its answer without any prompt (the automatic head of
    an `AutoPredictor`, the plain decoder otherwise); post-processing then has no box to clip to.
    """
    predictor.set_image(image)
    if prompt.mode == "none":
        mask = np.asarray(predictor.predict_without_prompt()[0], dtype=bool)
        return clean_object_mask(mask, None, 0.0) if postprocess else mask
    boxes = None if prompt.boxes is None else widen_degenerate_boxes(prompt.boxes)
    masks, _, _ = predictor.predict(box=boxes, points=prompt.points, labels=prompt.labels, multimask=False)
    masks = np.asarray(masks)
    if prompt.mode == "box+click":  # the second round: the box again, plus the user's correction
        points, labels = corrective_clicks(_first_candidates(masks), prompt.objects)
        masks = np.asarray(predictor.predict(box=boxes, points=points, labels=labels, multimask=False)[0])
    shape = image.shape[:2]
    if not postprocess:
        return union_of_object_masks(masks, shape)
    per_object = _first_candidates(masks)
    margin = POSTPROCESS_MARGIN * max(shape) / REFERENCE_SIZE
    cleaned = [clean_object_mask(m, None if boxes is None else boxes[i], margin) for i, m in enumerate(per_object)]
    return np.any(cleaned, axis=0)


def _first_candidates(masks: np.ndarray) -> np.ndarray:
    return masks[:, 0] if masks.ndim == 4 else masks[:1]
