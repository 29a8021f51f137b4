"""Export the SAM2 image model to two ONNX graphs: image encoder and prompt-conditioned decoder.

- encoder: `image` (1, 3, S, S) normalised RGB -> `image_embed` (1, 256, S/16, S/16),
  `high_res_feats_0` (1, 32, S/4, S/4), `high_res_feats_1` (1, 64, S/8, S/8); i.e.
  `SAM2ImageModel.encode_image`.
- decoder: those three plus `point_coords` (N, P, 2) float32 in model-input pixels (x, y),
  `point_labels` (N, P) int32 (-1 pad, 0 negative, 1 positive, 2/3 box corners; a box is two
  points placed before the clicks), `mask_input` (N, 1, S/4, S/4) float32 low-res logits and
  `has_mask_input` (1,) float32 (1 to use the mask, 0 to ignore it) -> `masks` (N, 1, S/4, S/4)
  single-mask logits with SAM2's stability fallback, `iou_scores` (N, 1), `multimask_masks`
  (N, 3, S/4, S/4), `multimask_iou_scores` (N, 3), `object_score_logits` (N, 1). N and P are
  dynamic.

Both graphs are checked against PyTorch on the export inputs before anything is written, and
every file lands atomically; the metadata JSON is written last and lists each file's sha256.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from uniultra import __version__
from uniultra.atomic import atomic_write, atomic_write_text, file_sha256
from uniultra.export.auto_graph import AutoGraph, auto_metadata
from uniultra.inference import onnx_format as md
from uniultra.inference.prompts import LOGIT_CLAMP
from uniultra.models.auto_segmenter import AutoSegmenter
from uniultra.models.box_prior import box_ellipse_logits
from uniultra.models.image_model import PIXEL_MEAN, PIXEL_STD, SAM2ImageModel
from uniultra.models.prompt_labels import BOX_BOTTOM_RIGHT, BOX_TOP_LEFT

# opset 20 has a native Gelu op (at 18 the exporter writes Erf arithmetic, which onnxruntime
# does not fuse back: mini encoder 8% slower at 1024); onnxruntime >= 1.17 runs opset 20.
DEFAULT_OPSET = 20
# Largest prompt batch / point count the exported decoder is declared for (ONNX keeps them symbolic).
MAX_DYNAMIC = 1024
# Export-time check of ONNX Runtime against PyTorch (fp32): logits that differ by more than
# this abort the export. Observed differences are ~1e-5; this catches a wrong graph, not noise.
EXPORT_CHECK_ATOL = 1e-2


class ExportError(RuntimeError):
    """The model could not be exported or the exported graph disagrees with PyTorch."""


@dataclass
class ExportResult:
    out_dir: Path
    metadata_path: Path
    files: dict[str, Path]
    metadata: dict[str, Any] = field(repr=False)
    check: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The two graphs


class EncoderGraph(nn.Module):
    """`SAM2ImageModel.encode_image` as a module with flat outputs.

    With `fold_high_res=True` the neck's 1x1 lateral convs of levels 0 and 1 are composed with
    the decoder's conv_s0 / conv_s1 (a 1x1 conv after a 1x1 conv is one 1x1 conv): the exported
    graph then never materialises the 256-channel stride-4 and stride-8 maps, which at 1024 px
    are 64 MB and 16 MB of writes plus 2.3 GFLOPs, for an identical result up to float rounding.
    Only valid when those levels take no top-down input (true for every SAM2 preset); otherwise
    the plain path is exported.
    """

    def __init__(self, model: SAM2ImageModel, fold_high_res: bool = True) -> None:
        super().__init__()
        self.model = model
        self.folded = fold_high_res and _foldable(model)
        if self.folded:
            neck, decoder = model.image_encoder.neck, model.sam_mask_decoder
            n = len(neck.convs)
            # convs[i] reads level n-1-i: level 0 is the last conv.
            self.fused_s0 = _compose_1x1(neck.convs[n - 1].conv, decoder.conv_s0)
            self.fused_s1 = _compose_1x1(neck.convs[n - 2].conv, decoder.conv_s1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.folded:
            f = self.model.encode_image(image)
            return f.image_embed, f.high_res_feats[0], f.high_res_feats[1]
        model = self.model
        encoder = model.image_encoder
        neck = encoder.neck
        xs = encoder.trunk(image)
        n = len(neck.convs)
        previous = None
        levels: dict[int, torch.Tensor] = {}
        # FpnNeck.forward restricted to levels >= 2 (top-down from the lowest resolution).
        for level in reversed(range(2, n)):
            out = neck.convs[n - 1 - level](xs[level])
            if previous is not None and level in neck.fpn_top_down_levels:
                out = out + neck._upsample(previous)
            levels[level] = previous = out
        embed = levels[n - 1 - encoder.scalp] + model.no_mem_embed.view(1, -1, 1, 1)
        return embed, self.fused_s0(xs[0]), self.fused_s1(xs[1])


def _foldable(model: SAM2ImageModel) -> bool:
    """Plain 1x1 convs on levels 0 and 1 without top-down input (adapters or LoRA there: no fold)."""
    neck, encoder, decoder = model.image_encoder.neck, model.image_encoder, model.sam_mask_decoder
    n = len(neck.convs)
    if not decoder.use_high_res_features or n - encoder.scalp != 3 or {0, 1} & set(neck.fpn_top_down_levels):
        return False
    convs = [getattr(neck.convs[n - 1], "conv", None), getattr(neck.convs[n - 2], "conv", None),
             decoder.conv_s0, decoder.conv_s1]
    return all(type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.groups == 1 for c in convs)


def _compose_1x1(first: nn.Conv2d, second: nn.Conv2d) -> nn.Conv2d:
    """One 1x1 conv equal to `second(first(x))` (computed in float64, stored in float32)."""
    w1 = first.weight.detach().double().flatten(1)  # (mid, in)
    w2 = second.weight.detach().double().flatten(1)  # (out, mid)
    b1 = first.bias.detach().double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64)
    b2 = second.bias.detach().double() if second.bias is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
    fused = nn.Conv2d(w1.shape[1], w2.shape[0], kernel_size=1)
    with torch.no_grad():
        fused.weight.copy_((w2 @ w1).view(w2.shape[0], w1.shape[1], 1, 1).to(first.weight.dtype))
        fused.bias.copy_((w2 @ b1 + b2).to(first.weight.dtype))
    return fused


class DecoderGraph(nn.Module):
    """Prompt encoder + mask decoder for one image's features and N prompt sets of P points."""

    def __init__(self, model: SAM2ImageModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image_embed: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        prompt_encoder = self.model.sam_prompt_encoder
        decoder = self.model.sam_mask_decoder
        # The predictor merges boxes into points and calls the prompt encoder with boxes=None,
        # so a padding token is always appended (what SAM2 was trained with).
        sparse = prompt_encoder._embed_points(point_coords, point_labels, pad=True)
        n = sparse.shape[0]
        h, w = prompt_encoder.image_embedding_size
        no_mask = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        if self.model.config.decoder.box_prior:
            prior, has_box = box_ellipse_logits(point_coords, point_labels, prompt_encoder.mask_input_size,
                                                self.model.config.image_size)
            no_mask = prompt_encoder.masks_where(prior, has_box)
        dense = torch.where(has_mask_input.reshape(1, 1, 1, 1) > 0.5, prompt_encoder._embed_masks(mask_input), no_mask)
        return _graph_outputs(decoder, *decoder.predict_masks(
            image_embed.expand(n, -1, -1, -1),
            prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            repeat_image=False,
            high_res_features=[high_res_feats_0, high_res_feats_1],
            mask_bias=self.model.mask_bias((point_coords, point_labels)),
        ))


class BoxDecoderGraph(DecoderGraph):
    """`DecoderGraph` for prompts without a mask input, on the embedding as (1, h*w, C) tokens
    (md.BOX_DECODER_INPUTS): the same masks, without a per-prompt layout change or mask branch."""

    def forward(  # type: ignore[override]
        self,
        image_tokens: torch.Tensor,
        high_res_feats_0: torch.Tensor,
        high_res_feats_1: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        prompt_encoder = self.model.sam_prompt_encoder
        decoder = self.model.sam_mask_decoder
        sparse = prompt_encoder._embed_points(point_coords, point_labels, pad=True)
        return _graph_outputs(decoder, *decoder.predict_masks_from_tokens(
            image_tokens.expand(sparse.shape[0], -1, -1),
            prompt_encoder.get_dense_pe(),
            sparse,
            prompt_encoder.no_mask_embed.weight.reshape(1, 1, -1),
            high_res_features=[high_res_feats_0, high_res_feats_1],
            mask_bias=self.model.mask_bias((point_coords, point_labels)),
        ))


def _graph_outputs(decoder: nn.Module, masks: torch.Tensor, iou: torch.Tensor, _tokens: torch.Tensor,
                   obj: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """md.DECODER_OUTPUTS from `predict_masks`' four outputs."""
    single, single_iou = _single_mask(decoder, masks, iou)
    return single, single_iou, masks[:, 1:], iou[:, 1:], obj


def _single_mask(decoder: nn.Module, masks: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskDecoder's inference-time single-mask selection, written with ops whose batch size stays
    symbolic under torch.export (take_along_dim specialises it): same arithmetic, same result."""
    if not decoder.dynamic_multimask_via_stability:
        return masks[:, :1], iou[:, :1]
    multi_masks, multi_iou = masks[:, 1:], iou[:, 1:]
    best = multi_iou.argmax(dim=-1, keepdim=True)
    best_iou = multi_iou.gather(1, best)
    index = best[:, :, None, None].expand(-1, -1, multi_masks.shape[2], multi_masks.shape[3])
    best_masks = multi_masks.gather(1, index)
    stable = decoder._get_stability_scores(masks[:, :1]) >= decoder.dynamic_multimask_stability_thresh
    return (torch.where(stable[:, :, None, None], masks[:, :1], best_masks),
            torch.where(stable, iou[:, :1], best_iou))


# ---------------------------------------------------------------------------------------------
# Export


def example_inputs(model: SAM2ImageModel, seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A normalised random image and a decoder prompt batch (2 prompts: box + click, 3 points).

    The prompt batch and point count are 2 and 3, not 1: torch.export specialises size-1 dims.
    """
    s = model.image_size
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, s, s, generator=g)
    coords = torch.tensor([[[0.1, 0.2], [0.6, 0.7], [0.3, 0.4]], [[0.2, 0.1], [0.9, 0.8], [0.5, 0.5]]]) * s
    labels = torch.tensor([[BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, 1], [BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, 0]], dtype=torch.int32)
    mask = torch.zeros(2, 1, s // 4, s // 4)
    has_mask = torch.zeros(1)
    return image, (coords, labels, mask, has_mask)


ATTENTION_CHOICES = ("ort", "onnx")


def _mha_op():
    """onnxscript handle of onnxruntime's com.microsoft MultiHeadAttention contrib op.

    The schema is declared here (onnx does not ship contrib schemas); only the inputs and
    attributes used by `_sdpa_as_mha` are listed.
    """
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    schema = OpSchema(
        "MultiHeadAttention",
        "com.microsoft",
        1,
        inputs=[OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)"], "float32 only")],
        attributes=[
            OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads", required=True),
            OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "softmax scale", required=False),
        ],
    )
    return Op(Opset("com.microsoft", 1), "MultiHeadAttention", schema)


def _sdpa_as_mha(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """aten.scaled_dot_product_attention -> com.microsoft.MultiHeadAttention.

    The standard translation (MatMul, Softmax, MatMul) writes the whole (heads, L, S) score
    matrix: 268 MB per global-attention block of Hiera at 1024 px. onnxruntime's CPU
    MultiHeadAttention runs a tiled (flash) kernel instead. (B, H, L, D) tensors become the
    op's (B, L, H*D) layout and back; the transposes cancel against the ones around them.
    """
    from onnxscript import opset18 as op

    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise ExportError("attention with a mask, causal attention or dropout has no MultiHeadAttention "
                          "mapping here: export with attention='onnx'")
    heads, head_dim = query.shape[1], query.shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ExportError("attention heads and head size must be static to use MultiHeadAttention")
    flat = op.Constant(value_ints=[0, 0, -1])
    q, k, v = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), flat) for t in (query, key, value))
    attributes = {"num_heads": heads} if scale is None else {"num_heads": heads, "scale": float(scale)}
    out = _mha_op()(q, k, v, **attributes)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, head_dim]))
    return op.Transpose(out, perm=[0, 2, 1, 3])


