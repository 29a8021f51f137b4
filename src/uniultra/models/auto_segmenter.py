"""Automatic (no-prompt) segmentation: a SAM2 image model with a self-patch prompt generator and a
query-decoupled modality decoder on top (SPEC 5).

The base model is kept whole and unchanged in structure, so the same weights still answer box
prompts through `base.decode`; the automatic path is `decode_auto`. The automatic path may run on an
encoder of its own (`own_encoder`, see `with_own_encoder`): one trained on whole scans gives a far
better presence score and no-prompt mask than a box model's encoder trained on crops around a target.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from uniultra.models.image_model import ImageFeatures, SAM2ImageModel
from uniultra.models.mask_decoder import MaskDecoder
from uniultra.models.modality_decoder import ModalityDecoder
from uniultra.models.patch_prompt import PatchPromptGenerator
from uniultra.models.presence_head import PresenceHead
from uniultra.models.presence_probe import PresenceProbe

# Mask logit given to every pixel of an image the presence gate calls empty.
ABSENT_LOGIT = -32.0


def presence(out: AutoOutput) -> torch.Tensor:
    """(B,) probability that the target is in the image: the presence probe's or head's when the model
    has one, else the most confident patch of the prompt generator."""
    if out.presence_logits is not None:
        return torch.sigmoid(out.presence_logits.float())
    return torch.sigmoid(out.patch_logits.float().flatten(1).amax(dim=1))


@dataclass(frozen=True)
class AutoHeadConfig:
    modalities: tuple[str, ...] = ("any",)  # one decoding channel per modality/dataset name
    modality_decoder: bool = True  # False: one shared query (a single channel) for every modality
    patch_size: int = 32  # pixels of the model input per prompt-generator patch
    # Presence gate (calibrated on the val split after training, uniultra.auto.calibration): in eval
    # mode an image whose presence probability (`presence`) is below this is answered "nothing here".
    presence_threshold: float | None = None
    # An image-level presence head (uniultra.models.presence_head); without one, the highest patch
    # probability of the prompt generator is the presence score (checkpoints before the head).
    presence_head: bool = False
    # A presence probe on the encoder's pooled features (uniultra.models.presence_probe), fitted after
    # training (uniultra.auto.presence_fit); when present it gives the presence score instead of the head.
    presence_probe: bool = False
    # A copy of the base's mask decoder for the automatic path, so that training it leaves the base's
    # box / point answers exactly as they were (a head shipped inside its base model needs this).
    own_decoder: bool = False
    # An image encoder of its own for the automatic path (`AutoSegmenter.encoder`), beside the base's,
    # which then only answers prompts. Needs `own_decoder`: that copy also holds the encoder's high-res
    # projections.
    own_encoder: bool = False

    def __post_init__(self) -> None:
        if not self.modalities or any(not isinstance(m, str) or not m for m in self.modalities):
            raise ValueError(f"modalities must be a non-empty list of names, got {self.modalities!r}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modality names must be unique, got {list(self.modalities)}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.presence_threshold is not None and not 0.0 <= self.presence_threshold <= 1.0:
            raise ValueError(f"presence_threshold must lie in [0, 1], got {self.presence_threshold}")
        if self.own_encoder and not self.own_decoder:
            raise ValueError("own_encoder needs own_decoder (the copy holds the encoder's high-res projections)")

    @property
    def channels(self) -> int:
        return len(self.modalities) if self.modality_decoder else 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoHeadConfig:
        known = {"modalities", "modality_decoder", "patch_size", "presence_threshold", "presence_head",
                 "presence_probe", "own_decoder", "own_encoder"}
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
    presence_logits: torch.Tensor | None = None  # (B,) with a presence probe or head


# Keys of an own encoder's state that are stored: its mask decoder IS the head's decoder copy (stored
# once, as `decoder.*`), of which it uses only the high-res projections.
ENCODER_KEYS = ("image_encoder.", "no_mem_embed", "sam_prompt_encoder.")


class AutoSegmenter(nn.Module):
    def __init__(self, base: SAM2ImageModel, config: AutoHeadConfig, encoder: SAM2ImageModel | None = None) -> None:
        """`encoder`: the automatic path's own image model (only with `config.own_encoder`); its mask
        decoder is replaced by the head's copy (`decoder`), which keeps the encoder's projections."""
        super().__init__()
        if config.own_encoder != (encoder is not None):
            raise ValueError("an encoder of its own is given exactly when config.own_encoder is true")
        features = encoder if encoder is not None else base
        stride = features.config.backbone_stride
        if config.patch_size % stride or features.image_size % config.patch_size:
            raise ValueError(
                f"patch_size {config.patch_size} must be a multiple of the backbone stride {stride} "
                f"and divide the image size {features.image_size}"
            )
        if features.image_size != base.image_size:
            raise ValueError(f"the automatic path's encoder runs at {features.image_size} px, the base at "
                             f"{base.image_size} px: both must take the same input")
        self.base = base
        self.config = config
        dim = features.config.neck.d_model
        self.prompt_generator = PatchPromptGenerator(dim, config.patch_size // stride)
        self.modality_decoder = ModalityDecoder(features.sam_mask_decoder, config.channels)
        self.presence_head = PresenceHead(dim, config.channels) if config.presence_head else None
        self.decoder = copy.deepcopy(features.sam_mask_decoder) if config.own_decoder else None
        self.encoder = encoder
        if encoder is not None:
            encoder.sam_mask_decoder = self.decoder
        self.presence_probe = self._new_probe() if config.presence_probe else None

    @property
    def features_model(self) -> SAM2ImageModel:
        """The image model whose encoder (and prompt encoder's no-mask embedding) the automatic path uses."""
        return self.encoder if self.encoder is not None else self.base

    def head_state(self) -> dict[str, torch.Tensor]:
        """Every weight that is not the base's, as stored in a checkpoint (an own encoder's shared
        decoder only once, as `decoder.*`)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith("base.") and not k.startswith("encoder.sam_mask_decoder.")}

    def _new_probe(self) -> PresenceProbe:
        decoder = self.auto_decoder
        high_res = (decoder.conv_s0.out_channels, decoder.conv_s1.out_channels) if decoder.use_high_res_features else ()
        return PresenceProbe(self.features_model.config.neck.d_model, high_res, self.config.channels)

    def attach_presence_probe(self) -> PresenceProbe:
        """Add an unfitted presence probe to a head trained without one (e.g. an already shipped model)."""
        self.config = dataclasses.replace(self.config, presence_probe=True)
        device = self.modality_decoder.queries.weight.device
        self.presence_probe = self._new_probe().to(device)
        return self.presence_probe

    def presence_logits(self, features: ImageFeatures, image_tokens: torch.Tensor,
                        modality: torch.Tensor) -> torch.Tensor | None:
        """(B,) presence logits: the probe's (encoder features), else the head's (decoder tokens), else None."""
        if self.presence_probe is not None:
            return self.presence_probe(features.image_embed, features.high_res_feats, modality)
        return None if self.presence_head is None else self.presence_head(image_tokens, modality)

    @property
    def auto_decoder(self) -> MaskDecoder:
        """The mask decoder the automatic path runs: its own copy, or the base's."""
        return self.decoder if self.decoder is not None else self.base.sam_mask_decoder

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.normalize(images)

    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """The automatic path's features (its own encoder's when it has one; box prompts need the base's)."""
        return self.features_model.encode_image(images)

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

    def decode_auto(self, features: ImageFeatures, modality: torch.Tensor, gated: bool = True) -> AutoOutput:
        """Masks without prompts: modality (B,) long ids select each image's decoding channel. In eval
        mode and `gated`, an image below the config's presence threshold gets an all-absent mask (the
        predictors pass gated=False and apply a gate chosen per call)."""
        embed = features.image_embed
        modality = self._check_modality(modality, embed.shape[0])
        patch_logits = self.prompt_generator.patch_logits(embed)
        prompt_encoder = self.features_model.sam_prompt_encoder
        # No sparse prompt; the dense prompt is the base's "no mask" embedding plus the patch prompt.
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = no_mask + self.prompt_generator.dense_prompt(patch_logits, tuple(embed.shape[-2:]))
        logits, image_tokens = self.modality_decoder(
            self.auto_decoder, embed, prompt_encoder.get_dense_pe(), dense, features.high_res_feats, modality,
        )
        out = AutoOutput(low_res_logits=logits, patch_logits=patch_logits,
                         presence_logits=self.presence_logits(features, image_tokens, modality))
        if gated and self.config.presence_threshold is not None and not self.training:
            absent = presence(out) < self.config.presence_threshold
            out.low_res_logits = torch.where(absent.view(-1, 1, 1, 1), torch.full_like(logits, ABSENT_LOGIT), logits)
        return out

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


def with_own_encoder(head: AutoSegmenter, base: SAM2ImageModel) -> AutoSegmenter:
    """`head` (trained on its base's features, with a decoder copy) moved onto `base`: `base` answers
    prompts, `head`'s base stays the automatic path's encoder. Neither input is changed."""
    if not head.config.own_decoder:
        raise ValueError("an automatic head moves onto another base only with a decoder of its own (own_decoder)")
    if head.encoder is not None:
        raise ValueError("this automatic head already runs on an encoder of its own")
    features = copy.deepcopy(head.base)
    # The copy's high-res projections are never trained (the encoding step applies the encoder's own):
    # the encoder's values are the ones the head's features were made with.
    projections = {k: v for k, v in features.sam_mask_decoder.state_dict().items()
                   if k.startswith(("conv_s0.", "conv_s1."))}
    combined = AutoSegmenter(base, dataclasses.replace(head.config, own_encoder=True), encoder=features)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("base.")}
    state.update({f"decoder.{k}": v for k, v in projections.items()})
    missing, unexpected = combined.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("base.", "encoder.")) for k in missing):
        raise ValueError(f"head weights do not fit (missing {missing[:4]}, unexpected {unexpected[:4]})")
    return combined.to(next(head.parameters()).device)
