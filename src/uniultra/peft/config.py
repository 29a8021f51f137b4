"""`PeftConfig`: one switch for the CH-Adapter and the parameter-efficient baselines (SPEC section 2).

Methods (paper Table V):

- ``ch_adapter``   CH-Adapter (context bottleneck + fixed-kernel edge branch) in the Hiera blocks;
- ``adapter``      plain bottleneck adapter = CH-Adapter without the edge branch;
- ``lora``         LoRA on every attention ``qkv`` Linear of the selected blocks;
- ``adapter_lora`` plain bottleneck adapter + LoRA;
- ``decoder_only`` nothing inserted, only the prompt encoder / mask decoder / no_mem_embed train;
- ``full``         everything trains (trunk and neck included).

For every method except ``full`` the Hiera trunk and the FPN neck are frozen. The three
``train_*`` flags choose which of the prompt encoder, mask decoder and ``no_mem_embed`` train; they
apply to every method (``full`` with the defaults trains everything).

LoRA scaling follows Hu et al. (2021) and the PEFT library: ``delta W = (alpha / rank) * B @ A``,
so ``lora_alpha == lora_rank`` (the default, 4 and 4) means a scaling of 1; B starts at zero.

The CH-Adapter's bottleneck width is ``round(ratio * D)`` (at least 1) for a block of width D; the
edge branch has ``edge_channels`` (c) channels, each filtered by one fixed 3x3 kernel per direction
(``sobel``: the chosen subset of the four directions, in the canonical order
horizontal, vertical, diagonal, anti_diagonal whatever order they are given in; ``laplace``: a
single Laplacian kernel, `directions` is then ignored; ``none``: no edge branch).
``placement`` applies to adapters and LoRA alike: ``every_block`` or ``stage_end`` (the last
block of each of the four stages).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("ch_adapter", "adapter", "lora", "adapter_lora", "decoder_only", "full")
DIRECTIONS = ("horizontal", "vertical", "diagonal", "anti_diagonal")
EDGE_OPERATORS = ("sobel", "laplace", "none")
EDGE_ACTIVATIONS = ("gelu", "none")
PLACEMENTS = ("every_block", "stage_end")


class PeftConfigError(ValueError):
    """An invalid PEFT configuration; the message names the field and the accepted values."""


@dataclass(frozen=True)
class PeftConfig:
    method: str = "ch_adapter"
    # Context bottleneck D -> ratio*D -> D (the paper: 1/4, "768 -> 192").
    ratio: float = 0.25
    # Edge branch: patch mixer D -> c, depthwise fixed kernels, channel mixer c*n_kernels -> D.
    edge_channels: int = 8
    directions: tuple[str, ...] = DIRECTIONS
    edge_operator: str = "sobel"
    # Nonlinearity between the filtered responses and the channel mixer ("none" = linear branch).
    edge_activation: str = "gelu"
    # The CH-Adapter's context bottleneck; false = the edge branch alone (the paper's "edge only"
    # ablation; ch_adapter only: the plain adapter IS the context branch).
    context_branch: bool = True
    # s in x = x + MLP(u) + s * H.
    scale: float = 0.5
    placement: str = "every_block"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    train_prompt_encoder: bool = True
    train_mask_decoder: bool = True
    train_no_mem_embed: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("edge_operator", self.edge_operator, EDGE_OPERATORS)
        _choice("edge_activation", self.edge_activation, EDGE_ACTIVATIONS)
        _choice("placement", self.placement, PLACEMENTS)
        directions = self.directions
        if isinstance(directions, str):
            directions = (directions,)
        if not isinstance(directions, list | tuple):
            raise PeftConfigError(f"directions must be a list of {list(DIRECTIONS)}, got {directions!r}")
        normalised = []
        for d in directions:
            name = d.replace("-", "_").lower() if isinstance(d, str) else d
            if name not in DIRECTIONS:
                raise PeftConfigError(f"unknown edge direction {d!r}; choose from {list(DIRECTIONS)}")
            if name in normalised:
                raise PeftConfigError(f"edge direction {d!r} given twice")
            normalised.append(name)
        if not normalised and self.edge_operator == "sobel":
            raise PeftConfigError("edge_operator 'sobel' needs at least one direction (or use edge_operator 'none')")
        # Canonical order: the same subset always builds the same module (and checkpoint layout).
        object.__setattr__(self, "directions", tuple(d for d in DIRECTIONS if d in normalised))
        _number("ratio", self.ratio, positive=True)
        _number("scale", self.scale)
        _number("lora_alpha", self.lora_alpha, positive=True)
        _integer("edge_channels", self.edge_channels)
        _integer("lora_rank", self.lora_rank)
        if not self.context_branch and (self.method != "ch_adapter" or self.edge_operator == "none"):
            raise PeftConfigError("context_branch: false leaves only the edge branch: it needs method "
                                  f"'ch_adapter' with an edge operator (got method {self.method!r}, "
                                  f"edge_operator {self.edge_operator!r})")
        for name in ("train_prompt_encoder", "train_mask_decoder", "train_no_mem_embed", "context_branch"):
            if not isinstance(getattr(self, name), bool):
                raise PeftConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    # What the method inserts and trains.
    @property
    def uses_adapter(self) -> bool:
        return self.method in ("ch_adapter", "adapter", "adapter_lora")

    @property
    def uses_lora(self) -> bool:
        return self.method in ("lora", "adapter_lora")

    @property
    def trains_encoder(self) -> bool:
        """True only for full fine-tuning: every other method freezes trunk and neck."""
        return self.method == "full"

    @property
    def adapter_edge_operator(self) -> str:
        """Edge operator the inserted adapters really use: the plain adapter has no edge branch."""
        return self.edge_operator if self.method == "ch_adapter" else "none"

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe dict (lists, not tuples)."""
        data = asdict(self)
        data["directions"] = list(self.directions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PeftConfig:
        if data is None:
            return cls()
        if isinstance(data, PeftConfig):
            return data
        if not isinstance(data, dict):
            raise PeftConfigError(f"a PEFT config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PeftConfigError(f"unknown PEFT config keys {unknown}; known keys: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise PeftConfigError(f"unknown {name} {value!r}; choose one of {list(allowed)}")


def _number(name: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PeftConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise PeftConfigError(f"{name} must be > 0, got {value!r}")


def _integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PeftConfigError(f"{name} must be an integer >= 1, got {value!r}")
