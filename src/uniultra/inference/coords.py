"""Prompt coordinates from original-image pixels to model-input pixels (numpy, no torch).

The one mapping every path uses (PyTorch and ONNX predictors, training validation): x scaled by
S / W and y by S / H, in float32 and in the official predictor's order of operations, so the two
runtimes get bit-identical coordinates.
"""

from __future__ import annotations

import numpy as np

from uniultra.models.prompt_labels import BOX_CORNER_LABELS, EXACT_BOX_CORNER_LABELS


def to_model_coords(xy: np.ndarray, orig_hw: tuple[int, int], size: int) -> np.ndarray:
    """(..., 2) xy in original-image pixels -> float32 model-input pixels."""
    h, w = orig_hw
    t = np.asarray(xy, dtype=np.float32)
    return (t / np.array([w, h], dtype=np.float32)) * np.float32(size)


def prompt_tokens(boxes: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None,
                  orig_hw: tuple[int, int], size: int, exact_box: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per object: box corners first (labels 2, 3; 4, 5 for an exact box), then clicks -> ((N, P, 2)
    float32, (N, P) int32)."""
    parts_xy, parts_lbl = [], []
    if boxes is not None:
        corners = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
        parts_xy.append(to_model_coords(corners, orig_hw, size))
        corner_labels = EXACT_BOX_CORNER_LABELS if exact_box else BOX_CORNER_LABELS
        parts_lbl.append(np.broadcast_to(np.array(corner_labels, np.int32), (len(corners), 2)))
    if points is not None:
        parts_xy.append(to_model_coords(points, orig_hw, size))
        parts_lbl.append(np.asarray(labels).astype(np.int32))
    coords = np.ascontiguousarray(np.concatenate(parts_xy, axis=1), dtype=np.float32)
    return coords, np.ascontiguousarray(np.concatenate(parts_lbl, axis=1), dtype=np.int32)
