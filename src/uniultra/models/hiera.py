"""Hiera trunk of SAM2 ("hieradet"): a 4-stage hierarchical vision transformer.

Layout inside the trunk is channels-last, (B, H, W, C), so every Linear/LayerNorm acts on the last
axis without transposes. Stage widths grow by `dim_mul` and the token grid halves at the first block
of stages 2-4 by max-pooling the attention queries ("q-pool"); that block also projects and pools its
residual. Most blocks attend inside non-overlapping windows; the blocks listed in
`global_att_blocks` attend over the whole map.

Module and parameter names follow the official checkpoints (`patch_embed.proj`, `pos_embed`,
`pos_embed_window`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.layers.K,proj}`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.models.config import HieraConfig
from uniultra.models.layers import MLP

# Stride of the patch embedding: the trunk's first token grid is the image at 1/4 resolution.
PATCH_STRIDE = 4


def max_pool(x: torch.Tensor, stride: tuple[int, int], dim: int) -> torch.Tensor:
    """Non-overlapping max pool over the axes (dim, dim + 1) of any tensor.

    Equals nn.MaxPool2d(stride, stride) (floor mode) on any layout without permuting to
    (B, C, H, W) and back: each axis is split into (cells, stride) - a view - and reduced by
    element-wise maxima of the strided slices, which is far faster on CPU than `amax` over
    non-adjacent axes. Max is exact, so results are bitwise those of MaxPool2d.
    """
    for axis, s in ((dim + 1, stride[1]), (dim, stride[0])):
        cells = x.shape[axis] // s
        # Floor mode: a trailing row/column that does not fill a whole cell is dropped.
        parts = x.narrow(axis, 0, cells * s).unflatten(axis, (cells, s)).unbind(axis + 1)
        x = parts[0]
        for part in parts[1:]:
            x = torch.maximum(x, part)
    return x


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nH * nW, window, window, C).

    The bottom/right edge is zero-padded to a whole number of windows; the padded tokens take part
    in attention as keys exactly like in the official model, so they must be zeros (not masked).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    x = x.reshape(b, nh, window, nw, window, c).transpose(2, 3)
    # One copy here (none at all when a single window covers the map).
    return x.reshape(b * nh * nw, window, window, c)


def window_unpartition(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of window_partition: (B * nH * nW, wh, ww, C) -> (B, height, width, C), padding cut off.

    The result may be a non-contiguous view; the caller's residual add materialises it.
    """
    wh, ww, c = windows.shape[1:]
    nh, nw = -(-height // wh), -(-width // ww)
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, wh, ww, c).transpose(2, 3).reshape(b, nh * wh, nw * ww, c)
    if nh * wh != height or nw * ww != width:
        x = x[:, :height, :width]
    return x


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples during training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Overlapping 7x7 stride-4 convolution from RGB to the first stage width; returns (B, C, H/4, W/4)."""

    def __init__(self, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=7, stride=PATCH_STRIDE, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MultiScaleAttention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) map, optionally max-pooling the queries.

    With pooled queries the output grid is the pooled one: this is how Hiera downsamples.
    """

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_stride = q_stride
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(
        self, x: torch.Tensor, extra_kv: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """`extra_kv(q)`: the term that extra key/value tokens add to the attention output
        (B, heads, N, hd) for queries q of that shape, each with its own share of the query's
        attention that does not renormalise the image tokens' softmax (the modality controller,
        uniultra.peft.controller), so the fused kernel below stays as it is."""
        b, h, w, _ = x.shape
        # (B, N, 3, heads, hd) -> three (B, heads, N, hd) views, no copy.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).flatten(1, 2).permute(2, 0, 3, 1, 4)
        if self.q_stride is not None:
            q = max_pool(q.unflatten(2, (h, w)), self.q_stride, dim=2)
            h, w = q.shape[2:4]
            q = q.flatten(2, 3)
        out = F.scaled_dot_product_attention(q, k, v)
        if extra_kv is not None:
            out = out + extra_kv(q)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm transformer block: (windowed) attention + MLP, with optional width change and q-pool."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        window_size: int,
        q_stride: tuple[int, int] | None = None,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_stride)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = MLP(dim_out, int(dim_out * mlp_ratio), dim_out, num_layers=2, activation=nn.GELU)
        # The residual must change width with the attention branch; it is projected from the
        # *normalised* input (as in the official model), then pooled like the queries.
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        # Optional adapter slot (uniultra.peft): a module mapping norm2(x) (B, H, W, dim_out) to a
        # residual added in parallel with the MLP. None costs nothing, keeps the official state-dict
        # keys and leaves the block's outputs bit-identical.
        self.adapter: nn.Module | None = None
        # Distillation taps (uniultra.peft.taps.record_taps): when set to a dict, forward stores
        # "block" (x + MLP, without the adapter: D2), "adapter" (the adapter output: D3, None when
        # there is no adapter) and "output" (their sum, the block's return value: D1 at a stage end).
        # Tensors are stored as computed (not detached) so a student's taps carry gradients.
        self.tap_store: dict[str, torch.Tensor | None] | None = None
        # Optional modality controller slot (uniultra.peft.controller). While it has a modality
        # selected (`active`) it adds its key/value token's share to the attention output
        # (`extra_kv`) and a bottleneck-MLP residual parallel to the MLP (inside D2: it is part of
        # the student's own block, not of the adapter). None or inactive: skipped, nothing changes.
        self.controller: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        control = self.controller if self.controller is not None and self.controller.active else None
        extra_kv = None if control is None else control.extra_kv
        normed = self.norm1(x)
        shortcut = x if self.proj is None else self.proj(normed)
        if self.q_stride is not None:
            shortcut = max_pool(shortcut, self.q_stride, dim=1)
        if self.window_size > 0:
            out = self.attn(window_partition(normed, self.window_size), extra_kv)
            # Pooled queries shrink each window, so unpartition with the output window shape.
            out = window_unpartition(out, shortcut.shape[1], shortcut.shape[2])
        else:
            out = self.attn(normed, extra_kv)
        x = shortcut + self.drop_path(out)
        normed = self.norm2(x)
        x = x + self.drop_path(self.mlp(normed))
        if control is not None:
            x = x + control(normed)
        adapter_out = None if self.adapter is None else self.adapter(normed)
        out = x if adapter_out is None else x + adapter_out
        if self.tap_store is not None:
            self.tap_store.update(block=x, adapter=adapter_out, output=out)
        return out