def _onnx_proto(module: nn.Module, args: tuple, input_names, output_names, opset: int, dynamic_shapes=None,
                attention: str = "ort"):
    """torch.export -> ONNX ModelProto, quietly (the exporter prints progress and warnings)."""
    # The exporter logs "torchvision is not installed" and prints progress lines; neither helps a user.
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module.eval(),
                args,
                None,
                dynamo=True,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=(
                    {torch.ops.aten.scaled_dot_product_attention.default: _sdpa_as_mha} if attention == "ort" else None
                ),
                optimize=True,
                verbose=False,
            )
    except ExportError:
        raise
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    finally:
        logger.setLevel(level)
    return program.model_proto


def _name_dynamic_axes(proto, axes: dict[str, dict[int, str]]) -> None:
    """Give the dynamic axes readable names (the exporter uses s0, s1, ...)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        for index, name in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[index]
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def _session(model_bytes_or_path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes_or_path, options, providers=["CPUExecutionProvider"])


def _max_abs(a: np.ndarray, b: torch.Tensor) -> float:
    return float(np.max(np.abs(a - b.detach().numpy()))) if a.size else 0.0


def export_onnx(
    model: SAM2ImageModel | AutoSegmenter | str,
    out_dir: str | Path,
    *,
    image_size: int | None = None,
    int8: bool = False,
    opset: int = DEFAULT_OPSET,
    fold_high_res: bool = True,
    attention: str = "ort",
    model_spec: str | None = None,
) -> ExportResult:
    """Export `model` (a SAM2ImageModel, an AutoSegmenter, or a spec: path, `default`, `preset:NAME`).

    Writes encoder.onnx, decoder.onnx, box_decoder.onnx (prompts without a mask input; not for a
    model with `box_prior`), auto_decoder.onnx for a model with an automatic head (the
    bundled default has one), optionally encoder.int8.onnx (dynamic INT8 weights via
    onnxruntime.quantization.quantize_dynamic), and uniultra-onnx.json into `out_dir`.
    `attention="ort"` maps attention to onnxruntime's MultiHeadAttention contrib op (a tiled
    kernel, faster and far lighter on memory at 1024 px); "onnx" keeps standard ONNX ops only,
    for runtimes other than onnxruntime. Nothing is written under `out_dir` unless both graphs
    exported and matched PyTorch.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if opset < 18:
        raise ValueError(f"opset {opset} is not supported: the torch exporter targets opset >= 18")
    if isinstance(model, str | Path):
        from uniultra.inference.loading import load_any_model

        model_spec = str(model)
        model = load_any_model(model_spec, image_size=image_size)
    auto = model.eval().float().cpu() if isinstance(model, AutoSegmenter) else None
    model = model.base if auto is not None else model  # the head is exported as a third graph
    _check_exportable(model, image_size)
    model = model.eval().float().cpu()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")

    image, prompts = example_inputs(model)
    encoder = EncoderGraph(model, fold_high_res)
    # Every graph is checked against PyTorch before anything is written.
    graphs, check, ref_embed = _checked_graphs(model, auto, encoder, image, prompts, opset, attention)

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".uniultra-export-", dir=out_dir))
    try:
        staged = _stage_graphs(staging, graphs)
        if int8:
            staged["encoder_int8"] = staging / md.ENCODER_INT8_FILE
            check["encoder_int8_image_embed_max_abs"] = _quantize_encoder_checked(
                staged["encoder"], staged["encoder_int8"], image, ref_embed)
        meta = build_metadata(model, model_spec, opset, staged, encoder.folded, attention, check,
                              auto_features=None if auto is None else auto.features_model)
        if auto is not None:
            meta["auto"] = auto_metadata(auto)
        files, metadata_path = _publish(out_dir, staged, meta)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir=out_dir, metadata_path=metadata_path, files=files, metadata=meta, check=check)


