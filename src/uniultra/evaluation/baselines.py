"""Trivial box-prompted baselines, evaluated at the image's native resolution.

A box-prompted model that does not clearly beat the ellipse inscribed in the same boxes has
learned nothing useful (data README). Boxes use the prompt convention: xyxy pixel indices,
inclusive, so the box covers the pixel-edge rectangle [x0 - 0.5, x1 + 0.5] x [y0 - 0.5, y1 + 0.5].
With several boxes the prediction is the union of the per-box masks.
"""

from __future__ import annotations

import numpy as np

BASELINES: tuple[str, ...] = ("box", "ellipse")


def fill_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Union of the filled boxes: pixels whose centre lies inside a box."""
    rows, cols = _pixel_grid(shape)
    mask = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        mask |= (cols >= x0 - 0.5) & (cols <= x1 + 0.5) & (rows >= y0 - 0.5) & (rows <= y1 + 0.5)
    return mask


def fill_ellipses(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Union of the ellipses inscribed in each box's pixel-edge rectangle (pixel centres inside)."""
    rows, cols = _pixel_grid(shape)
    mask = np.zeros(shape[:2], dtype=bool)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
        radius_x, radius_y = (x1 - x0 + 1) / 2, (y1 - y0 + 1) / 2
        mask |= ((cols - centre_x) / radius_x) ** 2 + ((rows - centre_y) / radius_y) ** 2 <= 1.0
    return mask


def baseline_predict(name: str, boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if name == "box":
        return fill_boxes(boxes, shape)
    if name == "ellipse":
        return fill_ellipses(boxes, shape)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def _pixel_grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    # Open grids broadcast to HxW without allocating two full index images.
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return rows.astype(np.float64), cols.astype(np.float64)