@dataclass(frozen=True)
class BlockSpec:
    dim: int
    dim_out: int
    num_heads: int
    window_size: int  # 0 = global attention
    q_stride: tuple[int, int] | None
    drop_path: float


def block_schedule(cfg: HieraConfig) -> list[BlockSpec]:
    """Per-block widths, heads, window sizes and pooling, in the official order."""
    if len(cfg.stages) != len(cfg.window_spec):
        raise ValueError("stages and window_spec must have the same length")
    if not 0 <= cfg.q_pool < len(cfg.stages):
        raise ValueError(f"q_pool must be in [0, {len(cfg.stages) - 1}], got {cfg.q_pool}")
    depth = sum(cfg.stages)
    # Stochastic depth grows linearly with depth (plain Python, so building on the meta device works).
    drop_rates = [cfg.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    dim, heads = cfg.embed_dim, cfg.num_heads
    specs: list[BlockSpec] = []
    for stage, n_blocks in enumerate(cfg.stages):
        for j in range(n_blocks):
            first = stage > 0 and j == 0
            dim_out = int(dim * cfg.dim_mul) if first else dim
            heads = int(heads * cfg.head_mul) if first else heads
            # The first block of a stage still runs on the previous stage's grid (it pools its queries
            # there), so it keeps the previous stage's window size.
            window = cfg.window_spec[stage - 1 if first else stage]
            if len(specs) in cfg.global_att_blocks:
                window = 0
            q_stride = tuple(cfg.q_stride) if first and stage <= cfg.q_pool else None
            specs.append(BlockSpec(dim, dim_out, heads, window, q_stride, drop_rates[len(specs)]))
            dim = dim_out
    return specs


class Hiera(nn.Module):
    """Hiera trunk. forward(images (B, 3, H, W)) -> [stage-1 .. stage-4 features], each (B, C_i, H_i, W_i).

    H and W must be multiples of `size_multiple` (32 for every preset): the stride-4 token grid must
    tile with the window positional embedding and halve evenly at each q-pool.
    """

    def __init__(self, config: HieraConfig) -> None:
        super().__init__()
        self.config = config
        specs = block_schedule(config)
        embed_dim, window0 = config.embed_dim, config.window_spec[0]
        self.patch_embed = PatchEmbed(embed_dim)
        # Windowed absolute position embedding (arXiv 2311.05613): a coarse background embedding
        # resized to the token grid plus a per-window embedding tiled over it.
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *config.window_pos_embed_bkg_spatial_size))
        self.pos_embed_window = nn.Parameter(torch.zeros(1, embed_dim, window0, window0))
        self.blocks = nn.ModuleList(
            MultiScaleBlock(
                s.dim, s.dim_out, s.num_heads, s.window_size, s.q_stride, config.mlp_ratio, s.drop_path
            )
            for s in specs
        )
        ends = [sum(config.stages[: i + 1]) - 1 for i in range(len(config.stages))]
        self.stage_ends = tuple(ends)
        self.stage_dims = tuple(specs[i].dim_out for i in ends)
        pooled = [PATCH_STRIDE * s**config.q_pool for s in config.q_stride]
        self.size_multiple = math.lcm(PATCH_STRIDE * window0, *pooled)

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"image height and width must be multiples of {m}, got {h}x{w}")

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1, C, height, width) position embedding for a token grid of that size."""
        window = self.pos_embed_window
        background = F.interpolate(self.pos_embed, size=(height, width), mode="bicubic")
        return background + window.tile(1, 1, height // window.shape[2], width // window.shape[3])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(images)
        x = self.patch_embed(images)
        x = x + self.position_embedding(*x.shape[-2:])
        # Channels-last once, contiguous, so the blocks' Linear/LayerNorm never copy their input.
        x = x.permute(0, 2, 3, 1).contiguous()
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs
