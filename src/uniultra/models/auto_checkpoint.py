"""Auto-head checkpoints: a UniUltra base checkpoint plus the head's weights under one prefix.

The file is an ordinary UniUltra checkpoint (base config, base weights) with the head's keys stored
under `AUTO_HEAD_PREFIX` and its config in `meta["auto_head"]`. `load_model(path)` therefore
still returns the plain box-promptable base; `load_auto_model(path)`
(uniultra.inference.loading) adds the head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from uniultra.models.auto_segmenter import AutoSegmenter
from uniultra.models.checkpoint import AUTO_HEAD_PREFIX, INFERENCE_META, CheckpointError, read_checkpoint, save_model

# meta key holding the head's config; its presence marks an auto checkpoint.
META_KEY = "auto_head"
# meta key of the presence-gate calibration (uniultra.auto.calibration) written after training.
CALIBRATION_META = "presence_calibration"
# meta key of the presence probe's fit report (uniultra.auto.presence_fit).
PROBE_META = "presence_probe_fit"
# meta key of what rebuilds an automatic path's own encoder: {"config": model config, "peft": PEFT config}.
ENCODER_META = "auto_encoder"


def fitted_probe_channels(meta: dict | None) -> tuple[str, ...]:
    """Names of the channels whose presence probe was fitted, from a checkpoint's meta (none: no report)."""
    report = (meta or {}).get(PROBE_META) or {}
    return tuple(name for name, fit in report.items() if fit.get("fitted"))


def auto_state(model: AutoSegmenter) -> dict[str, torch.Tensor]:
    """Base weights under their own names, head weights (an own encoder's too) under AUTO_HEAD_PREFIX."""
    state = dict(model.base.state_dict())
    state.update({f"{AUTO_HEAD_PREFIX}{k}": v for k, v in model.head_state().items()})
    return state


def auto_meta(model: AutoSegmenter) -> dict[str, Any]:
    """The meta entries that rebuild the head (and its own encoder) around the base."""
    info: dict[str, Any] = {META_KEY: model.config.to_dict()}
    if model.encoder is not None:
        peft = getattr(model.encoder, "peft_config", None)
        info[ENCODER_META] = {"config": model.encoder.config.to_dict(),
                              "peft": None if peft is None else peft.to_dict()}
    return info


def save_auto_model(model: AutoSegmenter, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> None:
    """Write base + head weights atomically (`.pt`, or `.safetensors` by suffix)."""
    info = {**(meta or {}), **auto_meta(model)}
    peft = getattr(model.base, "peft_config", None)
    if peft is not None:  # an adapted base needs its PEFT config to be rebuilt
        info.setdefault("peft", peft.to_dict())
    if getattr(model.base, "inference", None):  # e.g. a zoomed base keeps running zoomed
        info.setdefault(INFERENCE_META, model.base.inference)
    save_model(model.base, path, meta=info, state=auto_state(model))


def is_auto_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a readable checkpoint carrying an automatic head."""
    try:
        data = read_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        return False
    return is_auto_data(data)


def is_auto_data(data: dict[str, Any]) -> bool:
    """True when already-read checkpoint contents carry an automatic head."""
    return data.get("format") == "uniultra" and isinstance((data.get("meta") or {}).get(META_KEY), dict)


def load_head_state(model: AutoSegmenter, state: dict[str, torch.Tensor], path: Path) -> None:
    head = {k[len(AUTO_HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(AUTO_HEAD_PREFIX)}
    own = model.head_state()
    missing = sorted(set(own) - set(head))
    extra = sorted(set(head) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{path}: auto-head weights do not match its config (missing {missing[:4]}, unexpected {extra[:4]})"
        )
    bad = [f"{k}: file {tuple(head[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
           if head[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{path}: auto-head shape mismatch, e.g. {bad[:3]}")
    # The base part was loaded (and checked) by load_uniultra; the head keys were checked above.
    model.load_state_dict(head, strict=False)
