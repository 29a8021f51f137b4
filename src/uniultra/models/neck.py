"""FPN neck of SAM2: lateral 1x1 convs to a common width, top-down fusion on chosen levels.

Unlike a classic FPN there is no output conv, and top-down fusion reaches only the levels in
`fpn_top_down_levels` (the two lowest resolutions in every preset); the high-resolution levels keep
their lateral features alone. Each level gets a sine positional encoding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.models.config import NeckConfig
from uniultra.models.position_encoding import PositionEmbeddingSine


class FpnNeck(nn.Module):
    """forward(trunk features, highest resolution first) -> (features, pos_encodings), same order.

    Args:
        config: neck settings (width, top-down levels, interpolation mode).
        backbone_channels: trunk widths from the highest to the lowest resolution level.
    """

    def __init__(self, config: NeckConfig, backbone_channels: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.backbone_channels = tuple(backbone_channels)
        self.position_encoding = PositionEmbeddingSine(config.d_model)
        # convs.0 reads the *lowest*-resolution level, as in the official checkpoints; each conv sits in
        # a container named `conv` so the parameter names are `convs.N.conv.weight`.
        self.convs = nn.ModuleList(
            nn.Sequential(OrderedDict(conv=nn.Conv2d(c, config.d_model, kernel_size=1)))
            for c in reversed(self.backbone_channels)
        )
        self.fpn_top_down_levels = tuple(config.fpn_top_down_levels)
        self.interp_mode = config.fpn_interp_model

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        # Float32 like the official neck: under mixed precision the fused sum is promoted to float32.
        align = None if self.interp_mode == "nearest" else False
        return F.interpolate(x.float(), scale_factor=2.0, mode=self.interp_mode, align_corners=align)

    def forward(
        self, xs: Sequence[torch.Tensor], with_position_encoding: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = len(self.convs)
        if len(xs) != n:
            raise ValueError(f"expected {n} feature levels, got {len(xs)}")
        features: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        previous = None
        # Top-down: from the lowest resolution (last level) to the highest.
        for level in reversed(range(n)):
            out = self.convs[n - 1 - level](xs[level])
            if previous is not None and level in self.fpn_top_down_levels:
                out = out + self._upsample(previous)
            features[level] = previous = out
        # The image path never reads these encodings (the decoder has its own); skipping them saves
        # writing a 256-channel map at every level.
        pos = [self.position_encoding(f) for f in features] if with_position_encoding else []
        return features, pos
