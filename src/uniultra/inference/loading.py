"""Turning any checkpoint into a ready model or predictor: the one place that does it.

`load_model(spec)`: a path (official SAM2 file, UniUltra checkpoint, adapter-only checkpoint on its
base), `default` (the bundled model) or `preset:NAME` (random weights); PEFT modules and the modality
controller recorded in a checkpoint's meta are inserted before its weights are copied in.
`load_predictor(spec)`: the right predictor for every kind of spec (see there).
File reading and writing is uniultra.models.checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from uniultra.atomic import file_sha256
from uniultra.inference.auto_predictor import AutoPredictor
from uniultra.inference.predictor import Predictor
from uniultra.inference.zoom import ZoomPredictor
from uniultra.models.auto_checkpoint import (
    CALIBRATION_META,
    ENCODER_META,
    META_KEY,
    PROBE_META,
    auto_meta,
    auto_state,
    is_auto_data,
    load_head_state,
)
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter, with_own_encoder
from uniultra.models.checkpoint import (
    CONTROLLER_META,
    FORMAT_NAME,
    INFERENCE_META,
    WEIGHTS_TRAINED,
    CheckpointError,
    LoadReport,
    load_official,
    load_state_into,
    read_checkpoint,
    save_model,
    without_auto_head,
)
from uniultra.models.config import ImageModelConfig, preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.models.weight_average import average_states, normalised_weights
from uniultra.peft.apply import PeftError, apply_peft, load_trainable_state
from uniultra.peft.controller import attach_from_config, controller_config

# An exported model directory (`uniultra export onnx`), run on onnxruntime, fp32 or INT8 encoder.
ONNX_PREFIX, ONNX_INT8_PREFIX = "onnx:", "onnx-int8:"
# The same directory run on OpenVINO: encoder in fp32, bf16 or NNCF-INT8 (see openvino_predictor).
OPENVINO_PREFIXES = {"openvino:": {"precision": "fp32"}, "openvino-bf16:": {"precision": "bf16"},
                     "openvino-int8:": {"int8": True}}
EXPORT_PREFIXES = (ONNX_PREFIX, ONNX_INT8_PREFIX, *OPENVINO_PREFIXES)
# Any checkpoint spec run by PyTorch with its encoder under bf16 autocast (CPU; Predictor(cpu_bf16=True)).
TORCH_BF16_PREFIX = "torch-bf16:"


def load_uniultra(
    path: str | os.PathLike,
    image_size: int | None = None,
    data: dict[str, Any] | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[SAM2ImageModel, LoadReport]:
    """Rebuild a UniUltra checkpoint; `base` overrides where an adapter-only file's base is read."""
    data = data if data is not None else read_checkpoint(path)
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a UniUltra checkpoint (no format='{FORMAT_NAME}')")
    try:
        config = ImageModelConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model config ({exc})") from exc
    if image_size is not None:
        config = config.with_size(image_size)
    meta = data.get("meta") or {}
    state = without_auto_head(data["state_dict"], meta, path)
    if meta.get("weights") == WEIGHTS_TRAINED:
        model, report = _load_trained_subset(Path(path), config, meta, state, base)
    else:
        model, report = _load_complete(path, config, meta, state)
    model.inference = dict(meta.get(INFERENCE_META) or {})
    return model, report


def _load_complete(path: str | os.PathLike, config: ImageModelConfig, meta: dict[str, Any],
                   state: dict[str, torch.Tensor]) -> tuple[SAM2ImageModel, LoadReport]:
    model = SAM2ImageModel(config)
    plain_keys = set(model.state_dict())
    if any(k not in plain_keys for k in state):
        if not meta.get("peft") and not meta.get(CONTROLLER_META):
            extra = sorted(k for k in state if k not in plain_keys)
            raise CheckpointError(f"{path}: {len(extra)} keys this model does not have, e.g. {extra[:4]}, "
                                  "and no PEFT config (or modality controller) in the file to insert them")
        if meta.get("peft"):
            _apply_peft(model, meta["peft"], path)
        if meta.get(CONTROLLER_META):
            _attach_controller(model, meta[CONTROLLER_META], path)
    load_state_into(model, state, str(path))
    return model, LoadReport(str(path), FORMAT_NAME, config.name)