def _check_exportable(model: SAM2ImageModel, image_size: int | None) -> None:
    if image_size is not None and image_size != model.image_size:
        raise ValueError(f"model is built for {model.image_size} px; rebuild it for {image_size} px")
    if not model.sam_mask_decoder.use_high_res_features:
        raise ValueError("the exporter needs a decoder with high-res features (every SAM2 preset has them)")


def _checked_graphs(
    model: SAM2ImageModel,
    auto: AutoSegmenter | None,
    encoder: EncoderGraph,
    image: torch.Tensor,
    prompts: tuple[torch.Tensor, ...],
    opset: int,
    attention: str,
) -> tuple[dict[str, bytes], dict[str, float], torch.Tensor]:
    """The serialised graphs by file key (as in `_GRAPH_FILES`), their max abs differences to PyTorch
    in onnxruntime, and PyTorch's image embedding; ExportError when a graph disagrees."""
    decoder = DecoderGraph(model)
    with torch.inference_mode():
        reference_features = model.encode_image(image)
        ref_embed, (ref_hr0, ref_hr1) = reference_features.image_embed, reference_features.high_res_feats
        reference_decoder = decoder(ref_embed, ref_hr0, ref_hr1, *prompts)

    enc_proto = _onnx_proto(encoder, (image,), md.ENCODER_INPUTS, md.ENCODER_OUTPUTS, opset, attention=attention)
    dec_proto = _prompt_graph_proto(decoder, (ref_embed, ref_hr0, ref_hr1, *prompts), md.DECODER_INPUTS, opset,
                                    attention)
    graphs = {"encoder": enc_proto.SerializeToString(), "decoder": dec_proto.SerializeToString()}
    if not model.config.decoder.box_prior:  # with the prior, the dense prompt depends on the box
        tokens = ref_embed.flatten(2).transpose(1, 2).contiguous()
        graphs["box_decoder"] = _prompt_graph_proto(BoxDecoderGraph(model), (tokens, ref_hr0, ref_hr1, *prompts[:2]),
                                                    md.BOX_DECODER_INPUTS, opset, attention).SerializeToString()

    check = _prompt_graphs_check(graphs, image, (ref_embed, ref_hr0, ref_hr1), prompts, reference_decoder)
    if auto is not None:
        auto_features = (ref_embed, ref_hr0, ref_hr1)
        if auto.encoder is not None:
            graphs["auto_encoder"], auto_features, encoder_check = _export_auto_encoder(
                auto, image, encoder.folded, opset, attention)
            check.update(encoder_check)
        graphs["auto_decoder"], auto_check = _export_auto(auto, auto_features, opset, attention)
        check.update(auto_check)
    worst = max(check.values())
    if not np.isfinite(worst) or worst > EXPORT_CHECK_ATOL:
        raise ExportError(f"exported graphs disagree with PyTorch (max abs diff {worst:.3g}): {check}")
    return graphs, check, ref_embed


