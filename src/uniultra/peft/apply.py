"""Apply a PEFT method to a SAM2 image model, report what trains, save and load only that.

Order of operations: build or load the base model (official / UniUltra checkpoint, whose keys are
the official ones), THEN `apply_peft`, THEN `load_trainable_state` for an adapter-only checkpoint.
`apply_peft` works on any device, including the meta device (parameter counting without memory).

Train/eval mode: the frozen trunk and neck behave identically in both modes: Hiera has no dropout
and no batch norm; its only mode-dependent layer is DropPath, which is the identity in every preset
(drop_path_rate 0). `set_train_mode` nevertheless keeps a frozen image encoder in eval mode so a
config with drop_path_rate > 0 does not inject noise into frozen branches; the adapters (no
mode-dependent layers either) follow the requested mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from uniultra.peft.ch_adapter import CHAdapter
from uniultra.peft.config import PeftConfig
from uniultra.peft.lora import LoRALinear

GROUPS = ("adapters", "lora", "trunk", "neck", "prompt_encoder", "mask_decoder", "no_mem_embed", "other")
INSERTED_GROUPS = ("adapters", "lora")


class PeftError(ValueError):
    """PEFT applied twice, or a trainable state that does not fit the model."""


def parameter_group(name: str) -> str:
    """Report group of a parameter of a SAM2ImageModel, from its qualified name."""
    leaf = name.rsplit(".", 1)[-1]
    if name.startswith("image_encoder.trunk.") and ".adapter." in name:
        return "adapters"
    if leaf in ("lora_a", "lora_b"):
        return "lora"
    prefixes = {
        "image_encoder.trunk.": "trunk",
        "image_encoder.neck.": "neck",
        "sam_prompt_encoder.": "prompt_encoder",
        "sam_mask_decoder.": "mask_decoder",
    }
    for prefix, group in prefixes.items():
        if name.startswith(prefix):
            return group
    return "no_mem_embed" if name == "no_mem_embed" else "other"


def peft_blocks(model: nn.Module, placement: str) -> list[int]:
    """Trunk block indices that receive adapters / LoRA: all, or the last block of each stage."""
    trunk = model.image_encoder.trunk
    if placement == "every_block":
        return list(range(len(trunk.blocks)))
    if placement == "stage_end":
        return list(trunk.stage_ends)
    raise PeftError(f"unknown placement {placement!r}")


@dataclass
class GroupCount:
    total: int = 0
    trainable: int = 0


@dataclass
class TrainableReport:
    """Parameter counts per group; `ratio` = trainable / all parameters of the image model
    (inserted modules included, as the paper's percentage does)."""

    method: str | None
    groups: dict[str, GroupCount] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(g.total for g in self.groups.values())

    @property
    def trainable(self) -> int:
        return sum(g.trainable for g in self.groups.values())

    @property
    def inserted(self) -> int:
        """Parameters added by the PEFT method (adapters + LoRA)."""
        return sum(self.groups[g].total for g in INSERTED_GROUPS if g in self.groups)

    @property
    def base_total(self) -> int:
        """Parameters of the image model before PEFT insertion."""
        return self.total - self.inserted

    @property
    def ratio(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "total": self.total,
            "trainable": self.trainable,
            "inserted": self.inserted,
            "ratio": self.ratio,
            "groups": {k: {"total": g.total, "trainable": g.trainable} for k, g in self.groups.items()},
        }

    def format(self) -> str:
        rows = [("group", "params", "trainable")]
        for name, g in self.groups.items():
            if g.total:
                rows.append((name, f"{g.total:,}", f"{g.trainable:,}"))
        rows.append(("total", f"{self.total:,}", f"{self.trainable:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        head = f"PEFT method: {self.method or 'none'}"
        tail = (
            f"trainable {self.trainable / 1e6:.3f}M of {self.total / 1e6:.3f}M = {100 * self.ratio:.2f}% "
            f"(inserted {self.inserted / 1e6:.3f}M)"
        )
        return "\n".join([head, *lines, tail])


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count parameters per group of a SAM2ImageModel as it is now (with or without PEFT)."""
    config = getattr(model, "peft_config", None)
    groups = {g: GroupCount() for g in GROUPS}
    for name, p in model.named_parameters():
        g = groups[parameter_group(name)]
        g.total += p.numel()
        if p.requires_grad:
            g.trainable += p.numel()
    if not groups["other"].total:
        del groups["other"]
    return TrainableReport(config.method if config is not None else None, groups)


def _already_applied(model: nn.Module) -> str | None:
    config = getattr(model, "peft_config", None)
    if config is not None:
        return f"method '{config.method}'"
    for name, module in model.named_modules():
        if isinstance(module, CHAdapter | LoRALinear):
            return f"found {type(module).__name__} at '{name}'"
    return None


def _trains(group: str, config: PeftConfig) -> bool:
    if group in INSERTED_GROUPS:
        return True
    if group in ("trunk", "neck", "other"):
        return config.trains_encoder
    flags = {
        "prompt_encoder": config.train_prompt_encoder,
        "mask_decoder": config.train_mask_decoder,
        "no_mem_embed": config.train_no_mem_embed,
    }
    return flags[group]


def apply_peft(model: nn.Module, config: PeftConfig | dict[str, Any]) -> TrainableReport:
    """Insert the method's modules into `model` (a SAM2ImageModel) in place, freeze the rest.

    Raises PeftError if PEFT was already applied to this model. The config is kept as
    `model.peft_config` (save `config.to_dict()` next to an adapter-only checkpoint).
    """
    config = PeftConfig.from_dict(config)
    if not hasattr(model, "image_encoder") or not hasattr(model.image_encoder, "trunk"):
        raise TypeError(f"apply_peft needs a SAM2ImageModel, got {type(model).__name__}")
    previous = _already_applied(model)
    if previous is not None:
        raise PeftError(
            f"PEFT is already applied to this model ({previous}); apply it once, to a freshly built or loaded model"
        )
    trunk = model.image_encoder.trunk
    for i in peft_blocks(model, config.placement):
        block = trunk.blocks[i]
        ref = block.norm2.weight
        if config.uses_adapter:
            width = block.norm2.normalized_shape[0]
            block.adapter = CHAdapter.from_config(width, config, device=ref.device, dtype=ref.dtype)
        if config.uses_lora:
            block.attn.qkv = LoRALinear.wrap(block.attn.qkv, config.lora_rank, config.lora_alpha)
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(parameter_group(name), config))
    model.peft_config = config
    return trainable_report(model)


def set_train_mode(model: nn.Module, training: bool = True) -> nn.Module:
    """model.train(training), but a frozen image encoder stays in eval mode (see module docstring)."""
    model.train(training)
    config = getattr(model, "peft_config", None)
    if training and config is not None and not config.trains_encoder:
        model.image_encoder.eval()
        for module in model.image_encoder.modules():
            if isinstance(module, CHAdapter):
                module.train()
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies (detached clones) of the parameters that require grad, by qualified name.

    With PEFT applied this is the small adapter-only checkpoint: adapters / LoRA + the trained
    decoder parts. It is a snapshot: later optimiser steps do not change it. Buffers are not
    included (the fixed edge kernels follow from the config; the rest come from the base model).
    """
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state_dict` into `model` (PEFT already applied with the same config).

    Every trainable parameter must be present and nothing else: missing keys, keys of frozen
    parameters, unknown keys and shape mismatches are errors that name the keys.
    """
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(state))
    frozen = sorted(k for k in state if k in params and k not in trainable)
    unknown = sorted(k for k in state if k not in params)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} trainable parameters, e.g. {missing[:4]}")
    if frozen:
        problems.append(f"{len(frozen)} keys are frozen parameters of this model, e.g. {frozen[:4]}")
    if unknown:
        problems.append(f"{len(unknown)} keys are not parameters of this model, e.g. {unknown[:4]}")
    if problems:
        applied = getattr(model, "peft_config", None)
        hint = (
            f" (model has PEFT method '{applied.method}': was the state saved with the same PEFT config?)"
            if applied is not None
            else " (apply_peft was not called on this model: call it with the checkpoint's PEFT config first)"
        )
        raise PeftError("trainable state does not fit the model: " + "; ".join(problems) + hint)
    shapes = [
        f"{k}: state {tuple(v.shape)} vs model {tuple(params[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(params[k].shape)
    ]
    if shapes:
        raise PeftError(f"trainable state shape mismatch for {len(shapes)} keys, e.g. {shapes[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)
