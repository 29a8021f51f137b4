"""Checkpoint file I/O: official SAM2 / SAM2.1 checkpoints in, UniUltra checkpoints in and out.

Pure file I/O on the plain image model; turning any checkpoint (adapters, controller, adapter-only
files, `default`, `preset:NAME`) into a ready model is uniultra.inference.loading.

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

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from uniultra.atomic import atomic_write
from uniultra.models.config import PRESETS, preset
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
# meta key of the modality controller's config (uniultra.peft.controller): attached before loading.
CONTROLLER_META = "modality_controller"
# meta key of how a model must be run (e.g. {"zoom": {"margin": 1.4}}: each prompt on a crop around
# it, uniultra.inference.zoom); uniultra.inference.loading.load_model puts it on the model as `model.inference`.
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


def without_auto_head(
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




def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("uniultra", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return {**header, "state_dict": state}
