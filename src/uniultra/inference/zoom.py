"""Zoomed prediction: each object is segmented on a crop around its prompt, then pasted back.

`ZoomPredictor` wraps any predictor with SAM2's `set_image` / `predict` contract (PyTorch or
ONNX) and keeps that contract. Per object:
- with a box: the crop is the box enlarged by `margin` (uniultra.inference.roi), extended to
  hold every positive point; negative points outside the crop are dropped (outside the crop the
  answer is background anyway);
- with points only: a first pass on the whole image gives a mask; the crop is cut around the
  part of it that holds the points (or a small square around them when it is empty), then the
  points are answered again on the crop.
The crop is resized to the model input by the wrapped predictor (one preprocessing for all), and
its logits, at crop size, are pasted into an image-sized canvas of background logits.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import ndimage

from uniultra.image_session import ImageSession
from uniultra.inference.roi import Roi, crop, mask_box, paste, roi_around_box
from uniultra.prompt_validation import LOGIT_CLAMP, PromptSet

DEFAULT_MARGIN = 1.4
# Side of the crop around a tapped point whose first pass found nothing, as a fraction of the image.
EMPTY_TAP_FRACTION = 0.25


class ZoomPredictor(ImageSession):
    def __init__(self, predictor, margin: float = DEFAULT_MARGIN) -> None:
        super().__init__()
        if margin < 1.0:
            raise ValueError(f"zoom margin must be >= 1 (the crop must hold the box), got {margin}")
        self.predictor = predictor
        self.margin = margin
        self._whole_image_set = False

    def __getattr__(self, name: str):
        # Everything but set_image/predict (model, modality, mask_threshold, ...) is the wrapped predictor's.
        if name == "predictor":
            raise AttributeError(name)
        return getattr(self.predictor, name)

    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        image = self.load_image(image)
        self._remember(image, image)
        self._whole_image_set = False

    def predict(self, box=None, points=None, labels=None, mask_input=None, multimask: bool = False,
                return_logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same arguments and return shapes as `Predictor.predict`; the low-res logits returned are
        those of each object's crop. `mask_input` is not supported (crops differ per object)."""
        image = self._require_image()
        if mask_input is not None:
            raise ValueError("a zoomed predictor takes no mask_input: each object is answered on its own crop")
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        n = len(prompts.boxes) if prompts.boxes is not None else len(prompts.points)
        results = [self._predict_object(image, prompts, i, multimask, return_logits) for i in range(n)]
        masks, scores, low = (np.stack([r[k] for r in results]) for k in range(3))
        return (masks, scores, low) if prompts.batched else (masks[0], scores[0], low[0])

    def predict_without_prompt(self, return_logits: bool = False):
        """No prompt, no crop: the wrapped predictor's answer on the whole image."""
        self._encode_whole_image()
        return self.predictor.predict_without_prompt(return_logits)

    def predict_auto(self, modality: str | None = None, return_logits: bool = False):
        self._encode_whole_image()
        return self.predictor.predict_auto(modality, return_logits)

    def _encode_whole_image(self) -> None:
        image = self._require_image()
        if not self._whole_image_set:
            self.predictor.set_image(image)
            self._whole_image_set = True

    def _predict_object(self, image: np.ndarray, prompts: PromptSet, i: int, multimask: bool,
                        return_logits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        box = None if prompts.boxes is None else prompts.boxes[i]
        points = None if prompts.points is None else prompts.points[i]
        labels = None if prompts.labels is None else prompts.labels[i]
        roi = self._roi(box, points, labels)
        self.predictor.set_image(crop(image, roi))
        self._whole_image_set = False
        offset = roi.offset
        kwargs = {"multimask": multimask, "return_logits": True}
        if box is not None:
            kwargs["box"] = box - np.tile(offset, 2)
        if points is not None:
            kwargs["points"], kwargs["labels"] = _points_in_roi(points, labels, roi)
        logits, scores, low = self.predictor.predict(**kwargs)
        full = paste(np.asarray(logits, dtype=np.float32), roi, self.orig_hw, -LOGIT_CLAMP)
        return (full if return_logits else full > self.predictor.mask_threshold), scores, low

    def _roi(self, box: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None) -> Roi:
        positives = np.zeros((0, 2)) if points is None else points[labels == 1]
        if box is None:
            box = self._first_pass_box(points, labels, positives)
        if len(positives):
            box = np.concatenate([np.minimum(box[:2], positives.min(0)), np.maximum(box[2:], positives.max(0))])
        return roi_around_box(box, self.orig_hw, self.margin)

    def _first_pass_box(self, points: np.ndarray, labels: np.ndarray, positives: np.ndarray) -> np.ndarray:
        """Box of what a whole-image pass segments for the points (the part holding a positive point)."""
        self._encode_whole_image()
        mask = np.asarray(self.predictor.predict(points=points, labels=labels)[0][0], dtype=bool)
        components, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        hit = {int(components[int(y), int(x)]) for x, y in np.clip(positives, 0, None).astype(int)
               if y < mask.shape[0] and x < mask.shape[1]} - {0}
        if hit:
            mask = np.isin(components, list(hit))
        box = mask_box(mask)
        if box is not None:
            return box
        anchor = positives.mean(0) if len(positives) else points.reshape(-1, 2).mean(0)
        half = EMPTY_TAP_FRACTION * max(self.orig_hw) / 2
        return np.concatenate([anchor - half, anchor + half])


def _points_in_roi(points: np.ndarray, labels: np.ndarray, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """Points in crop pixels; those outside the crop become padding (label -1 at the origin)."""
    local = points - roi.offset
    inside = (local[:, 0] >= 0) & (local[:, 1] >= 0) & (local[:, 0] <= roi.width) & (local[:, 1] <= roi.height)
    return np.where(inside[:, None], local, 0.0), np.where(inside, labels, -1)
