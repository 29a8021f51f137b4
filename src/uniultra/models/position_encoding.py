"""Sine positional encoding of a feature map (the one the FPN neck attaches to every level).

Same numbers as the official `PositionEmbeddingSine` (DETR style, normalised coordinates):
the first half of the channels encodes the row, the second half the column, each as
interleaved sin/cos pairs of geometrically spaced frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """Map a (B, C, H, W) tensor to its (B, num_pos_feats, H, W) positional encoding.

    Args:
        num_pos_feats: output channels (even); half for rows, half for columns.
        temperature: base of the frequency ladder.
        normalize: scale coordinates to (0, scale] so the encoding does not depend on the map size.
        scale: range of the normalised coordinates (2*pi by default).
    """

    def __init__(
        self,
        num_pos_feats: int = 256,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_pos_feats % 2:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _encode_axis(self, length: int, device: torch.device) -> torch.Tensor:
        """(length, num_pos_feats // 2) encoding of positions 1..length along one axis."""
        half = self.num_pos_feats // 2
        pos = torch.arange(1, length + 1, dtype=torch.float32, device=device)
        if self.normalize:
            # Same operation order as the official code (x / (last + eps) * scale) for bitwise equality.
            pos = pos / (pos[-1:] + 1e-6) * self.scale
        # Channels 2k and 2k+1 share one frequency; the first of the pair gets sin, the second cos.
        idx = torch.arange(half, dtype=torch.float32, device=device)
        freqs = self.temperature ** (2 * (idx // 2) / half)
        angles = pos[:, None] / freqs
        return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        half = self.num_pos_feats // 2
        # The encoding is separable: build the two 1-D tables and write each half of the output once,
        # instead of computing sin/cos on the full (H, W) grid.
        rows = self._encode_axis(height, x.device).t()  # (half, H)
        cols = self._encode_axis(width, x.device).t()  # (half, W)
        out = torch.empty(batch, self.num_pos_feats, height, width, dtype=x.dtype, device=x.device)
        out[:, :half] = rows[:, :, None]
        out[:, half:] = cols[:, None, :]
        return out
