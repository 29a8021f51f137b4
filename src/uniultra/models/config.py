"""Typed configuration of the SAM2 image model and its presets.

Field names follow the official SAM2 configs so that a user reading both sees the same words.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class HieraConfig:
    embed_dim: int = 96
    num_heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_att_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    window_pos_embed_bkg_spatial_size: tuple[int, int] = (7, 7)
    q_pool: int = 3
    q_stride: tuple[int, int] = (2, 2)
    dim_mul: float = 2.0
    head_mul: float = 2.0
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channel width at the end of each stage (C, 2C, 4C, 8C)."""
        return tuple(int(self.embed_dim * self.dim_mul**i) for i in range(len(self.stages)))


@dataclass(frozen=True)
class NeckConfig:
    d_model: int = 256
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    fpn_interp_model: str = "nearest"
    scalp: int = 1


@dataclass(frozen=True)
class DecoderConfig:
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_high_res_features: bool = True
    iou_prediction_use_sigmoid: bool = True
    pred_obj_scores: bool = True
    pred_obj_scores_mlp: bool = True
    use_multimask_token_for_obj_ptr: bool = True
    dynamic_multimask_via_stability: bool = True
    dynamic_multimask_stability_delta: float = 0.05
    dynamic_multimask_stability_thresh: float = 0.98
    mask_in_chans: int = 16
    # A fixed [1, 2, 1] blur after the last (1) or both (2) stride-2 transposed convs of the upscaling
    # path; 0 = none. No weights, so official checkpoints still load; off by default, so their outputs
    # are unchanged. Kernel = stride gives each of the 4 output phases its own kernel: a period-2/4
    # lattice in the logits that shows as pin-holes where the model is unsure
    # (benchmarks/probe_lattice.py). 1 is nearly neutral on a model trained without it; 2 needs training.
    upscale_blur: int = 0
    # The box's inscribed ellipse as the dense mask prompt of every box prompt given no mask
    # (uniultra.models.box_prior). No weights either; off by default (SAM2's behaviour).
    box_prior: bool = False
    # Weight of the same ellipse added to every mask's logits of a box prompt, at the masks' own
    # resolution (uniultra.models.box_prior.box_logit_prior); 0 = off (SAM2's behaviour). No weights.
    box_logit_prior: float = 0.0
    # Two more learned point types (labels 4, 5: uniultra.models.prompt_labels) for the corners of
    # an exact box. Off by default: official checkpoints have the four SAM types only.
    exact_box_tokens: bool = False


# DecoderConfig fields that change what the decoder computes from a box without any weights.
BOX_PRIOR_FIELDS = ("box_prior", "box_logit_prior")


@dataclass(frozen=True)
class ImageModelConfig:
    """A whole SAM2 image model: trunk, neck, prompt encoder and mask decoder at one input size."""

    name: str = "tiny"
    image_size: int = 1024
    trunk: HieraConfig = field(default_factory=HieraConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    backbone_stride: int = 16

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.image_size % 32:
            raise ValueError(f"image_size must be a positive multiple of 32, got {self.image_size}")

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 at 1024 input)."""
        return self.image_size // self.backbone_stride

    def with_size(self, image_size: int) -> ImageModelConfig:
        return replace(self, image_size=image_size)

    def with_box_priors_of(self, other: ImageModelConfig) -> ImageModelConfig:
        """This config with `other`'s box priors: they have no weights, so a trained model can start
        (or stop) using them without any change to its checkpoint."""
        priors = {name: getattr(other.decoder, name) for name in BOX_PRIOR_FIELDS}
        return replace(self, decoder=replace(self.decoder, **priors))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageModelConfig:
        data = dict(data)
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown image-model config keys: {sorted(unknown)}")
        sub = {"trunk": HieraConfig, "neck": NeckConfig, "decoder": DecoderConfig}
        for key, typ in sub.items():
            if key in data and isinstance(data[key], dict):
                data[key] = _build(typ, data[key], key)
        return cls(**data)


def _build(typ: type, values: dict[str, Any], where: str) -> Any:
    unknown = set(values) - set(typ.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown keys in '{where}' config: {sorted(unknown)}")
    # YAML and JSON give lists; the dataclasses are frozen and hashable, so store tuples.
    return typ(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


PRESETS: dict[str, HieraConfig] = {
    "tiny": HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9)),
    "small": HieraConfig(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13)),
    # base_plus keeps the official Hiera default background size (14, 14): its yaml does not override it.
    "base_plus": HieraConfig(
        embed_dim=112,
        num_heads=2,
        stages=(2, 3, 16, 3),
        global_att_blocks=(12, 16, 20),
        window_pos_embed_bkg_spatial_size=(14, 14),
    ),
    "large": HieraConfig(
        embed_dim=144,
        num_heads=2,
        stages=(2, 6, 36, 4),
        global_att_blocks=(23, 33, 43),
        window_spec=(8, 4, 16, 8),
    ),
    "mini": HieraConfig(embed_dim=16, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9)),
}


def preset(name: str, image_size: int = 1024) -> ImageModelConfig:
    """Config of a named preset (tiny, small, base_plus, large, mini) at a given input size."""
    key = name.replace("-", "_").replace("+", "_plus").lower()
    aliases = {"t": "tiny", "s": "small", "b_plus": "base_plus", "b": "base_plus", "l": "large"}
    key = aliases.get(key, key)
    if key not in PRESETS:
        raise ValueError(f"unknown preset '{name}'; choose one of {sorted(PRESETS)}")
    return ImageModelConfig(name=key, image_size=image_size, trunk=PRESETS[key])
