"""Parameters and FLOPs of an image model (`uniultra info`, `uniultra bench speed`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uniultra.evaluation.efficiency import count_flops, count_parameters
from uniultra.models.auto_segmenter import AutoSegmenter
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft.apply import apply_peft


@dataclass
class AutoInfo:
    """The automatic (no-prompt) head of a model that has one."""

    channels: list[str]
    head_params: int  # every weight the automatic path adds (its own encoder included)
    own_encoder_params: int  # 0: the automatic path runs on the prompt model's encoder
    own_encoder_gflops: float


@dataclass
class ModelInfo:
    preset: str
    image_size: int
    trunk_params: int
    neck_params: int
    encoder_params: int
    prompt_encoder_params: int
    mask_decoder_params: int
    whole_params: int
    encoder_gflops: float
    high_res_projection_gflops: float
    decoder_gflops_per_prompt: float
    auto: AutoInfo | None = None


def describe(model: SAM2ImageModel | AutoSegmenter) -> ModelInfo:
    """Counts of the image model that answers prompts, and of an automatic head when `model` has one."""
    if isinstance(model, AutoSegmenter):
        info = describe(model.base)
        info.auto = describe_auto(model)
        return info
    enc = model.image_encoder
    enc_flops, proj_flops, dec_flops = count_model_flops(model)
    return ModelInfo(
        preset=model.config.name,
        image_size=model.image_size,
        trunk_params=count_parameters(enc.trunk),
        neck_params=count_parameters(enc.neck),
        encoder_params=count_parameters(enc),
        prompt_encoder_params=count_parameters(model.sam_prompt_encoder),
        mask_decoder_params=count_parameters(model.sam_mask_decoder),
        whole_params=count_parameters(model),
        encoder_gflops=enc_flops / 1e9,
        high_res_projection_gflops=proj_flops / 1e9,
        decoder_gflops_per_prompt=dec_flops / 1e9,
    )


def describe_auto(model: AutoSegmenter) -> AutoInfo:
    encoder = model.encoder
    own_params = 0 if encoder is None else count_parameters(encoder.image_encoder)
    return AutoInfo(
        channels=list(model.config.modalities),
        head_params=sum(p.numel() for name, p in model.named_parameters() if not name.startswith("base.")),
        own_encoder_params=own_params,
        own_encoder_gflops=0.0 if encoder is None else count_model_flops(encoder)[0] / 1e9,
    )


def count_model_flops(model: SAM2ImageModel) -> tuple[int, int, int]:
    """FLOPs of the image encoder (trunk + neck), of the decoder's once-per-image high-res
    projections (conv_s0, conv_s1), and of one box-prompt decoding; attention included.

    The count runs on shape-only "meta" copies, so even Hiera-L at 1024 costs no real compute; a
    copy has the model's PEFT modules (CH-Adapters run in every block they sit in).
    """
    meta = _shape_twin(model) if _on_real_device(model) else model
    size = model.image_size
    images = torch.zeros(1, 3, size, size, device="meta")
    box = torch.tensor([[0.1 * size, 0.1 * size, 0.6 * size, 0.7 * size]], device="meta")
    with torch.inference_mode():
        encoder_flops = count_flops(lambda: meta.image_encoder(images))
        per_image_flops = count_flops(lambda: meta.encode_image(images))
        features = meta.encode_image(images)
        decoder_flops = count_flops(lambda: meta.decode(features, boxes=box))
    return encoder_flops, per_image_flops - encoder_flops, decoder_flops


def _shape_twin(model: SAM2ImageModel) -> SAM2ImageModel:
    """A "meta" model of `model`'s architecture, its PEFT modules included."""
    twin = SAM2ImageModel(model.config)
    peft = getattr(model, "peft_config", None)
    if peft is not None:
        apply_peft(twin, peft)
    return twin.to("meta")


def _on_real_device(model: torch.nn.Module) -> bool:
    return next(model.parameters()).device.type != "meta"


def format_info(info: ModelInfo) -> str:
    rows = [
        ("Hiera trunk", info.trunk_params),
        ("FPN neck", info.neck_params),
        ("image encoder (trunk + neck)", info.encoder_params),
        ("prompt encoder", info.prompt_encoder_params),
        ("mask decoder", info.mask_decoder_params),
        ("whole image model", info.whole_params),
    ]
    # Official checkpoints also hold video-memory modules (memory attention/encoder, object
    # pointers); they are not part of the image path and are not counted here.
    lines = [f"preset {info.preset}, input {info.image_size}x{info.image_size}", "parameters:"]
    lines += [f"  {name:<30} {n / 1e6:10.3f} M  ({n:,})" for name, n in rows]
    lines += [
        "FLOPs (attention counted; 1 multiply-add = 2 FLOPs):",
        f"  {'image encoder (trunk + neck)':<30} {info.encoder_gflops:10.1f} G",
        f"  {'high-res projections':<30} {info.high_res_projection_gflops:10.2f} G  (once per image)",
        f"  {'decoder, one box prompt':<30} {info.decoder_gflops_per_prompt:10.2f} G",
    ]
    auto = info.auto
    if auto is not None:
        lines += [f"automatic mode (no prompt), channels {', '.join(auto.channels)}:",
                  f"  {'head, all its weights':<30} {auto.head_params / 1e6:10.3f} M  ({auto.head_params:,})"]
        if auto.own_encoder_params:
            lines += [f"  {'of which its own encoder':<30} {auto.own_encoder_params / 1e6:10.3f} M  "
                      f"({auto.own_encoder_params:,}; {auto.own_encoder_gflops:.1f} GFLOPs, once per image "
                      "segmented without a prompt)"]
    return "\n".join(lines)
