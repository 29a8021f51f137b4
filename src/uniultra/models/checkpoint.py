"""Checkpoint I/O: official SAM2 / SAM2.1 checkpoints in, UniUltra checkpoints in and out.

Official files are `{"model": state_dict}` holding the whole video model; only the image path is
used, the video-memory keys are reported and ignored, and any missing image-path key is an error.
UniUltra files hold the config next to the weights so a checkpoint rebuilds its own model.
All loading uses `weights_only=True`: a checkpoint is data, never code.

A UniUltra file's `meta` may describe how it was trained (written by `uniultra train`):
- `meta["peft"]`: the PEFT config; applied before loading when the weights contain inserted
  modules (adapters, LoRA);
- `meta["weights"] == "trained"`: the file holds ONLY the trained parameters (adapter-only
  checkpoint). `meta["base"]` names the checkpoint they were trained on (`path`, `abs_path`,
  `sha256`); loading rebuilds that base (or the file given as `base=`), checks its sha256,
  applies the PEFT config and copies the trained parameters in. Without this key the file is
  complete and loads on its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniultra.atomic import atomic_write
from uniultra.models.config import PRESETS, ImageModelConfig, preset
from uniultra.models.image_model import SAM2ImageModel

FORMAT_NAME = "uniultra"
FORMAT_VERSION = 1
# meta["weights"] of a file holding only the trained parameters (needs its base to load).
WEIGHTS_TRAINED = "trained"
WEIGHTS_FULL = "full"
# Keys of the official model that belong to the image path; everything else is video memory.
IMAGE_PATH_PREFIXES = ("image_encoder.", "sam_prompt_encoder.", "sam_mask_decoder.", "no_mem_embed")
# Keys of an automatic (no-prompt) head stored beside the base (uniultra.auto); meta["auto_head"] marks them.
AUTO_HEAD_PREFIX = "auto_head."
# meta key of the modality controller's config (uniultra.auto.controller): attached before loading.
CONTROLLER_META = "modality_controller"
# meta key of how a model must be run (e.g. {"zoom": {"margin": 1.4}}: each prompt on a crop around
# it, uniultra.inference.zoom); `load_model` puts it on the model as `model.inference`.
INFERENCE_META = "inference"


class CheckpointError(ValueError):
    """A checkpoint file that cannot become the requested model; the message names the file."""


@dataclass
class LoadReport:
    path: str
    kind: str  # "official" or "uniultra"
    preset: str
    ignored_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        groups = sorted({k.split(".")[0] for k in self.ignored_keys})
        ignored = f"; ignored {len(self.ignored_keys)} video-memory keys ({', '.join(groups)})" if groups else ""
        return f"loaded {self.kind} checkpoint {self.path} as preset '{self.preset}'{ignored}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for corrupt or unsafe files
        raise CheckpointError(f"{path}: not a readable weights-only torch checkpoint ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict at top level, found {type(data).__name__}")
    return data


def infer_preset(state: dict[str, torch.Tensor], path: str = "checkpoint") -> str:
    """Name the official preset whose trunk width and depth match the state dict."""
    try:
        width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{path}: no image_encoder.trunk.patch_embed.proj.weight: not a SAM2 model") from exc
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("image_encoder.trunk.blocks."))
    for name, cfg in PRESETS.items():
        if cfg.embed_dim == width and sum(cfg.stages) == depth:
            return name
    raise CheckpointError(f"{path}: no preset has trunk width {width} and {depth} blocks")


def load_state_into(model: SAM2ImageModel, state: dict[str, torch.Tensor], path: str) -> list[str]:
    """Copy image-path weights into `model`; return the ignored (video-memory) keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} image-path keys, e.g. {missing[:5]}")
    unknown_image_keys = [k for k in state if k.startswith(IMAGE_PATH_PREFIXES) and k not in own]
    if unknown_image_keys:
        raise CheckpointError(
            f"{path}: {len(unknown_image_keys)} image-path keys this model does not have, "
            f"e.g. {unknown_image_keys[:5]} (wrong preset?)"
        )
    bad_shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if state[k].shape != v.shape]
    if bad_shapes:
        raise CheckpointError(f"{path}: shape mismatch for {len(bad_shapes)} keys, e.g. {bad_shapes[:3]}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return sorted(k for k in state if k not in own)


def load_official(
    path: str | os.PathLike, image_size: int = 1024, preset_name: str | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[SAM2ImageModel, LoadReport]:
    """Build the image model from an official `sam2_hiera_*.pt` / `sam2.1_hiera_*.pt` file
    (`data`: the file's contents when the caller has already read it)."""
    data = read_checkpoint(path) if data is None else data
    state = data.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no 'model' state dict: not an official SAM2 checkpoint")
    name = preset_name or infer_preset(state, str(path))
    model = SAM2ImageModel(preset(name, image_size))
    ignored = load_state_into(model, state, str(path))
    return model, LoadReport(str(path), "official", name, ignored)


def save_model(
    model: SAM2ImageModel,
    path: str | os.PathLike,
    meta: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write config + weights atomically (`.pt`, or `.safetensors` by suffix).

    `state` defaults to the full state dict; pass a subset to store only trained parameters.
    """
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in (state or model.state_dict()).items()}
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
              "config": model.config.to_dict(), "meta": meta or {}}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        def write(tmp: str) -> None:
            save_file(state, tmp, metadata={"uniultra": json.dumps(header)})
    else:
        def write(tmp: str) -> None:
            torch.save({**header, "state_dict": state}, tmp)
    atomic_write(path, write)
    return path


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
    state = _without_auto_head(data["state_dict"], meta, path)
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


def _without_auto_head(
    state: dict[str, torch.Tensor], meta: dict[str, Any], path: str | os.PathLike
) -> dict[str, torch.Tensor]:
    """The base model's keys: an auto checkpoint's head is ignored here (load_auto_model reads it)."""
    if not any(k.startswith(AUTO_HEAD_PREFIX) for k in state):
        return state
    if "auto_head" not in meta:
        raise CheckpointError(
            f"{path}: has '{AUTO_HEAD_PREFIX}*' keys but no meta['auto_head']: a corrupt auto checkpoint"
        )
    return {k: v for k, v in state.items() if not k.startswith(AUTO_HEAD_PREFIX)}


def base_identity(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """What an adapter-only checkpoint records about the checkpoint it was trained on."""
    path = Path(path)
    return {"kind": kind, "path": str(path), "abs_path": str(path.resolve()), "sha256": file_sha256(path)}


def load_base_model(
    path: str | os.PathLike, image_size: int | None = None
) -> tuple[SAM2ImageModel, dict[str, Any]]:
    """A starting point for training: an official SAM2 file or a UniUltra checkpoint, plus its identity."""
    data = read_checkpoint(path)
    if "model" in data and "format" not in data:
        model, _ = load_official(path, image_size or 1024)
        kind = "official"
    else:
        model, _ = load_uniultra(path, image_size, data)
        kind = FORMAT_NAME
    return model, base_identity(path, kind)


def _apply_peft(model: SAM2ImageModel, peft: dict[str, Any], path: str | os.PathLike):
    from uniultra.peft.apply import apply_peft

    try:
        return apply_peft(model, peft)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot apply its PEFT config {peft} ({exc})") from exc


def _attach_controller(model: SAM2ImageModel, config: dict[str, Any], path: str | os.PathLike) -> None:
    from uniultra.auto.controller import attach_from_config

    try:
        attach_from_config(model, config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot attach its modality controller {config} ({exc})") from exc


def _controller_config(model: SAM2ImageModel) -> dict[str, Any] | None:
    """The attached modality controller's config as a checkpoint records it (None without one)."""
    from uniultra.auto.controller import controller_config

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
    from uniultra.peft.apply import PeftError, load_trainable_state

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
    model, _ = load_base_model(base_path, config.image_size)
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


def file_sha256(path: str | os.PathLike) -> str:
    """Identity of a base checkpoint, recorded in adapter-only checkpoints."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("uniultra", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return {**header, "state_dict": state}


def pack_model(
    source: str | os.PathLike, out: str | os.PathLike, half: bool = False, meta: dict[str, Any] | None = None
) -> Path:
    """A standalone deployable file from any loadable checkpoint (adapters merged into one file).

    `half` stores floating-point weights as fp16 (half the size); they are widened back to the
    model's fp32 parameters on load.
    """
    model = load_model(source)
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    peft = getattr(model, "peft_config", None)
    info = {"packed_from": Path(source).name, "dtype": "float16" if half else "float32", **(meta or {})}
    if peft is not None:
        info["peft"] = peft.to_dict()
    controller = _controller_config(model)
    if controller is not None:
        info[CONTROLLER_META] = controller
    if getattr(model, "inference", None):
        info[INFERENCE_META] = model.inference
    return save_model(model, out, meta=info, state=state)
