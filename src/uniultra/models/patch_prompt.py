"""Self-patch prompt generator (SPEC 5): the image embedding prompts itself.

A small conv head scores coarse patches of the image for "contains the target"; the scores become a
dense prompt added to the image embedding, so the decoder needs no user prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.models.layers import LayerNorm2d

# Width of the prompt generator's hidden layer (SPEC 5: 256 -> 64 -> 1).
HIDDEN_CHANNELS = 64


def patch_targets(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch labels: 1 where any pixel of the PxP patch is foreground (max-pool of the mask).

    masks: (B, 1, S, S) or (B, S, S) binary masks at the model input size; returns (B, 1, S/P, S/P) floats.
    """
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    if masks.shape[-1] % patch_size or masks.shape[-2] % patch_size:
        raise ValueError(f"mask size {tuple(masks.shape[-2:])} is not a multiple of the patch size {patch_size}")
    return F.max_pool2d(masks.float(), kernel_size=patch_size, stride=patch_size)


class PatchPromptGenerator(nn.Module):
    """Image embedding -> patch logits, and patch logits -> dense prompt on the embedding grid."""

    def __init__(self, embed_dim: int, patch_stride: int) -> None:
        """patch_stride: embedding cells per patch side (patch pixels / backbone stride)."""
        super().__init__()
        self.patch_stride = patch_stride
        self.score = nn.Sequential(
            nn.Conv2d(embed_dim, HIDDEN_CHANNELS, kernel_size=patch_stride, stride=patch_stride),
            LayerNorm2d(HIDDEN_CHANNELS),
            nn.GELU(),
            nn.Conv2d(HIDDEN_CHANNELS, 1, kernel_size=1),
        )
        self.to_dense = nn.Sequential(nn.Conv2d(1, embed_dim, kernel_size=1), LayerNorm2d(embed_dim), nn.GELU())
        # A zero LayerNorm affine makes the dense prompt exactly GELU(0) = 0 at start, so an untrained
        # head decodes like the base decoder; the affine weight still receives gradient and grows.
        norm = self.to_dense[1]
        nn.init.zeros_(norm.weight)
        nn.init.zeros_(norm.bias)

    def patch_logits(self, image_embed: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 1, h/stride, w/stride)."""
        return self.score(image_embed)

    def dense_prompt(self, patch_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch probabilities upsampled to the (h, w) embedding grid and projected to C channels."""
        probs = F.interpolate(torch.sigmoid(patch_logits), size=grid, mode="bilinear", align_corners=False)
        return self.to_dense(probs)
