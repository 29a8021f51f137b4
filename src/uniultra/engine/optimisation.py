"""How the trained parameters are updated, shared by `uniultra train` and `uniultra distill`.

Adam(W); learning rate `lr * gamma**epoch * min(1, (step + 1) / warmup_steps)` set before every
step; global gradient-norm clipping; optional EMA of the trained weights; on CUDA, autocast
(bf16 / fp16) with a GradScaler for fp16. A CPU runs fp32 unless `cpu_amp: bf16` is asked for and it has
bf16 units (AVX512-BF16 / AMX); without them PyTorch emulates bf16, slower than fp32, so it stays fp32.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch
from torch import nn

from uniultra.engine.config import OptimConfig
from uniultra.inference.cpu import cpu_model, has_bf16_units


class EMA:
    """Exponential moving average of the trained parameters (decay warms up: min(d, (1+n)/(10+n)))."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float) -> None:
        self.decay = decay
        self.params = params
        self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - d)

    @contextlib.contextmanager
    def applied(self):
        """Temporarily put the EMA weights into the model."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().cpu().clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the trained parameters")
        for n, t in state.items():
            self.shadow[n].copy_(t)


def autocast_dtype(device: torch.device, amp: str, cpu_amp: str = "none") -> torch.dtype | None:
    """The autocast dtype of the forward passes on `device` (None: fp32)."""
    if device.type == "cuda":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device.type != "cpu" or cpu_amp != "bf16":
        return None
    if not has_bf16_units():
        warnings.warn(f"cpu_amp: bf16 asked for, but this CPU ({cpu_model()}) has no bf16 units "
                      "(avx512_bf16 / amx_bf16): training runs in fp32", stacklevel=3)
        return None
    return torch.bfloat16


class Optimisation:
    """Optimiser, schedule, clipping, EMA and mixed precision of one set of trained parameters."""

    def __init__(self, trained: dict[str, nn.Parameter], config: OptimConfig, amp: str,
                 device: torch.device, cpu_amp: str = "none") -> None:
        self.config = config
        self.trained = trained
        self.device_type = device.type
        kind = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
        self.optimizer = kind(list(trained.values()), lr=config.lr, betas=config.betas,
                              weight_decay=config.weight_decay)
        self.ema = EMA(trained, config.ema) if config.ema else None
        self.amp_dtype = autocast_dtype(device, amp, cpu_amp)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    @property
    def precision(self) -> str:
        """What the forward passes compute in: fp32, bf16 or fp16 (recorded in the run's log)."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def ema_applied(self):
        """The EMA weights in the model for the `with` block (validation, best checkpoint), if any."""
        return self.ema.applied() if self.ema else contextlib.nullcontext()

    def lr_at(self, epoch: int, step: int) -> float:
        o = self.config
        warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
        return o.lr * o.gamma**epoch * warm

    def step(self, loss: torch.Tensor, epoch: int, step: int) -> tuple[float, torch.Tensor]:
        """Backward, clip, one optimiser step at the scheduled lr, EMA update; (lr, grad norm)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        else:
            loss.backward()
        clip = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.trained.values()), clip)
        lr = self.lr_at(epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step)
        return lr, grad_norm

    def state_dict(self) -> dict[str, Any]:
        """The resume-state entries `optimizer`, `ema` and `scaler`."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load_state_dict(self, doc: dict[str, Any], source: str | object = "state") -> None:
        self.optimizer.load_state_dict(doc["optimizer"])
        if self.ema is not None:
            if doc["ema"] is None:
                raise ValueError(f"{source}: the run had no EMA")
            self.ema.load_state_dict(doc["ema"])
        # A run saved on CPU (no scaler) may resume on CUDA fp16: the scaler then starts fresh.
        if self.scaler is not None and doc["scaler"] is not None:
            self.scaler.load_state_dict(doc["scaler"])
