"""SAM2 image encoder: Hiera trunk + FPN neck, minus the lowest-resolution level ("scalp")."""

from __future__ import annotations

import torch
from torch import nn

from uniultra.models.config import ImageModelConfig
from uniultra.models.hiera import Hiera
from uniultra.models.neck import FpnNeck


class ImageEncoder(nn.Module):
    """forward(images (B, 3, H, W)) -> dict, as the official ImageEncoder:

    - "backbone_fpn": neck features, highest resolution first, (B, d_model, H/s, W/s) for s = 4, 8, 16
      (with the default scalp of 1);
    - "vision_pos_enc": their sine positional encodings, same shapes;
    - "vision_features": the last (lowest-resolution) kept level, i.e. backbone_fpn[-1].

    H and W must be multiples of 32; they need not equal config.image_size.
    """

    def __init__(self, config: ImageModelConfig) -> None:
        super().__init__()
        self.config = config
        self.trunk = Hiera(config.trunk)
        self.neck = FpnNeck(config.neck, self.trunk.stage_dims)
        self.scalp = config.neck.scalp

    def forward(
        self, images: torch.Tensor, with_position_encoding: bool = True
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """`with_position_encoding=False` leaves `vision_pos_enc` empty (the image path does not use it)."""
        features, pos = self.neck(self.trunk(images), with_position_encoding)
        if self.scalp > 0:
            # The stride-32 level only feeds the top-down path; SAM2 does not use it directly.
            features, pos = features[: -self.scalp], pos[: -self.scalp]
        return {"vision_features": features[-1], "vision_pos_enc": pos, "backbone_fpn": features}
