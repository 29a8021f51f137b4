"""The resume state `out_dir/last.pt` of a run (uniultra train, uniultra distill).

Each trainer writes its own document (format tag, config, weights, identity of what it starts
from); what they share lives here: refusing to overwrite a run, reading and checking a state
before resuming, the optimiser / RNG / progress entries, and the atomic write.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from uniultra.atomic import atomic_write
from uniultra.engine.optimisation import Optimisation
from uniultra.engine.rng import rng_state, set_rng_state

LAST = "last.pt"


def existing_state(out_dir: Path, resume: bool) -> Path | None:
    """`out_dir/last.pt` when there is one to resume, else None. One without `resume` is an
    error: a finished or interrupted run is never silently overwritten."""
    last = out_dir / LAST
    if not last.is_file():
        return None
    if not resume:
        raise ValueError(f"{out_dir} already holds a run ({last}); pass --resume to continue it "
                         "or choose another --out")
    return last


def read_state(path: Path, state_format: str, what: str) -> dict[str, Any]:
    """Load a resume state, checking its format tag (`what` names the expected writer)."""
    doc = torch.load(path, map_location="cpu", weights_only=True)
    if doc.get("format") != state_format:
        raise ValueError(f"{path}: not a {what}")
    return doc


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_config_unchanged(path: Path, saved: dict[str, Any], current: dict[str, Any],
                           resumable: tuple[str, ...]) -> None:
    """A resumed run must be the run that was saved: only keys starting with one of `resumable`
    (those that do not change the result) may differ."""
    before, now = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(before) | set(now)
                     if before.get(k) != now.get(k) and not k.startswith(resumable))
    if changed:
        details = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        raise ValueError(f"{path}: the config differs from the run being resumed ({details}); "
                         f"only {', '.join(resumable)} may change")


def check_world_size(path: Path, doc: dict[str, Any], world_size: int, batch_in_epoch: int) -> None:
    # Mid-epoch, the sampler's shard of the epoch depends on the process count; at an epoch end
    # nothing does, so only then may it change.
    if doc["world_size"] != world_size and batch_in_epoch:
        raise ValueError(f"{path}: saved mid-epoch by {doc['world_size']} processes; resume it with the same "
                         f"number (now {world_size})")


def progress_entries(optimisation: Optimisation, state: Any, world_size: int) -> dict[str, Any]:
    """The shared part of a resume state: optimiser, EMA, scaler, RNG states, loop position
    (a dataclass) and process count."""
    return {**optimisation.state_dict(), "rng": rng_state(), "state": asdict(state), "world_size": world_size}


def restore_progress(doc: dict[str, Any], optimisation: Optimisation, path: Path) -> None:
    """Put back what `progress_entries` saved, except the loop position (the caller's dataclass)."""
    optimisation.load_state_dict(doc, path)
    set_rng_state(doc["rng"])


def write_state(path: Path, document: dict[str, Any]) -> None:
    # Atomic: an interruption while saving leaves the previous state whole.
    atomic_write(path, lambda tmp: torch.save(document, tmp))


def resumed_message(path: Path, state: Any) -> str:
    where = f"epoch {state.epoch + 1}, batch {state.batch_in_epoch}" if state.batch_in_epoch else \
        f"the end of epoch {state.epoch}"
    return f"resumed from {path} at {where} (step {state.step})"
