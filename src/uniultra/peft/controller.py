"""Modality controller of the student encoder (SPEC 5; De-LightSAM / ESP-MedSAM).

Per modality k and per Hiera block: a learned key token K_k and value token V_k in the block's
attention space (split over its heads like the image tokens' keys and values), a learned logit
bias b_k per head for that token, and a parallel bottleneck MLP (down, GELU, up) whose output is
added to the block's residual stream next to the block's own MLP (same input, norm2(x)).

    controllers = attach_modality_controller(model, ("busi", "ddti", "tg3k"), bottleneck=8)
    with use_modality(model, torch.tensor([0, 2])):     # per-sample modality ids (or names)
        features = model.encode_image(images)             # sample 0 as busi, sample 1 as tg3k
    features = model.encode_image(images)                 # no modality: the shared network

**Exactly a no-op when zeroed.** The modality token does not join the softmax over the image
tokens. Each query attends to the image tokens exactly as before (the fused SDPA kernel,
untouched) and, in addition, to the modality token with a share of its own:

    out(q) = softmax(q K^T / sqrt(d)) V  +  sigmoid(q . K_k / sqrt(d) + b_k) * V_k

Inside the softmax, any finite key and bias would take a share p > 0 and scale every image
token's weight by (1 - p), so no finite initial state could leave the block unchanged. With the
separate share the block changes only through V_k and the MLP's up projection, which start at
zero: their terms are then exact zeros and `x + 0` is `x` bit for bit, whatever the key, bias and
down projection hold. Gradient still reaches V_k (d out / d V_k = the sigmoid share, > 0) and the
up projection (its input GELU(down u) is non-zero: the down projection starts random, like LoRA's
A) from the first step; K_k, b_k and the down projection follow once V_k and up have moved. The
extra cost per block is one dot product and one outer product per query, with no change to the
attention kernel, and nothing at all while no modality is selected.

**Routing.** Parameters are stacked per modality (first axis k); a batch gathers, for every
sample, the rows of its own modality id. Sample i reads only row ids[i], so changing modality j's
parameters cannot change the output of a sample of modality i != j (and the gradient of row j is
exactly zero in a batch without modality j). In windowed blocks the attention runs on B x nW
windows with the batch as the slowest axis (uniultra.models.hiera.window_partition), so every
window of sample i gets sample i's token.

`None` (no modality selected, the state after attaching) or a detached controller = the shared
network: the blocks skip the controller entirely.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniultra.models.hiera import MultiScaleBlock
from uniultra.peft.taps import find_trunk

DEFAULT_BOTTLENECK = 8
# Module attribute of a MultiScaleBlock holding its controller (and part of parameter names).
SLOT = "controller"

ModalityIds = torch.Tensor | int | str | Sequence[int | str] | None


@dataclass(frozen=True)
class ControllerConfig:
    """What a checkpoint records to rebuild the controller (`meta["modality_controller"]`)."""

    modalities: tuple[str, ...]
    bottleneck: int = DEFAULT_BOTTLENECK
    blocks: tuple[int, ...] | None = None  # trunk block indices; None = every block

    def __post_init__(self) -> None:
        modalities = tuple(self.modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be a non-empty list of distinct names, got {list(modalities)}")
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {self.bottleneck}")
        object.__setattr__(self, "modalities", modalities)
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "bottleneck": self.bottleneck,
                "blocks": None if self.blocks is None else list(self.blocks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ControllerConfig:
        unknown = set(data) - {"modalities", "bottleneck", "blocks"}
        if unknown:
            raise ValueError(f"unknown modality controller keys {sorted(unknown)}")
        return cls(**data)


class BlockController(nn.Module):
    """The controller of one block: K modality key/value tokens with logit biases (attention) and
    K bottleneck MLPs (residual). `ids` (set through `set_modality`) selects each sample's row."""

    def __init__(self, modalities: Sequence[str], dim: int, num_heads: int, bottleneck: int,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.modalities = tuple(modalities)
        self.num_heads = num_heads
        self.bottleneck = bottleneck
        k = len(self.modalities)
        kw = {"device": device, "dtype": dtype}
        self.key = nn.Parameter(torch.empty(k, dim, **kw))
        self.value = nn.Parameter(torch.zeros(k, dim, **kw))  # zero: exact no-op (module docstring)
        self.logit_bias = nn.Parameter(torch.zeros(k, num_heads, **kw))
        self.down_weight = nn.Parameter(torch.empty(k, bottleneck, dim, **kw))
        self.down_bias = nn.Parameter(torch.empty(k, bottleneck, **kw))
        self.up_weight = nn.Parameter(torch.zeros(k, dim, bottleneck, **kw))  # zero: exact no-op
        self.up_bias = nn.Parameter(torch.zeros(k, dim, **kw))
        self.ids: torch.Tensor | None = None  # (B,) or (1,) modality ids of the current batch
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The initial (zeroed) state: value and up projection zero, key and down projection random."""
        nn.init.trunc_normal_(self.key, std=0.02)
        self.value.zero_()
        self.logit_bias.zero_()
        # nn.Linear's default init, per modality: the up projection's input is non-zero at once.
        bound = 1.0 / math.sqrt(self.down_weight.shape[-1])
        self.down_weight.uniform_(-bound, bound)
        self.down_bias.uniform_(-bound, bound)
        self.up_weight.zero_()
        self.up_bias.zero_()

    @property
    def active(self) -> bool:
        """Whether a modality is selected (the block skips the controller otherwise)."""
        return self.ids is not None

    def extra_kv(self, q: torch.Tensor) -> torch.Tensor:
        """The modality token's term of the attention output for queries q (B', heads, N, hd)."""
        key = self._rows(self.key, q.shape[0]).unflatten(-1, (self.num_heads, -1)).unsqueeze(-1)
        value = self._rows(self.value, q.shape[0]).unflatten(-1, (self.num_heads, -1)).unsqueeze(-2)
        bias = self._rows(self.logit_bias, q.shape[0])[..., None, None]
        # (B', h, N, hd) @ (B', h, hd, 1) -> one logit per query; its sigmoid is the token's share.
        share = torch.sigmoid(torch.matmul(q, key) * q.shape[-1] ** -0.5 + bias)
        return torch.matmul(share, value)  # (B', h, N, 1) @ (B', h, 1, hd)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """The bottleneck MLP residual for u = norm2(x), (B, H, W, dim)."""
        b = u.shape[0]
        down_w, down_b = self._rows(self.down_weight, b), self._rows(self.down_bias, b)
        up_w, up_b = self._rows(self.up_weight, b), self._rows(self.up_bias, b)
        hidden = F.gelu(torch.einsum("bhwd,brd->bhwr", u, down_w) + down_b[:, None, None])
        return torch.einsum("bhwr,bdr->bhwd", hidden, up_w) + up_b[:, None, None]

    def _rows(self, param: torch.Tensor, batch: int) -> torch.Tensor:
        """Each item's row of a per-modality parameter, for a batch of `batch` items: samples, or
        windows (B x nW, each sample's windows contiguous)."""
        ids = self.ids
        if ids is None:
            raise RuntimeError("no modality selected: call set_modality first")
        if len(ids) == 1 or batch == len(ids):
            rows = param[ids]
        elif batch % len(ids) == 0:
            rows = param[ids.repeat_interleave(batch // len(ids))]
        else:
            raise ValueError(f"{len(ids)} modality ids do not fit a batch of {batch} (samples or windows)")
        return rows.expand(batch, *rows.shape[1:]) if len(ids) == 1 else rows

    def extra_repr(self) -> str:
        return f"modalities={list(self.modalities)}, heads={self.num_heads}, bottleneck={self.bottleneck}"


# --- attaching and finding ------------------------------------------------------------------------

def attach_modality_controller(
    model: nn.Module, modalities: Sequence[str], bottleneck: int = DEFAULT_BOTTLENECK,
    blocks: Sequence[int] | None = None,
) -> list[BlockController]:
    """Insert a zeroed controller into every (or every listed) Hiera block of `model` (a
    SAM2ImageModel, ImageEncoder or Hiera); returns the controllers. No modality is selected
    afterwards, and even with one selected the outputs are unchanged until training moves them."""
    config = ControllerConfig(tuple(modalities), bottleneck, None if blocks is None else tuple(blocks))
    trunk = find_trunk(model)
    if find_controllers(model):
        raise ValueError("a modality controller is already attached (detach_modality_controller first)")
    indices = range(len(trunk.blocks)) if config.blocks is None else config.blocks
    out = []
    for i in indices:
        if not 0 <= i < len(trunk.blocks):
            raise IndexError(f"block {i} out of range: the trunk has {len(trunk.blocks)} blocks")
        block: MultiScaleBlock = trunk.blocks[i]
        ref = block.norm2.weight
        controller = BlockController(config.modalities, block.norm2.normalized_shape[0], block.attn.num_heads,
                                     config.bottleneck, device=ref.device, dtype=ref.dtype)
        setattr(block, SLOT, controller)
        out.append(controller)
    return out


def attach_from_config(model: nn.Module, config: ControllerConfig | dict[str, Any]) -> list[BlockController]:
    """`attach_modality_controller` from a recorded `ControllerConfig` (checkpoint loading)."""
    if isinstance(config, dict):
        config = ControllerConfig.from_dict(config)
    return attach_modality_controller(model, config.modalities, config.bottleneck, config.blocks)


def detach_modality_controller(model: nn.Module) -> None:
    """Remove every controller: the model is the shared network again (state-dict keys included)."""
    for block in find_trunk(model).blocks:
        setattr(block, SLOT, None)


def find_controllers(model: nn.Module) -> dict[int, BlockController]:
    """{trunk block index: its controller}."""
    blocks = find_trunk(model).blocks
    return {i: b.controller for i, b in enumerate(blocks) if getattr(b, SLOT, None) is not None}


def controller_config(model: nn.Module) -> ControllerConfig | None:
    """The attached controller's config (None without one), to record in a checkpoint."""
    found = find_controllers(model)
    if not found:
        return None
    first = next(iter(found.values()))
    every = len(found) == len(find_trunk(model).blocks)
    return ControllerConfig(first.modalities, first.bottleneck, None if every else tuple(found))


def modality_names(model: nn.Module) -> tuple[str, ...]:
    """The attached controller's modality names (empty without a controller)."""
    found = find_controllers(model)
    return next(iter(found.values())).modalities if found else ()


def label_modality_ids(model: nn.Module, labels: Sequence[str], source: str) -> torch.Tensor | None:
    """The controller's modality id of each data label (a data entry's label names its modality),
    or None when the model has no controller. `source` (the config) names the culprit in errors."""
    names = modality_names(model)
    if not names:
        return None
    unknown = [label for label in labels if label not in names]
    if unknown:
        raise ValueError(f"{source}: the data labels {unknown} are no modality of the model's controller, which "
                         f"knows {list(names)} (a data entry's label, its `name:` or else its folder name, selects "
                         "its modality)")
    return torch.tensor([names.index(label) for label in labels], dtype=torch.long)


def is_controller_parameter(name: str) -> bool:
    """Whether a qualified parameter name belongs to a modality controller."""
    return f".{SLOT}." in f".{name}"


def controller_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The controllers' parameters by qualified name in `model`."""
    return {n: p for n, p in model.named_parameters() if is_controller_parameter(n)}


# --- selecting the modality -----------------------------------------------------------------------

def modality_ids(model: nn.Module, ids: ModalityIds) -> torch.Tensor | None:
    """A LongTensor of modality ids from ids or names (None stays None)."""
    if ids is None:
        return None
    found = find_controllers(model)
    if not found:
        raise ValueError("the model has no modality controller (attach_modality_controller, or load a "
                         "checkpoint trained with one)")
    first = next(iter(found.values()))
    names = first.modalities
    if isinstance(ids, torch.Tensor):
        tensor = ids.to(device=first.key.device, dtype=torch.long).reshape(-1)
    else:
        items = [ids] if isinstance(ids, int | str) else list(ids)
        tensor = torch.tensor([_index(names, i) for i in items], dtype=torch.long, device=first.key.device)
    if tensor.numel() == 0:
        raise ValueError("empty modality ids")
    bad = tensor[(tensor < 0) | (tensor >= len(names))]
    if bad.numel():
        raise ValueError(f"modality id {int(bad[0])} out of range: the controller has {len(names)} modalities "
                         f"{list(names)}")
    return tensor


def _index(names: tuple[str, ...], item: int | str) -> int:
    if isinstance(item, str):
        if item not in names:
            raise ValueError(f"unknown modality {item!r}; the controller knows {list(names)}")
        return names.index(item)
    return int(item)


def set_modality(model: nn.Module, ids: ModalityIds) -> None:
    """Select the modality of every sample of the next forwards: a LongTensor (B,) of ids, names,
    one id / name for the whole batch, or None (the shared network)."""
    tensor = modality_ids(model, ids)
    for controller in find_controllers(model).values():
        controller.ids = tensor


@contextlib.contextmanager
def use_modality(model: nn.Module, ids: ModalityIds) -> Iterator[None]:
    """`set_modality` for the `with` block; the previous selection is restored after it."""
    found = find_controllers(model)
    before = {i: c.ids for i, c in found.items()}
    set_modality(model, ids)
    try:
        yield
    finally:
        for i, c in found.items():
            c.ids = before[i]