def _prompt_graphs_check(graphs: dict[str, bytes], image: torch.Tensor, features: tuple[torch.Tensor, ...],
                         prompts: tuple[torch.Tensor, ...], reference_decoder) -> dict[str, float]:
    """The encoder, decoder and (when exported) box decoder graphs run in onnxruntime: their
    outputs' max abs differences to PyTorch's."""
    enc_out = _session(graphs["encoder"]).run(None, {"image": image.numpy()})
    check = _max_abs_by_output("encoder", md.ENCODER_OUTPUTS, enc_out, features)
    feeds = dict(zip(md.DECODER_INPUTS, [t.numpy() for t in (*features, *prompts)], strict=True))
    dec_out = _session(graphs["decoder"]).run(None, feeds)
    check.update(_max_abs_by_output("decoder", md.DECODER_OUTPUTS, dec_out, reference_decoder))
    if "box_decoder" in graphs:
        # The reference prompts carry no mask (has_mask_input 0): the box decoder must give the same.
        box_feeds = {"image_tokens": md.image_tokens(feeds["image_embed"]),
                     **{k: feeds[k] for k in md.BOX_DECODER_INPUTS[1:]}}
        box_out = _session(graphs["box_decoder"]).run(None, box_feeds)
        check.update(_max_abs_by_output("box_decoder", md.DECODER_OUTPUTS, box_out, reference_decoder))
    return check


