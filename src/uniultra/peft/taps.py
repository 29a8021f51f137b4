"""Record the distillation taps of Hiera blocks (SPEC section 4).

For a block with an adapter, x_out = x + MLP(u) + s * H:

- ``block``   D2: the Hiera block's own output x + MLP(u), without the adapter;
- ``adapter`` D3: the adapter output s * H (None for a block without adapter);
- ``output``  D1: their sum, what the block returns (the stage output at a stage's last block).

Usage::

    with record_taps(model) as taps:           # default: the last block of every stage
        model.encode_image(images)
        d1, d2, d3 = taps.stage(1).output, taps.stage(1).block, taps.stage(1).adapter

The tensors are the ones the forward computed, channels-last (B, H, W, D), not detached (a
student's taps carry gradients; run a frozen teacher under torch.no_grad()). Each forward
overwrites the previous one's taps; leaving the `with` block releases them. The mechanism is the
block's `tap_store` attribute (uniultra.models.hiera.MultiScaleBlock); for D3 alone an ordinary
`block.adapter.register_forward_hook` works as well, since the adapter returns s * H.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from uniultra.models.hiera import Hiera


@dataclass
class BlockTaps:
    block: torch.Tensor  # D2
    adapter: torch.Tensor | None  # D3
    output: torch.Tensor  # D1


def find_trunk(model: nn.Module) -> Hiera:
    """The Hiera trunk of a SAM2ImageModel, an ImageEncoder or a Hiera."""
    if isinstance(model, Hiera):
        return model
    encoder = getattr(model, "image_encoder", model)
    trunk = getattr(encoder, "trunk", None)
    if not isinstance(trunk, Hiera):
        raise TypeError(f"{type(model).__name__} has no Hiera trunk (expected SAM2ImageModel, ImageEncoder or Hiera)")
    return trunk


class TapRecorder:
    def __init__(self, model: nn.Module, blocks: Iterable[int] | None = None) -> None:
        self.trunk = find_trunk(model)
        n = len(self.trunk.blocks)
        self.blocks = tuple(self.trunk.stage_ends if blocks is None else blocks)
        bad = [i for i in self.blocks if not 0 <= i < n]
        if bad:
            raise IndexError(f"block indices {bad} out of range: the trunk has {n} blocks")

    def __enter__(self) -> TapRecorder:
        busy = [i for i in self.blocks if self.trunk.blocks[i].tap_store is not None]
        if busy:
            raise RuntimeError(f"blocks {busy} are already being recorded (nested record_taps)")
        for i in self.blocks:
            self.trunk.blocks[i].tap_store = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for i in self.blocks:
            self.trunk.blocks[i].tap_store = None

    def __getitem__(self, block: int) -> BlockTaps:
        if block not in self.blocks:
            raise KeyError(f"block {block} is not recorded (recording {list(self.blocks)})")
        store = self.trunk.blocks[block].tap_store
        if not store:
            raise RuntimeError(f"no taps for block {block}: run a forward inside the `with record_taps(...)` block")
        return BlockTaps(block=store["block"], adapter=store["adapter"], output=store["output"])

    def stage(self, level: int) -> BlockTaps:
        """Taps of the last block of stage `level`, counted from 1 as in the paper (l = 1, 2, 3)."""
        ends = self.trunk.stage_ends
        if not 1 <= level <= len(ends):
            raise IndexError(f"stage level must be in 1..{len(ends)}, got {level}")
        return self[ends[level - 1]]


def record_taps(model: nn.Module, blocks: Iterable[int] | None = None) -> TapRecorder:
    """Context manager recording D1/D2/D3 at the given trunk block indices (default: stage ends)."""
    return TapRecorder(model, blocks)
