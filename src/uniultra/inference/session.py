"""What every predictor shares, torch-free: the current image's features and original size.

`Predictor` (PyTorch) and `OnnxPredictor` (onnxruntime) both follow SAM2's contract: `set_image`
encodes once, then any number of `predict` calls reuse the features.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from uniultra.data.image_io import normalize_intensity, read_image


class ImageSession:
    def __init__(self) -> None:
        self._features: Any = None
        self._orig_hw: tuple[int, int] | None = None

    @property
    def orig_hw(self) -> tuple[int, int]:
        if self._orig_hw is None:
            raise RuntimeError("no image set: call set_image(...) first")
        return self._orig_hw

    def reset_image(self) -> None:
        self._features, self._orig_hw = None, None

    @staticmethod
    def load_image(image: np.ndarray | str | os.PathLike) -> np.ndarray:
        """A path is read (errors name the file); an array is checked for a usable shape.

        Images wider than 8 bits come back as float32 in [0, 1] (`normalize_intensity`), mapped
        once on the whole image so that the crops a zoomed predictor cuts share its contrast.
        """
        if isinstance(image, str | os.PathLike):
            image = read_image(image)
        if not isinstance(image, np.ndarray):
            raise TypeError(f"set_image expects a numpy array or a path, got {type(image).__name__}")
        require_pixels(image)
        return normalize_intensity(image)

    def _remember(self, features: Any, image: np.ndarray) -> None:
        self._features = features
        self._orig_hw = (int(image.shape[0]), int(image.shape[1]))

    def _require_image(self) -> Any:
        if self._features is None:
            raise RuntimeError("no image set: call set_image(...) before predict(...)")
        return self._features


def require_pixels(image: np.ndarray) -> None:
    if image.ndim < 2 or min(image.shape[:2]) < 1:
        raise ValueError(f"image of shape {image.shape} has no pixels")