def _max_abs_by_output(graph: str, names: tuple[str, ...], outputs, references) -> dict[str, float]:
    return {f"{graph}_{name}_max_abs": _max_abs(o, r) for name, o, r in zip(names, outputs, references, strict=True)}


# The staged file of each graph in `_checked_graphs`'s result.
_GRAPH_FILES = {"encoder": md.ENCODER_FILE, "decoder": md.DECODER_FILE, "box_decoder": md.BOX_DECODER_FILE,
                "auto_decoder": md.AUTO_FILE, "auto_encoder": md.AUTO_ENCODER_FILE}


def _stage_graphs(staging: Path, graphs: dict[str, bytes]) -> dict[str, Path]:
    staged = {}
    for key, data in graphs.items():
        staged[key] = staging / _GRAPH_FILES[key]
        staged[key].write_bytes(data)
    return staged


def _quantize_encoder_checked(src: Path, dst: Path, image: torch.Tensor, ref_embed: torch.Tensor) -> float:
    """Quantise the encoder; the INT8 embedding's max abs difference to PyTorch's (reported in the
    metadata, not held to EXPORT_CHECK_ATOL)."""
    quantize_encoder(src, dst)
    int8_out = _session(str(dst)).run(None, {"image": image.numpy()})
    return _max_abs(int8_out[0], ref_embed)


