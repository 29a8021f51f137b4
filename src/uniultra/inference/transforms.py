"""The image path around the model, in PyTorch: what training, evaluation, prediction and serving
all call (the numpy twin for ONNX is uniultra.inference.transforms_numpy, checked equal by a test).

- any image -> RGB in [0, 1] (uniultra.data.image_io.to_rgb_float) -> antialiased bilinear resize
  to the model's square input (what the official predictor's transform does); ImageNet
  normalisation is the model's own `normalize`;
- low-res mask logits -> bilinear upsampling to the original image size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from uniultra.data.image_io import to_rgb_float


def image_to_model(image: np.ndarray, size: int, device: torch.device | str = "cpu",
                   keep_gray: bool = False) -> torch.Tensor:
    """Any image -> (1, C, size, size) float32 in [0, 1]; C = 3, or 1 for a gray image with `keep_gray`
    (a gray image is resized once and broadcast, which gives the same values)."""
    rgb = to_rgb_float(image)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).to(device)
    if keep_gray and torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2]):
        x = x[:, :1]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def resize_for_model(image: np.ndarray, size: int) -> np.ndarray:
    """Any image -> (C, size, size) float32 numpy in [0, 1], C = 1 for gray (the training caches)."""
    return image_to_model(image, size, keep_gray=True)[0].numpy()


def upsample_logits(low_res_logits: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) decoder logits -> (N, C, H, W) float32 at the original image size."""
    return F.interpolate(low_res_logits.float(), size=tuple(hw), mode="bilinear", align_corners=False)
