"""Image-level presence probe: "is the target in this image at all?" from the encoder's own features.

A linear probe per decoding channel on pooled statistics of the (frozen) encoder's whole-image
features: mean, max and standard deviation of the image embedding over the grid, mean and max of each
high-resolution feature map. The statistics are standardised with the training images' centre and
scale, then one logistic regression per channel gives the presence logit. Its weights are buffers,
not parameters: they are fitted in closed form after the head is trained (uniultra.auto.presence_fit),
never by the head's optimiser.

Why not the presence head on the decoder's image tokens (uniultra.models.presence_head)? On the
bundled default it separated BUSI's normal scans from lesion scans with ROC AUC 0.66 (test); a
logistic regression on these encoder statistics, fitted on the busi train split, 0.87-0.90. A
channel never fitted (its dataset has no empty image) has weight 0 and a large bias: "always present".
"""

from __future__ import annotations

import torch
from torch import nn

# Presence logit of a channel that was not fitted: sigmoid(12) > 0.99999, never gated.
UNFITTED_LOGIT = 12.0


def pooled_statistics(image_embed: torch.Tensor, high_res_feats: list[torch.Tensor] | tuple) -> torch.Tensor:
    """(B, C, h, w) embedding and high-res maps -> (B, D) statistics: embedding mean / max / std, then
    mean / max of each high-res map (D = 3 C + 2 sum of the high-res channels)."""
    parts = [image_embed.mean(dim=(2, 3)), image_embed.amax(dim=(2, 3)), image_embed.std(dim=(2, 3))]
    for feats in high_res_feats:
        parts += [feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))]
    return torch.cat(parts, dim=1)


def statistics_size(embed_dim: int, high_res_dims: tuple[int, ...]) -> int:
    return 3 * embed_dim + 2 * sum(high_res_dims)


class PresenceProbe(nn.Module):
    def __init__(self, embed_dim: int, high_res_dims: tuple[int, ...], channels: int) -> None:
        super().__init__()
        size = statistics_size(embed_dim, high_res_dims)
        self.register_buffer("center", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("weight", torch.zeros(channels, size))
        self.register_buffer("bias", torch.full((channels,), UNFITTED_LOGIT))

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    def standardised(self, image_embed: torch.Tensor, high_res_feats) -> torch.Tensor:
        return (pooled_statistics(image_embed.float(), [f.float() for f in high_res_feats]) - self.center) / self.scale

    def forward(self, image_embed: torch.Tensor, high_res_feats, modality: torch.Tensor) -> torch.Tensor:
        """Encoder features of B images and their (B,) channel ids -> (B,) presence logits."""
        x = self.standardised(image_embed, high_res_feats)
        return (x * self.weight.index_select(0, modality)).sum(dim=1) + self.bias.index_select(0, modality)
