"""Interactive prediction in the style of SAM2: `set_image` once, then many `predict` calls.

Prompts are given in pixel coordinates of the ORIGINAL image, and masks come back at its size.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from uniultra.data.image_io import read_image, to_rgb_float
from uniultra.models.image_model import ImageFeatures, SAM2ImageModel

# The official predictor clamps stored low-res logits to this range before returning them.
LOGIT_CLAMP = 32.0


class Predictor:
    def __init__(self, model: SAM2ImageModel, mask_threshold: float = 0.0, autocast: bool = True) -> None:
        self.model = model.eval()
        self.mask_threshold = mask_threshold
        self.device = next(model.parameters()).device
        # bf16 autocast only where it pays off (CUDA); on CPU fp32 is both faster and exact.
        self._use_autocast = autocast and self.device.type == "cuda"
        self._features: ImageFeatures | None = None
        self._orig_hw: tuple[int, int] | None = None

    @property
    def orig_hw(self) -> tuple[int, int]:
        if self._orig_hw is None:
            raise RuntimeError("no image set: call set_image(...) first")
        return self._orig_hw

    def reset_image(self) -> None:
        self._features, self._orig_hw = None, None

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Any accepted image -> normalised (1, 3, S, S) model input."""
        if image.ndim < 2 or min(image.shape[:2]) < 1:
            raise ValueError(f"image of shape {image.shape} has no pixels")
        rgb = torch.from_numpy(np.ascontiguousarray(to_rgb_float(image)))
        x = rgb.permute(2, 0, 1).unsqueeze(0).to(self.device)
        size = self.model.image_size
        # Antialiased bilinear resize: what the official predictor's transform does.
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.model.normalize(x)

    @torch.inference_mode()
    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        """Compute the image embedding once. Accepts an array (gray, RGB, RGBA; 8/16-bit, float) or a path."""
        if isinstance(image, str | os.PathLike):
            image = read_image(image)
        if not isinstance(image, np.ndarray):
            raise TypeError(f"set_image expects a numpy array or a path, got {type(image).__name__}")
        x = self.preprocess(image)
        with self._autocast():
            self._features = self.model.encode_image(x)
        self._orig_hw = (int(image.shape[0]), int(image.shape[1]))

    @torch.inference_mode()
    def predict(
        self,
        box: np.ndarray | list | None = None,
        points: np.ndarray | list | None = None,
        labels: np.ndarray | list | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for box and/or point prompts on the current image.

        box: (4,) or (N, 4) xyxy; points: (P, 2) or (N, P, 2) xy; labels: 1 positive, 0 negative.
        Returns (masks (C, H, W) or (N, C, H, W), scores (C,) or (N, C), low-res logits), where C is
        3 with `multimask` else 1; a batched prompt (N, ...) keeps its leading axis even when N is 1.
        """
        if self._features is None:
            raise RuntimeError("no image set: call set_image(...) before predict(...)")
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        box_t = self._to_model_coords(prompts.boxes.reshape(-1, 2, 2)) if prompts.boxes is not None else None
        pts_t = None
        if prompts.points is not None:
            pts_t = (self._to_model_coords(prompts.points),
                     torch.as_tensor(prompts.labels, dtype=torch.int, device=self.device))
        mask_t = _tensor(mask_input, self.device) if mask_input is not None else None
        if mask_t is not None and mask_t.ndim == 3:
            mask_t = mask_t.unsqueeze(0)
        with self._autocast():
            out = self.model.decode(self._features, pts_t, box_t, mask_t, multimask)
        logits = out.low_res_logits.float()
        masks = F.interpolate(logits, size=self.orig_hw, mode="bilinear", align_corners=False)
        if not return_logits:
            masks = masks > self.mask_threshold
        result = (masks.cpu().numpy(), out.iou_scores.float().cpu().numpy(),
                  logits.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).cpu().numpy())
        return result if prompts.batched else tuple(r[0] for r in result)

    def _to_model_coords(self, xy: np.ndarray) -> torch.Tensor:
        """Original-image pixels -> model-input pixels (float32, in the official predictor's order)."""
        h, w = self.orig_hw
        t = _tensor(xy, self.device)
        t = t / torch.tensor([w, h], dtype=t.dtype, device=t.device)
        return t * self.model.image_size

    def _autocast(self):
        if self._use_autocast:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()


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


def _check_boxes(box, hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape not in {(4,)} and not (arr.ndim == 2 and arr.shape[1] == 4):
        raise ValueError(f"box must have shape (4,) or (N, 4) as x0 y0 x1 y1, got {arr.shape}")
    batched = arr.ndim == 2
    arr = arr.reshape(-1, 4)
    h, w = hw
    for x0, y0, x1, y1 in arr:
        if not np.isfinite([x0, y0, x1, y1]).all():
            raise ValueError(f"box {[x0, y0, x1, y1]} has non-finite coordinates")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"degenerate box {[x0, y0, x1, y1]}: need x0 < x1 and y0 < y1")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise ValueError(
                f"box {[x0, y0, x1, y1]} lies outside the image ({w} x {h} pixels, x in [0, {w}], y in [0, {h}])"
            )
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
        raise ValueError(f"point labels must be 1 (foreground), 0 (background) or -1 (padding), got {np.unique(lbl)}")
    h, w = hw
    if not np.isfinite(pts).all() or (pts[..., 0] < 0).any() or (pts[..., 1] < 0).any() \
            or (pts[..., 0] > w).any() or (pts[..., 1] > h).any():
        raise ValueError(f"a point lies outside the image ({w} x {h} pixels)")
    batched = pts.ndim == 3
    return pts.reshape(-1, *pts.shape[-2:]), lbl.reshape(-1, lbl.shape[-1]), batched


def _tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=device)