def _publish(out_dir: Path, staged: dict[str, Path], meta: dict[str, Any]) -> tuple[dict[str, Path], Path]:
    """Copy the staged graphs into `out_dir` and write the metadata: the graphs' paths, the metadata's."""
    # Graphs first, each atomically; the metadata (with their sha256) last.
    files = {}
    for key, path in staged.items():
        files[key] = atomic_write(out_dir / path.name, lambda tmp, src=path: shutil.copyfile(src, tmp))
    metadata_path = atomic_write_text(out_dir / md.METADATA_FILE, json.dumps(meta, indent=2) + "\n")
    return files, metadata_path


def _prompt_graph_proto(module: nn.Module, args: tuple, input_names: tuple[str, ...], opset: int, attention: str):
    """A decoder graph (md.DECODER_OUTPUTS) whose prompt inputs have a dynamic number of prompt sets
    and points, with those axes named in the file."""
    n_dim = torch.export.Dim("num_prompts", min=1, max=MAX_DYNAMIC)
    p_dim = torch.export.Dim("num_points", min=1, max=MAX_DYNAMIC)
    dims = {"point_coords": {0: n_dim, 1: p_dim}, "point_labels": {0: n_dim, 1: p_dim}, "mask_input": {0: n_dim}}
    proto = _onnx_proto(module, args, input_names, md.DECODER_OUTPUTS, opset,
                        dynamic_shapes=tuple(dims.get(name, {}) for name in input_names), attention=attention)
    names = {"point_coords": {0: "num_prompts", 1: "num_points"}, "point_labels": {0: "num_prompts", 1: "num_points"},
             "mask_input": {0: "num_prompts"}}
    _name_dynamic_axes(proto, {**{k: v for k, v in names.items() if k in input_names},
                               **{name: {0: "num_prompts"} for name in md.DECODER_OUTPUTS}})
    return proto


