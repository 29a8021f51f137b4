"""Automatic (no-prompt) segmentation: a SAM2 image model with a self-patch prompt generator and a
query-decoupled modality decoder on top (SPEC 5).

The base model is kept whole and unchanged in structure, so the same weights still answer box
prompts through `base.decode`; the automatic path is `decode_auto`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from uniultra.models.image_model import ImageFeatures, SAM2ImageModel
from uniultra.models.modality_decoder import ModalityDecoder
from uniultra.models.patch_prompt import PatchPromptGenerator

# Mask logit given to every pixel of an image the presence gate calls empty.
ABSENT_LOGIT = -32.0


def presence(patch_logits: torch.Tensor) -> torch.Tensor:
    """(B,) probability that the target is in the image: the most confident patch decides."""
    return torch.sigmoid(patch_logits.float().flatten(1).amax(dim=1))


@dataclass(frozen=True)
class AutoHeadConfig:
    modalities: tuple[str, ...] = ("any",)  # one decoding channel per modality/dataset name
    modality_decoder: bool = True  # False: one shared query (a single channel) for every modality
    patch_size: int = 32  # pixels of the model input per prompt-generator patch
    # Presence gate (calibrated on the val split after training, uniultra.auto.calibration): in eval
    # mode an image whose highest patch probability is below this is answered "nothing here".
    presence_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.modalities or any(not isinstance(m, str) or not m for m in self.modalities):
            raise ValueError(f"modalities must be a non-empty list of names, got {self.modalities!r}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modality names must be unique, got {list(self.modalities)}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.presence_threshold is not None and not 0.0 <= self.presence_threshold <= 1.0:
            raise ValueError(f"presence_threshold must lie in [0, 1], got {self.presence_threshold}")

    @property
    def channels(self) -> int:
        return len(self.modalities) if self.modality_decoder else 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoHeadConfig:
        known = {"modalities", "modality_decoder", "patch_size", "presence_threshold"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown auto-head config keys {unknown} (known: {sorted(known)})")
        values = dict(data)
        if "modalities" in values:
            values["modalities"] = tuple(values["modalities"])
        return cls(**values)


@dataclass
class AutoOutput:
    low_res_logits: torch.Tensor  # (B, 1, S/4, S/4)
    patch_logits: torch.Tensor  # (B, 1, S/patch, S/patch)


class AutoSegmenter(nn.Module):
    def __init__(self, base: SAM2ImageModel, config: AutoHeadConfig) -> None:
        super().__init__()
        stride = base.config.backbone_stride
        if config.patch_size % stride or base.image_size % config.patch_size:
            raise ValueError(
                f"patch_size {config.patch_size} must be a multiple of the backbone stride {stride} "
                f"and divide the image size {base.image_size}"
            )
        self.base = base
        self.config = config
        dim = base.config.neck.d_model
        self.prompt_generator = PatchPromptGenerator(dim, config.patch_size // stride)
        self.modality_decoder = ModalityDecoder(base.sam_mask_decoder, config.channels)

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.normalize(images)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        return self.base.encode_image(images)

    def modality_index(self, name: str | None) -> int:
        """Decoding channel of a modality / dataset name."""
        if not self.config.modality_decoder:
            return 0  # one shared channel: every modality decodes through it
        names = self.config.modalities
        if name is None:
            if len(names) == 1:
                return 0
            raise ValueError(f"this model has one decoding channel per modality; name one of {list(names)}")
        if name not in names:
            raise ValueError(f"unknown modality {name!r}; this model knows {list(names)}")
        return names.index(name)

    def decode_auto(self, features: ImageFeatures, modality: torch.Tensor) -> AutoOutput:
        """Masks without prompts: modality (B,) long ids select each image's decoding channel."""
        embed = features.image_embed
        modality = self._check_modality(modality, embed.shape[0])
        patch_logits = self.prompt_generator.patch_logits(embed)
        prompt_encoder = self.base.sam_prompt_encoder
        # No sparse prompt; the dense prompt is the base's "no mask" embedding plus the patch prompt.
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = no_mask + self.prompt_generator.dense_prompt(patch_logits, tuple(embed.shape[-2:]))
        logits = self.modality_decoder(
            self.base.sam_mask_decoder, embed, prompt_encoder.get_dense_pe(), dense,
            features.high_res_feats, modality,
        )
        if self.config.presence_threshold is not None and not self.training:
            absent = presence(patch_logits) < self.config.presence_threshold
            logits = torch.where(absent.view(-1, 1, 1, 1), torch.full_like(logits, ABSENT_LOGIT), logits)
        return AutoOutput(low_res_logits=logits, patch_logits=patch_logits)

    def forward(self, images: torch.Tensor, modality: torch.Tensor) -> AutoOutput:
        """Training entry: normalised (B, 3, S, S) images and their modality ids (B,)."""
        return self.decode_auto(self.encode_image(images), modality)

    def _check_modality(self, modality: torch.Tensor, batch: int) -> torch.Tensor:
        modality = torch.as_tensor(modality, device=self.modality_decoder.queries.weight.device)
        if modality.ndim == 0:
            modality = modality.expand(batch)
        if modality.shape != (batch,):
            raise ValueError(f"expected {batch} modality ids, got shape {tuple(modality.shape)}")
        if modality.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"modality ids must be integers, got {modality.dtype}")
        channels = self.config.channels
        if batch and (int(modality.min()) < 0 or int(modality.max()) >= channels):
            raise ValueError(f"modality ids must lie in [0, {channels}), got {modality.tolist()}")
        return modality.long()
