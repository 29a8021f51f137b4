"""Weight averaging of models fine-tuned from one starting point (a "model soup", Wortsman et al. 2022).

Runs that start from the same weights and train briefly (another seed, another data mix) tend to
stay in one basin of the loss, so the average of their weights is itself a good model, often
better than each, and it costs nothing at inference: one model, the same speed. Runs trained
from different random initialisations do NOT average into anything useful; that is the caller's
responsibility (it cannot be told from the weights).

Pure tensor arithmetic on state dicts; building models and reading files is the caller's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def normalised_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Mixing weights summing to 1: equal without `weights`; each must be > 0."""
    if n < 2:
        raise ValueError(f"averaging needs at least two models, got {n}")
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} models")
    if any(not w > 0 for w in weights):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def average_states(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None,
                   names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The weighted mean of state dicts with the same keys and shapes, in fp32 (then the first's
    dtype). Integer tensors (counters, indices) are not averaged: they must be equal in all."""
    mix = normalised_weights(weights, len(states))
    names = list(names) if names is not None else [f"model {i}" for i in range(len(states))]
    _check_same_layout(states, names)
    averaged = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            _check_equal(key, [s[key] for s in states], names)
            averaged[key] = first.clone()
            continue
        total = sum(w * s[key].float() for w, s in zip(mix, states, strict=True))
        averaged[key] = total.to(first.dtype)
    return averaged


def _check_same_layout(states: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]) -> None:
    keys = set(states[0])
    for state, name in zip(states[1:], names[1:], strict=True):
        if set(state) != keys:
            extra, missing = sorted(set(state) - keys), sorted(keys - set(state))
            raise ValueError(f"{name} has other weights than {names[0]}: "
                             f"{len(extra)} extra (e.g. {extra[:3]}), {len(missing)} missing (e.g. {missing[:3]})")
        shapes = [k for k in keys if state[k].shape != states[0][k].shape]
        if shapes:
            k = shapes[0]
            raise ValueError(f"{name}: {len(shapes)} weights differ in shape from {names[0]}, e.g. {k}: "
                             f"{tuple(state[k].shape)} vs {tuple(states[0][k].shape)}")


def _check_equal(key: str, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    for tensor, name in zip(tensors[1:], names[1:], strict=True):
        if not torch.equal(tensor, tensors[0]):
            raise ValueError(f"{name}: integer tensor {key} differs from {names[0]}'s; it cannot be averaged")