def _export_auto_encoder(auto: AutoSegmenter, image: torch.Tensor, fold_high_res: bool, opset: int,
                         attention: str) -> tuple[bytes, tuple[torch.Tensor, ...], dict[str, float]]:
    """The automatic path's own encoder as a graph, checked in onnxruntime; with PyTorch's features."""
    graph = EncoderGraph(auto.encoder, fold_high_res)
    with torch.inference_mode():
        reference = auto.encode_image(image)
    features = (reference.image_embed, *reference.high_res_feats)
    proto = _onnx_proto(graph, (image,), md.ENCODER_INPUTS, md.ENCODER_OUTPUTS, opset, attention=attention)
    data = proto.SerializeToString()
    out = _session(data).run(None, {"image": image.numpy()})
    return data, features, _max_abs_by_output("auto_encoder", md.ENCODER_OUTPUTS, out, features)


def _export_auto(auto: AutoSegmenter, features: tuple[torch.Tensor, ...], opset: int,
                 attention: str) -> tuple[bytes, dict[str, float]]:
    """The automatic head's graph, checked in onnxruntime against PyTorch on the last channel."""
    graph = AutoGraph(auto)
    modality = torch.tensor([auto.config.channels - 1], dtype=torch.int64)
    with torch.inference_mode():
        reference = graph(*features, modality)
    proto = _onnx_proto(graph, (*features, modality), md.AUTO_INPUTS, md.AUTO_OUTPUTS, opset, attention=attention)
    data = proto.SerializeToString()
    feeds = dict(zip(md.AUTO_INPUTS, [t.numpy() for t in (*features, modality)], strict=True))
    out = _session(data).run(None, feeds)
    return data, _max_abs_by_output("auto", md.AUTO_OUTPUTS, out, reference)


