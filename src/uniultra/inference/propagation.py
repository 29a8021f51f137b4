"""Follow an object through a cine loop: prompts on one frame, then each next frame is prompted with
the box of the previous frame's mask, enlarged slightly (the object moves a little between frames).

Runs forward from the prompted frame to the last, then backward to the first. When a frame's mask
comes out empty, the next frame reuses the last non-empty box (a lost object is searched where it
was last seen rather than dropped for the rest of the loop). No memory or tracking model: only the
image predictor, so any box-prompted model works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from uniultra.inference.roi import DEFAULT_MARGIN, enlarge_box, mask_edges

__all__ = ["DEFAULT_MARGIN", "Propagation", "enlarge_box", "mask_edges", "propagate"]

@dataclass
class Propagation:
    masks: list[np.ndarray]  # bool HxW per frame
    scores: list[float]  # predicted IoU per frame
    boxes: list[list[float] | None]  # the box each frame was prompted with (pixel edges x0, y0, x1, y1)


def propagate(
    predictor,
    frames: Sequence[np.ndarray],
    start: int,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
    labels: Sequence[int] | None = None,
    margin: float = DEFAULT_MARGIN,
    on_frame: Callable[[int], None] | None = None,
) -> Propagation:
    """Segment every frame from prompts on frame `start` (the predictor is re-encoded per frame and
    left holding the last frame it saw). `on_frame(i)` is called after frame i (progress)."""
    if not 0 <= start < len(frames):
        raise ValueError(f"start frame {start} out of range (loop has {len(frames)} frames)")
    n = len(frames)
    masks: list[np.ndarray | None] = [None] * n
    scores, boxes = [0.0] * n, [None] * n
    predictor.set_image(frames[start])
    masks[start], scores[start] = _best(predictor.predict(box=box, points=points, labels=labels))
    boxes[start] = list(box) if box is not None else None
    if on_frame:
        on_frame(start)
    for order in (range(start + 1, n), range(start - 1, -1, -1)):
        last_box = mask_edges(masks[start]) or boxes[start]
        previous = masks[start]
        for i in order:
            found = mask_edges(previous)
            last_box = found or last_box
            predictor.set_image(frames[i])
            if last_box is None:  # points only and nothing found: keep the points
                prompt = {"points": points, "labels": labels}
            else:
                boxes[i] = enlarge_box(last_box, previous.shape, margin)
                prompt = {"box": np.asarray(boxes[i])}
            masks[i], scores[i] = _best(predictor.predict(**prompt))
            previous = masks[i]
            if on_frame:
                on_frame(i)
    return Propagation(masks, scores, boxes)


def _best(result) -> tuple[np.ndarray, float]:
    masks, scores, _ = result
    best = int(np.argmax(scores))
    return np.asarray(masks[best], dtype=bool), float(scores[best])
