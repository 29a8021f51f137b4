"""Small building blocks shared by the trunk and the mask decoder.

Submodule names (`layers.0`, ...) match the official SAM2 checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """A stack of Linear layers with an activation between them (none after the last)."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        activation: type[nn.Module] = nn.ReLU,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.act = activation()
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            # Exported graphs normalise over axis 1 in place: runtimes fuse these ops (OpenVINO into one
            # MVN), while the channels-last pair below becomes two Transposes, which OpenVINO runs in bf16
            # with a slow generic kernel (~1.2 ms each in the 1024 px decoder).
            centred = x - x.mean(1, keepdim=True)
            y = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + self.eps)
            return y * self.weight[:, None, None] + self.bias[:, None, None]
        # Eager: F.layer_norm on a channels-last view is one fused kernel instead of five element-wise ops.
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)