def quantize_encoder(src: Path, dst: Path) -> None:
    """Dynamic INT8 quantisation of the encoder's weight matmuls and convs (activations stay float,
    quantised on the fly). Attention's activation-activation matmuls are left in float."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # quantize_dynamic logs advice about pre-processing at WARNING
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logger.setLevel(level)


def build_metadata(
    model: SAM2ImageModel,
    model_spec: str | None,
    opset: int,
    files: dict[str, Path],
    folded: bool,
    attention: str,
    check: dict[str, float],
    auto_features: SAM2ImageModel | None = None,
) -> dict[str, Any]:
    """`auto_features`: the image model whose features the automatic graphs take (default `model`)."""
    s = model.image_size
    e = model.config.embedding_size
    low = 4 * e
    return {
        "format": md.FORMAT_NAME,
        "format_version": md.FORMAT_VERSION,
        "uniultra_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "onnx_opset": opset,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model": {"spec": model_spec, "preset": model.config.name, "config": model.config.to_dict()},
        "image_size": s,
        "embedding_size": e,
        "low_res_size": low,
        # How the model must be run, e.g. {"zoom": {"margin": 1.4}}: each prompt on a crop around it
        # (uniultra.inference.zoom wraps the ONNX predictor the same way).
        "inference": dict(getattr(model, "inference", None) or {}),
        "preprocessing": {
            "input": "RGB float32 in [0, 1]: uint8 / 255; wider integers (16-bit) by the DICOM window when "
            "present, else / (2^bits - 1) for the bit depth of their maximum "
            "(uniultra.data.image_io.normalize_intensity); "
            "gray replicated to 3 channels, alpha dropped",
            "resize": f"bilinear with antialiasing (torch antialias=True / PIL BILINEAR), align_corners=False, "
            f"to {s} x {s} (aspect ratio not kept)",
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
            "normalize": "(x - pixel_mean) / pixel_std per channel",
            "layout": f"NCHW float32, (1, 3, {s}, {s})",
        },
        "prompts": {
            "coordinates": f"model-input pixels (x, y) = (x_orig * {s} / W_orig, y_orig * {s} / H_orig)",
            "label_meanings": md.LABEL_MEANINGS,
            "box": "two points (x0, y0) label 2 and (x1, y1) label 3, placed before any clicks",
            "mask_input": f"(N, 1, {low}, {low}) low-res logits of an earlier prediction; set has_mask_input to 1 "
            "to use it, else feed zeros and 0",
        },
        "postprocessing": {
            "upsample": "bilinear, align_corners=False, no antialiasing, from the low-res logits to the original H x W",
            "mask_threshold": 0.0,
            "logit_clamp": LOGIT_CLAMP,
        },
        "attention_op": "com.microsoft.MultiHeadAttention (onnxruntime contrib op)" if attention == "ort"
        else "standard ONNX (MatMul, Softmax, MatMul)",
        "encoder_high_res_folded": folded,
        "export_check_max_abs": check,
        "files": {
            key: {
                "path": path.name,
                "sha256": file_sha256(path),
                "bytes": path.stat().st_size,
                **_io_spec(key, auto_features if key.startswith("auto") and auto_features else model),
            }
            for key, path in files.items()
        },
    }


def _io_spec(key: str, model: SAM2ImageModel) -> dict[str, Any]:
    s, e = model.image_size, model.config.embedding_size
    d, multi = model.config.neck.d_model, model.config.decoder.num_multimask_outputs
    features = {
        "image_embed": ["float32", [1, d, e, e]],
        "high_res_feats_0": ["float32", [1, d // 8, 4 * e, 4 * e]],
        "high_res_feats_1": ["float32", [1, d // 4, 2 * e, 2 * e]],
    }
    if key.startswith("encoder") or key == "auto_encoder":
        spec: dict[str, Any] = {"inputs": {"image": ["float32", [1, 3, s, s]]}, "outputs": features}
        if key.endswith("int8"):
            spec["quantization"] = "dynamic INT8 weights (MatMul, Gemm) by onnxruntime.quantization.quantize_dynamic"
        return spec
    low = 4 * e
    prompts = {
        "point_coords": ["float32", ["num_prompts", "num_points", 2]],
        "point_labels": ["int32", ["num_prompts", "num_points"]],
    }
    if key == "auto_decoder":
        return {"inputs": {**features, "modality": ["int64", [1]]},
                "outputs": {"auto_masks": ["float32", [1, 1, low, low]], "presence": ["float32", [1]]}}
    if key == "box_decoder":
        tokens = {"image_tokens": ["float32", [1, e * e, d]], "high_res_feats_0": features["high_res_feats_0"],
                  "high_res_feats_1": features["high_res_feats_1"]}
        inputs = {**tokens, **prompts}
    else:
        inputs = {**features, **prompts, "mask_input": ["float32", ["num_prompts", 1, low, low]],
                  "has_mask_input": ["float32", [1]]}
    return {
        "inputs": inputs,
        "outputs": {
            "masks": ["float32", ["num_prompts", 1, low, low]],
            "iou_scores": ["float32", ["num_prompts", 1]],
            "multimask_masks": ["float32", ["num_prompts", multi, low, low]],
            "multimask_iou_scores": ["float32", ["num_prompts", multi]],
            "object_score_logits": ["float32", ["num_prompts", 1]],
        },
    }
