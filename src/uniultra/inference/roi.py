"""Region-of-interest geometry for zoomed segmentation, shared by training and inference.

A box prompt is answered on a crop around the box (the box enlarged by a margin), resized to
the model input, so that every object is seen at about the same scale whatever its size in the
image; the crop's logits are pasted back into an image-sized canvas. Training samples are cut
with the same functions, so a model sees at training time exactly the crops it sees later.

Boxes are (x0, y0, x1, y1) in pixel indices of the image, inclusive (a one-pixel object has
x0 == x1), as everywhere in UniUltra. A `Roi` is a half-open integer window that may reach past
the image border; what lies outside the image is black in the crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Smallest crop side, as a fraction of the image's longer side: a tiny box would otherwise be
# magnified until speckle grains look like structures.
MIN_SIDE_FRACTION = 0.08
MIN_SIDE_PX = 16
# Longest-to-shortest crop side: a thin box is widened rather than stretched beyond this.
MAX_ASPECT = 2.0
# Sides (fractions of the image's longer side) of the square crops centred on a tap that a tap is
# answered on (uniultra.inference.zoom) and that tap-trained samples are cut with.
TAP_SIDES = (0.12, 0.2, 0.3, 0.45, 0.7, 1.0)


@dataclass(frozen=True)
class Roi:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def offset(self) -> np.ndarray:
        return np.array([self.x0, self.y0], dtype=np.float64)


def full_roi(image_hw: tuple[int, int]) -> Roi:
    return Roi(0, 0, int(image_hw[1]), int(image_hw[0]))


def tap_square(positives: np.ndarray, side: float, image_hw: tuple[int, int]) -> Roi:
    """Square crop centred on the tapped points (P, 2), `side` times the image's longer side, grown
    to hold every point; one of the crops a tap is answered on, and cut alike for training."""
    positives = np.asarray(positives, dtype=np.float64).reshape(-1, 2)
    centre = positives.mean(0)
    half = np.maximum(side * max(image_hw) / 2, np.abs(positives - centre).max(0) + 2)
    return roi_around_box(np.concatenate([centre - half, centre + half - 1]), image_hw, 1.0)


def roi_around_box(box: np.ndarray, image_hw: tuple[int, int], margin: float) -> Roi:
    """The box enlarged `margin` times about its centre, with a minimum side and aspect limit."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    cx, cy = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    width, height = (x1 - x0 + 1) * margin, (y1 - y0 + 1) * margin
    min_side = max(MIN_SIDE_PX, MIN_SIDE_FRACTION * max(image_hw))
    width, height = max(width, height / MAX_ASPECT, min_side), max(height, width / MAX_ASPECT, min_side)
    return Roi(math.floor(cx - width / 2), math.floor(cy - height / 2),
               math.ceil(cx + width / 2), math.ceil(cy + height / 2))


def crop(array: np.ndarray, roi: Roi) -> np.ndarray:
    """array[roi] with zeros where the window leaves the image (any trailing channel axes kept)."""
    h, w = array.shape[:2]
    out = np.zeros((roi.height, roi.width, *array.shape[2:]), dtype=array.dtype)
    sx0, sy0, sx1, sy1 = max(roi.x0, 0), max(roi.y0, 0), min(roi.x1, w), min(roi.y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - roi.y0: sy1 - roi.y0, sx0 - roi.x0: sx1 - roi.x0] = array[sy0:sy1, sx0:sx1]
    return out


def paste(values: np.ndarray, roi: Roi, image_hw: tuple[int, int], fill: float) -> np.ndarray:
    """Inverse of `crop` for (..., roi.height, roi.width) values: an image-sized canvas of `fill`
    with the part of the window that lies inside the image written in."""
    h, w = image_hw
    out = np.full((*values.shape[:-2], h, w), fill, dtype=values.dtype)
    sx0, sy0, sx1, sy1 = max(roi.x0, 0), max(roi.y0, 0), min(roi.x1, w), min(roi.y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[..., sy0:sy1, sx0:sx1] = values[..., sy0 - roi.y0: sy1 - roi.y0, sx0 - roi.x0: sx1 - roi.x0]
    return out


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Inclusive (x0, y0, x1, y1) of a mask's pixels, None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)


def mask_edges(mask: np.ndarray) -> list[float] | None:
    """A mask's box in pixel edges [x0, y0, x1, y1] (x1 = last column + 1), the convention of box
    prompts; None if empty."""
    box = mask_box(mask)
    return None if box is None else [float(v) for v in box + np.array([0.0, 0.0, 1.0, 1.0])]


# A box made from a predicted mask (the previous cine frame's, the automatic head's) is pushed out on
# each side by this fraction of its size plus a few pixels: the model was trained with boxes that
# enclose the object loosely, and a tiny object can still move.
DEFAULT_MARGIN = 0.1
MIN_MARGIN_PX = 2.0


def enlarge_box(box: Sequence[float], shape: tuple[int, int], margin: float = DEFAULT_MARGIN) -> list[float]:
    """`box` grown on each side by `margin` of its size (+ MIN_MARGIN_PX), clipped to the HxW image."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0) + MIN_MARGIN_PX, margin * (y1 - y0) + MIN_MARGIN_PX
    height, width = shape
    return [max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, float(width)), min(y1 + dy, float(height))]