def base_identity(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """What an adapter-only checkpoint records about the checkpoint it was trained on."""
    path = Path(path)
    return {"kind": kind, "path": str(path), "abs_path": str(path.resolve()), "sha256": file_sha256(path)}


def load_base_model(
    path: str | os.PathLike, image_size: int | None = None, *, exact_box_tokens: bool = False
) -> tuple[SAM2ImageModel, dict[str, Any]]:
    """A starting point for training: an official SAM2 file or a UniUltra checkpoint, plus its identity.
    `exact_box_tokens`: add them when the file's model has none (a model fine-tuned to tell exact boxes)."""
    data = read_checkpoint(path)
    if "model" in data and "format" not in data:
        model, _ = load_official(path, image_size or 1024)
        kind = "official"
    else:
        model, _ = load_uniultra(path, image_size, data)
        kind = FORMAT_NAME
    identity = base_identity(path, kind)
    if exact_box_tokens and not model.config.decoder.exact_box_tokens:
        model.add_exact_box_tokens()
        identity["added"] = "exact-box tokens (copies of the box corners)"
    return model, identity


def _apply_peft(model: SAM2ImageModel, peft: dict[str, Any], path: str | os.PathLike):
    try:
        return apply_peft(model, peft)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot apply its PEFT config {peft} ({exc})") from exc


def _attach_controller(model: SAM2ImageModel, config: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        attach_from_config(model, config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot attach its modality controller {config} ({exc})") from exc


def _controller_config(model: SAM2ImageModel) -> dict[str, Any] | None:
    """The attached modality controller's config as a checkpoint records it (None without one)."""
    config = controller_config(model)
    return None if config is None else config.to_dict()


def _find_base(path: Path, recorded: dict[str, Any], explicit: str | os.PathLike | None) -> Path:
    if explicit is not None:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"base checkpoint {explicit} does not exist")
        return Path(explicit)
    candidates = [Path(p) for p in (recorded.get("path"), recorded.get("abs_path")) if p]
    if recorded.get("path"):
        candidates.append(path.parent / Path(recorded["path"]).name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no base recorded)"
    raise CheckpointError(
        f"{path}: holds only trained parameters; its base checkpoint (sha256 {recorded.get('sha256', '?')}) "
        f"was not found (looked at {looked}); pass the base file (load_model(..., base=FILE), --base FILE)"
    )


def _load_trained_subset(
    path: Path, config: ImageModelConfig, meta: dict[str, Any], state: dict[str, torch.Tensor],
    explicit_base: str | os.PathLike | None,
) -> tuple[SAM2ImageModel, LoadReport]:
    recorded = meta.get("base") or {}
    if "peft" not in meta:
        raise CheckpointError(f"{path}: adapter-only checkpoint without its PEFT config (meta['peft'])")
    base_path = _find_base(path, recorded, explicit_base)
    digest = file_sha256(base_path)
    if recorded.get("sha256") and digest != recorded["sha256"]:
        raise CheckpointError(
            f"{path}: was trained on a base with sha256 {recorded['sha256']} ({recorded.get('path')}), "
            f"but {base_path} has sha256 {digest}: not the same base checkpoint"
        )
    model, _ = load_base_model(base_path, config.image_size, exact_box_tokens=config.decoder.exact_box_tokens)
    model.config = model.config.with_box_priors_of(config)  # weightless: the base may have trained without
    arch = ("trunk", "neck", "decoder", "backbone_stride")
    if any(getattr(model.config, k) != getattr(config, k) for k in arch):
        raise CheckpointError(f"{path}: base {base_path} has another architecture than the trained model")
    model.config = config
    _apply_peft(model, meta["peft"], path)
    try:
        load_trainable_state(model, state)
    except PeftError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return model, LoadReport(str(path), f"{FORMAT_NAME} adapter-only on {base_path}", config.name)


def load_model(
    spec: str | os.PathLike,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    base: str | os.PathLike | None = None,
    data: dict[str, Any] | None = None,
) -> SAM2ImageModel:
    """Build a ready-to-use model (eval mode) from a path, `default`, or `preset:NAME` (random weights).

    `base`: for an adapter-only checkpoint, the base checkpoint file (default: the path recorded in it).
    `data`: the contents of the file at `spec` when the caller has already read it (read once).
    """
    spec_str = str(spec)
    if spec_str == "default":
        model = load_default_model(image_size)
    elif spec_str.startswith("preset:"):
        warnings.warn(f"{spec_str}: randomly initialised weights, masks will be meaningless", stacklevel=2)
        model = SAM2ImageModel(preset(spec_str.split(":", 1)[1], image_size or 1024))
    else:
        data = read_checkpoint(spec_str) if data is None else data
        if "model" in data and "format" not in data:
            model, _ = load_official(spec_str, image_size or 1024, data=data)
        else:
            model, _ = load_uniultra(spec_str, image_size, data, base=base)
    return model.to(device).eval()


def bundled_default_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "uniultra-mini-default.safetensors"


def load_default_model(image_size: int | None = None) -> SAM2ImageModel:
    path = bundled_default_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"the bundled default model is not in this installation ({path}); "
            "pass a checkpoint path with --model instead"
        )
    model, _ = load_uniultra(path, image_size)
    return model


def pack_model(
    source: str | os.PathLike, out: str | os.PathLike, half: bool = False, meta: dict[str, Any] | None = None,
    decoder_blur: int | None = None, prompt_model: str | os.PathLike | None = None,
) -> Path:
    """A standalone deployable file from any loadable checkpoint (adapters merged into one file).

    `half` stores floating-point weights as fp16 (half the size); they are widened back to the
    model's fp32 parameters on load. `decoder_blur` sets the decoder's anti-lattice blur
    (DecoderConfig.upscale_blur: 0, 1 or 2; it has no weights), None keeps the source's.
    `prompt_model`: with an automatic-mode `source`, the model (spec) that answers box and point
    prompts in the packed file; the source's own base stays as the automatic path's encoder.
    """
    loaded = load_any_model(source)
    if prompt_model is not None:
        loaded = _on_prompt_model(loaded, source, prompt_model)
    model = getattr(loaded, "base", loaded)  # an automatic-mode checkpoint keeps its head (auto_state)
    if decoder_blur is not None:
        set_decoder_blur(model, decoder_blur)
    state = _stored(auto_state(loaded) if isinstance(loaded, AutoSegmenter) else model.state_dict(), half)
    info = {"packed_from": Path(source).name, "dtype": "float16" if half else "float32", **(meta or {})}
    if prompt_model is not None:
        info["prompt_model"] = _identity(prompt_model)
    if isinstance(loaded, AutoSegmenter):
        info.update(auto_meta(loaded))
        source_meta = read_checkpoint(_spec_path(source)).get("meta") or {}
        for key in (CALIBRATION_META, PROBE_META):  # how the gate and the probe were chosen travel along
            if source_meta.get(key) is not None:
                info[key] = source_meta[key]
    return save_model(model, out, meta={**info, **_rebuild_meta(model)}, state=state)


def _on_prompt_model(loaded: SAM2ImageModel | AutoSegmenter, source: str | os.PathLike,
                     prompt_model: str | os.PathLike) -> AutoSegmenter:
    if not isinstance(loaded, AutoSegmenter):
        raise ValueError(f"{source}: has no automatic head; a prompt model is given only with one "
                         "(its base then becomes the head's own encoder)")
    base = load_model(prompt_model)  # the prompt model's plain base: a head it has itself is left out
    try:
        return with_own_encoder(loaded, base)
    except ValueError as exc:
        raise ValueError(f"{source} on {prompt_model}: {exc}") from None


def _identity(spec: str | os.PathLike) -> dict[str, Any]:
    path = _spec_path(spec)
    return {"spec": str(spec), "file": path.name, "sha256": file_sha256(path)}


def _stored(state: dict[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """The weights as written: floating-point ones as fp16 with `half` (widened back on load)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()} if half else state


def _rebuild_meta(model: SAM2ImageModel) -> dict[str, Any]:
    """What a standalone file needs beside its weights to rebuild and run `model`: its PEFT modules,
    modality controller and inference settings (zoom)."""
    info: dict[str, Any] = {}
    peft = getattr(model, "peft_config", None)
    if peft is not None:
        info["peft"] = peft.to_dict()
    controller = _controller_config(model)
    if controller is not None:
        info[CONTROLLER_META] = controller
    if getattr(model, "inference", None):
        info[INFERENCE_META] = model.inference
    return info


def average_models(
    sources: list[str | os.PathLike], out: str | os.PathLike, weights: list[float] | None = None,
    half: bool = False, meta: dict[str, Any] | None = None,
) -> Path:
    """One standalone file holding the weighted mean of the weights of `sources` (a "model soup",
    uniultra.models.weight_average): models fine-tuned from one starting point, with the same
    architecture, PEFT modules and inference settings. Automatic-mode checkpoints are refused (their
    head was trained on one encoder's features: average the base models, then train a head)."""
    models = [_averageable(source) for source in sources]
    first = models[0]
    for source, model in zip(sources[1:], models[1:], strict=True):
        _check_same_model(sources[0], first, source, model)
    names = [str(s) for s in sources]
    mix = normalised_weights(weights, len(sources))
    state = _stored(average_states([m.state_dict() for m in models], mix, names), half)
    sources_meta = [{"path": n, "sha256": file_sha256(n), "weight": w} for n, w in zip(names, mix, strict=True)]
    info = {"averaged_from": sources_meta, "dtype": "float16" if half else "float32", **(meta or {})}
    return save_model(first, out, meta={**info, **_rebuild_meta(first)}, state=state)


def _averageable(source: str | os.PathLike) -> SAM2ImageModel:
    if not Path(source).is_file():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    data = read_checkpoint(source)
    if is_auto_data(data):
        raise CheckpointError(f"{source}: has an automatic head, which belongs to one encoder; average the base "
                              "models (without heads), then train a head on the average")
    return load_model(source, data=data)


def _check_same_model(name_a: Any, a: SAM2ImageModel, name_b: Any, b: SAM2ImageModel) -> None:
    """Two models whose weights can be averaged into one: same config, PEFT and inference settings."""
    for what, value in (("model config", lambda m: m.config.to_dict()),
                        ("PEFT config", lambda m: getattr(getattr(m, "peft_config", None), "to_dict", dict)()),
                        ("modality controller", _controller_config),
                        ("inference settings", lambda m: getattr(m, "inference", None))):
        if value(a) != value(b):
            raise CheckpointError(f"{name_b}: its {what} differs from {name_a}'s; only models of one architecture "
                                  "and one way of running can be averaged")


def set_decoder_blur(model: SAM2ImageModel, stages: int) -> None:
    """Switch the decoder's fixed anti-lattice blur (0, 1 or 2 stages) in the module and its config."""
    if stages not in (0, 1, 2):
        raise ValueError(f"decoder blur must be 0, 1 or 2, got {stages!r}")
    model.sam_mask_decoder.upscale_blur = stages
    model.config = dataclasses.replace(model.config, decoder=dataclasses.replace(model.config.decoder,
                                                                                 upscale_blur=stages))


def load_auto_model(path: str | os.PathLike, device: str | torch.device = "cpu",
                    data: dict[str, Any] | None = None) -> AutoSegmenter:
    """Rebuild base + head (eval mode); every tensor is loaded with weights_only (`data`: the file's
    contents when the caller has already read it)."""
    data = read_checkpoint(path) if data is None else data
    if not is_auto_data(data):
        raise CheckpointError(
            f"{path}: has no automatic head (no meta['{META_KEY}']); train one with `uniultra auto train` "
            "or use this file with box / point prompts"
        )
    meta = data.get("meta") or {}
    try:
        config = AutoHeadConfig.from_dict(meta[META_KEY])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid auto-head config ({exc})") from exc
    base, _ = load_uniultra(path, data=data)
    encoder = _own_encoder(path, meta) if config.own_encoder else None
    model = AutoSegmenter(base, config, encoder=encoder)
    load_head_state(model, data["state_dict"], Path(path))
    return model.to(device).eval()


def _own_encoder(path: str | os.PathLike, meta: dict[str, Any]) -> SAM2ImageModel:
    """The automatic path's own image model, built (weights still random) from the file's meta."""
    recorded = meta.get(ENCODER_META)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("config"), dict):
        raise CheckpointError(f"{path}: its automatic head has an encoder of its own but no meta['{ENCODER_META}']")
    try:
        encoder = SAM2ImageModel(ImageModelConfig.from_dict(recorded["config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config of the automatic path's encoder ({exc})") from exc
    if recorded.get("peft"):
        _apply_peft(encoder, recorded["peft"], path)
    return encoder


def load_any_model(spec: str | os.PathLike, image_size: int | None = None,
                   device: str | torch.device = "cpu") -> SAM2ImageModel | AutoSegmenter:
    """What `load_model` loads, except that an automatic-mode checkpoint keeps its head (the bundled
    default has one: at another --size it loads without it, box and point prompts only)."""
    default = str(spec) == "default"
    path = _spec_path(spec)
    if not path.is_file():  # "preset:NAME", a missing file or bundle (load_model says so)
        return load_model(spec, image_size=image_size, device=device)
    data = read_checkpoint(path)  # once: large checkpoints take seconds to read
    if not is_auto_data(data) or (default and image_size not in (None, _config_size(data))):
        return load_model(path, image_size=image_size, device=device, data=data)
    model = load_auto_model(path, device=device, data=data)
    if image_size not in (None, model.image_size):
        raise ValueError(f"{spec}: an automatic-mode checkpoint runs at the size it was trained at "
                         f"({model.image_size} px), not --size {image_size}")
    return model


def _spec_path(spec: str | os.PathLike) -> Path:
    """The file a model spec names: the bundled default's for `default`, else the path itself."""
    return bundled_default_path() if str(spec) == "default" else Path(spec)


def _config_size(data: dict[str, Any]) -> int | None:
    return (data.get("config") or {}).get("image_size")


def load_predictor(spec: str | os.PathLike, image_size: int | None = None,
                   device: str | torch.device = "cpu", **export_options: Any):
    """The predictor for any model spec: `onnx:DIR` / `onnx-int8:DIR` an `OnnxPredictor` (onnxruntime,
    fp32 or INT8 encoder), `openvino:DIR` / `openvino-bf16:DIR` / `openvino-int8:DIR` an
    `OpenVinoPredictor` (`export_options`, e.g. threads, go to either); an automatic-mode checkpoint an
    `AutoPredictor`; any other spec (path, `default`, `preset:NAME`) a `Predictor`, with its encoder
    under CPU bf16 autocast for `torch-bf16:SPEC`. Wrapped in a `ZoomPredictor` when the checkpoint
    says it runs zoomed (`model.inference["zoom"]`)."""
    spec_str = str(spec)
    if spec_str.startswith(EXPORT_PREFIXES):
        exported = _exported_predictor(spec_str, export_options)
        zoom = (exported.metadata.get("inference") or {}).get("zoom")
        return ZoomPredictor(exported, zoom["margin"]) if zoom else exported
    if spec_str.startswith(TORCH_BF16_PREFIX):
        model = load_any_model(spec_str[len(TORCH_BF16_PREFIX):], image_size=image_size, device=device)
        return predictor_for(model, cpu_bf16=True)
    return predictor_for(load_any_model(spec, image_size=image_size, device=device))


def _exported_predictor(spec: str, options: dict[str, Any]):
    # Imported here: onnxruntime and openvino are optional dependencies (the `export` and `openvino` extras).
    prefix, export_dir = spec.split(":", 1)[0] + ":", spec.split(":", 1)[1]
    package, extra = ("openvino", "openvino") if prefix in OPENVINO_PREFIXES else ("onnxruntime", "export")
    if importlib.util.find_spec(package) is None:  # a clear message instead of an ImportError deep inside
        raise ValueError(f"{spec}: running an export this way needs {package}, which is not installed: "
                         f"pip install 'uniultra[{extra}]'")
    if prefix in OPENVINO_PREFIXES:
        from uniultra.inference.openvino_predictor import OpenVinoPredictor

        return OpenVinoPredictor(export_dir, **OPENVINO_PREFIXES[prefix], **options)
    from uniultra.inference.onnx_predictor import OnnxPredictor

    return OnnxPredictor(export_dir, int8=prefix == ONNX_INT8_PREFIX, **options)


def predictor_for(model: SAM2ImageModel | AutoSegmenter, cpu_bf16: bool = False):
    """The predictor a loaded model is meant to be run with: `AutoPredictor` for an automatic-mode
    model, else `Predictor`, wrapped in a `ZoomPredictor` when the model runs zoomed. `cpu_bf16`:
    encode under bf16 autocast on CPU (see `Predictor`)."""
    kind = AutoPredictor if isinstance(model, AutoSegmenter) else Predictor
    predictor = kind(model, cpu_bf16=cpu_bf16)
    zoom = (getattr(predictor.model, "inference", None) or {}).get("zoom")
    return ZoomPredictor(predictor, zoom["margin"]) if zoom else predictor


def load_for_serving(spec: str, image_size: int | None = None,
                     device: str | torch.device = "cpu") -> tuple[Any, str]:
    """What the web app (`serve.app.create_app`) takes for `spec`, and a one-line description: the model
    itself for a checkpoint on PyTorch fp32, else a factory of fresh predictors sharing one model."""
    if spec.startswith(EXPORT_PREFIXES):
        predictor = load_predictor(spec)
        meta = predictor.metadata
        described = f"{meta['model'].get('preset', '?')}, {meta['image_size']} px, {spec.split(':', 1)[0]}"
        return (lambda: fresh_predictor(predictor)), described
    bf16 = spec.startswith(TORCH_BF16_PREFIX)
    model = load_any_model(spec.removeprefix(TORCH_BF16_PREFIX), image_size=image_size, device=device)
    base = getattr(model, "base", model)  # an automatic-mode model wraps a box-promptable base
    auto = "" if base is model else f", automatic mode for {', '.join(model.config.modalities)}"
    if base is not model and model.encoder is not None:
        auto += " (on its own encoder)"
    described = f"{base.config.name}, {base.config.image_size} px{auto}{', encoder bf16' if bf16 else ''}"
    return ((lambda: predictor_for(model, cpu_bf16=True)) if bf16 else model), described


def fresh_predictor(predictor: Any):
    """A twin of an export-backed predictor with no image set, sharing its compiled graphs (zoom kept):
    one per image where several images stay encoded at once (the web app's cache)."""
    if isinstance(predictor, ZoomPredictor):
        return predictor.around(fresh_predictor(predictor.predictor))
    return predictor.fork()
