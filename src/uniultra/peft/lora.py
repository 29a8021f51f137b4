"""PEFT baselines of paper Table V: LoRA on the attention qkv projection, and the plain bottleneck
adapter (the CH-Adapter without its edge branch, reused rather than re-implemented).

LoRA (Hu et al., 2021): y = W x + b + (alpha / rank) * B (A x), A (rank, in) Kaiming-uniform as in
the PEFT library, B (out, rank) zero so the wrapped layer starts as an exact no-op. No LoRA
dropout. `LoRALinear` subclasses nn.Linear and keeps the wrapped layer's own `weight` / `bias`
Parameters, so the official state-dict keys (`...attn.qkv.weight`, `...attn.qkv.bias`) are
unchanged and the new ones read `...attn.qkv.lora_a`, `...attn.qkv.lora_b`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.peft.ch_adapter import CHAdapter


class LoRALinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        alpha: float = 4.0,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))
        self.reset_lora()

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """A LoRALinear sharing `linear`'s weight and bias Parameters (no copy)."""
        if isinstance(linear, LoRALinear):
            raise ValueError("this Linear already has LoRA")
        w = linear.weight
        # Build the base weight on the meta device (no allocation), then take the original Parameters.
        new = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None, device="meta")
        new.weight = w
        new.bias = linear.bias
        new.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        new.lora_b = nn.Parameter(torch.empty(linear.out_features, rank, device=w.device, dtype=w.dtype))
        new.reset_lora()
        return new

    def reset_lora(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def delta_weight(self) -> torch.Tensor:
        """The low-rank update (out, in) that merging would add to `weight`."""
        return self.scaling * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight, self.bias)
        return base + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def bottleneck_adapter(
    dim: int,
    ratio: float = 0.25,
    scale: float = 0.5,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CHAdapter:
    """Plain bottleneck adapter (Houlsby-style, parallel to the MLP): the CH-Adapter with no edge branch."""
    return CHAdapter(dim, ratio=ratio, edge_operator="none", scale=scale, device=device, dtype=dtype)
