"""Image-level presence head: "is the target in this image at all?", one logit per modality channel.

The prompt generator's highest patch probability was the first presence score, and it did not
separate BUSI's normal scans from lesion scans (their scores overlapped on val): a patch classifier
trained for localisation answers "where is it most likely", not "is it there". This head looks at
the whole embedding at once: a 1x1 projection, then average and max pooling over the grid (the
average sees the overall tissue pattern, the max the strongest local evidence), then one logit per
decoding channel, trained with BCE against "the mask is not empty". It reads the image tokens the
decoder's two-way transformer returns (uniultra.models.modality_decoder): they have attended to the
channel's query, so the evidence is for this modality's target.
"""

from __future__ import annotations

import torch
from torch import nn

HIDDEN_CHANNELS = 64


class PresenceHead(nn.Module):
    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(embed_dim, HIDDEN_CHANNELS, kernel_size=1), nn.GELU())
        self.classify = nn.Linear(2 * HIDDEN_CHANNELS, channels)

    def forward(self, image_tokens: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) image tokens and (B,) channel ids -> (B,) presence logits of each image's channel."""
        hidden = self.project(image_tokens)
        pooled = torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1)
        logits = self.classify(pooled)
        return logits.gather(1, modality.view(-1, 1)).squeeze(1)
