"""Segmentation loss: focal + dice on the predicted mask, plus the IoU head regressed to the real IoU.

The decoder's low-resolution logits (S/4 x S/4) are UPSAMPLED bilinearly to the model input
size S (exactly how a prediction is made) and compared with the truth resized to S
(nearest-neighbour, done once in the data cache); the truth is never downsampled.
Every term is computed per sample, then averaged over the batch.

With several candidate masks (multimask output for a single point), the candidate with the lowest
focal + dice loss is the one trained (SAM/SAM2 practice), while the IoU head learns the real IoU
of every candidate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniultra.engine.config import LossConfig
from uniultra.inference.transforms import upsample_logits


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-mask mean focal loss over pixels; logits/targets (..., H, W) -> (...)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-mask soft dice loss; (..., H, W) -> (...)."""
    return dice_loss_of_probabilities(logits.sigmoid().flatten(-2), targets.flatten(-2), smooth)


def projection_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean soft dice loss of the mask's x and y projections (max over the other axis) against the
    truth's; (..., H, W) -> (...)."""
    prob = logits.sigmoid()
    return (dice_loss_of_probabilities(prob.amax(-2), targets.amax(-2))
            + dice_loss_of_probabilities(prob.amax(-1), targets.amax(-1))) / 2


def dice_loss_of_probabilities(prob: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss over the last axis; (..., N) -> (...)."""
    numerator = 2 * (prob * targets).sum(-1) + smooth
    return 1 - numerator / (prob.sum(-1) + targets.sum(-1) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor, outside: torch.Tensor | None = None) -> torch.Tensor:
    """Real IoU of the thresholded prediction (logit > 0) with the truth; (..., H, W) -> (...).
    `outside` (broadcast to (...)): pixels of the object beyond the crop, counted in the union only."""
    pred = (logits > 0).flatten(-2)
    truth = targets.flatten(-2) > 0.5
    inter = (pred & truth).sum(-1).float()
    union = (pred | truth).sum(-1).float()
    if outside is not None:
        union = union + outside
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def segmentation_loss(
    low_res_logits: torch.Tensor, iou_pred: torch.Tensor, targets: torch.Tensor, cfg: LossConfig,
    outside: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss terms for one prompt group.

    low_res_logits (n, M, h, w), iou_pred (n, M), targets (n, S, S) -> (total (n,), terms {name: (n,)}).
    outside (n,): object pixels (at S x S scale) a crop cut off; with `cfg.iou_whole_object` the IoU
    head's target counts them as missed.
    """
    size = targets.shape[-2:]
    logits = upsample_logits(low_res_logits, size)
    targets = targets.unsqueeze(1).expand_as(logits)
    focal = sigmoid_focal_loss(logits, targets, cfg.focal_alpha, cfg.focal_gamma)  # (n, M)
    dice = dice_loss(logits, targets)
    with torch.no_grad():
        whole = outside[:, None] if cfg.iou_whole_object and outside is not None else None
        real_iou = mask_iou(logits, targets, whole)
    iou_loss = F.mse_loss(iou_pred.float(), real_iou, reduction="none").mean(-1)  # every candidate
    mask_loss = cfg.focal * focal + cfg.dice * dice
    if cfg.projection:
        mask_loss = mask_loss + cfg.projection * projection_loss(logits, targets)
    best = mask_loss.argmin(dim=1, keepdim=True)  # one candidate unless multimask
    pick = lambda t: t.gather(1, best).squeeze(1)  # noqa: E731
    total = pick(mask_loss) + cfg.iou * iou_loss
    terms = {"focal": pick(focal).detach(), "dice": pick(dice).detach(), "iou": iou_loss.detach(),
             "real_iou": pick(real_iou)}
    return total, terms
