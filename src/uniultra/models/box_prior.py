"""The box's inscribed ellipse as a shape prior the decoder refines: as SAM's dense mask prompt
(`box_ellipse_logits`), or added to the output mask logits (`box_logit_prior`).

On small data a model that must draw the whole mask from the box corners alone loses to the plain
ellipse inscribed in the box when the box is exact (the ellipse is already a good lesion
outline). Given the ellipse as SAM's dense mask prompt, the decoder only has to learn the residual
between that prior and the object. Only prompts that contain a box get it; the others keep SAM's
"no mask" embedding. The prior is a function of the prompt alone (no weights), so it is the same in
training, the PyTorch predictors and the exported decoder graph.

As a dense prompt the prior enters at the 16 x 16 embedding grid, too coarse to carry the boundary
that makes the ellipse strong with an exact box. Added to the output logits (64 x 64 at 256 px input)
with a fixed weight, it keeps its full resolution: where the image says nothing (an isoechoic wall)
the prior decides, and a decoder trained with it learns to overrule it where the image disagrees.
"""

from __future__ import annotations

import torch

from uniultra.models.prompt_labels import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT

# Logit at the ellipse centre (and minus it far outside); the ramp crosses 0 on the ellipse and
# is +-1 at 1/8 of the semi-axis from it: a sharp prior, still smooth at the 4x mask-prompt grid.
PRIOR_GAIN = 8.0


def box_ellipse_logits(coords: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                       image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 1, gh, gw), has_box (N,) bool) for prompts in model-input pixels.

    coords (N, P, 2) and labels (N, P) as the prompt encoder takes them (box corners labelled
    BOX_TOP_LEFT / BOX_BOTTOM_RIGHT); rows without a box get zeros and has_box False.
    """
    top_left, has_box = _corner(coords, labels, BOX_TOP_LEFT)
    bottom_right, _ = _corner(coords, labels, BOX_BOTTOM_RIGHT)
    # Corners are pixel indices: the box spans from the first pixel's left edge to the last one's right.
    centre = (top_left + bottom_right + 1.0) / 2
    half = ((bottom_right - top_left + 1.0) / 2).clamp(min=1.0)
    gh, gw = grid
    ys = (torch.arange(gh, dtype=coords.dtype, device=coords.device) + 0.5) * (image_size / gh)
    xs = (torch.arange(gw, dtype=coords.dtype, device=coords.device) + 0.5) * (image_size / gw)
    dx = (xs.view(1, 1, gw) - centre[:, 0].view(-1, 1, 1)) / half[:, 0].view(-1, 1, 1)
    dy = (ys.view(1, gh, 1) - centre[:, 1].view(-1, 1, 1)) / half[:, 1].view(-1, 1, 1)
    radius = torch.sqrt(dx * dx + dy * dy)
    logits = (PRIOR_GAIN * (1.0 - radius)).clamp(-PRIOR_GAIN, PRIOR_GAIN)
    logits = torch.where(has_box.view(-1, 1, 1), logits, torch.zeros_like(logits))
    return logits.unsqueeze(1), has_box


def box_logit_prior(coords: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int], image_size: int,
                    weight: float) -> torch.Tensor:
    """(N, 1, gh, gw) logits to add to the masks: `weight` x (1 - the normalised radius of the box's
    inscribed ellipse), clipped to [-weight, weight]; zeros for prompts without a box."""
    logits, _ = box_ellipse_logits(coords, labels, grid, image_size)
    return logits * (weight / PRIOR_GAIN)


def _corner(coords: torch.Tensor, labels: torch.Tensor, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's point with `label` (mean if repeated; zeros if absent) and whether it has one."""
    hit = (labels == label).to(coords.dtype).unsqueeze(-1)
    count = hit.sum(dim=1)
    return (coords * hit).sum(dim=1) / count.clamp(min=1.0), count.squeeze(-1) > 0
