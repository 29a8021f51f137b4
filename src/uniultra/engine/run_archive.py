"""A run folder packed small enough to commit (`uniultra archive pack`), and put back (`restore`).

A CPU run may outlive a session or a machine: its folder under runs/ does not survive, a git
repository does. The archive keeps what resuming and evaluating need, at about half the size:
- `last.pt` (the resume state) while the run is unfinished; a finished run keeps only its models;
- every other checkpoint of the folder: `best.pt` (uniultra train, uniultra auto train), and for
  `uniultra distill` also `distilled.pt` and `student.pt`;
- the logs (steps.csv, epochs.csv, log.json, curves.png) and reports (`*.json`);
- a sub-run (a subfolder with its own best.pt / last.pt: distillation's `finetune/`), the same way.
A run is finished when every resume state in it reached its last epoch and no phase is still to
come (a distillation whose fine-tuning has not started is not finished).
Float32 tensors are stored in 16 bits: weights and EMA in float16 (10 mantissa bits), the
optimiser's state in bfloat16, because Adam's second moments reach 1e-20, far below float16's
range (they would round to zero and blow the next steps up). Scalars (Adam's step counts) and
small tensors stay float32, integer tensors (RNG states) as they are. Restoring casts back to
float32, so a resumed run continues from weights within float16 rounding of the saved ones: not
bit-identical to an uninterrupted run, unlike `--resume` from the original `last.pt`.
Other subfolders (phantom data, a teacher's feature cache) are left out: the trainer writes them
again from their seed or their teacher. `ARCHIVE.json` lists every file with its sha256; restore checks them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from uniultra.atomic import atomic_write, atomic_write_text, file_sha256
from uniultra.engine.checkpointing import LAST

FORMAT = "uniultra-run-archive"
VERSION = 1
MANIFEST = "ARCHIVE.json"
BEST = "best.pt"
LOGS = ("steps.csv", "epochs.csv", "log.json", "curves.png")
FINETUNE = "finetune"  # uniultra distill's fine-tuning phase, a run folder of its own
PACKED = "packed"  # key of a packed tensor file: {"packed": document, "cast": [paths cast to 16 bits]}
# Below this many elements a tensor is not worth the rounding.
SMALL = 1024


@dataclass(frozen=True)
class Archive:
    path: Path
    files: dict[str, str]  # name -> sha256
    finished: bool
    bytes_before: int
    bytes_after: int


def _target_dtype(where: str, tensor: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype a tensor is stored in, or None to keep it."""
    if tensor.dtype != torch.float32 or tensor.numel() < SMALL:
        return None
    if where.startswith("optimizer") or tensor.abs().max() > torch.finfo(torch.float16).max:
        return torch.bfloat16
    return torch.float16


def _map_tensors(value: Any, where: str, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
    if torch.is_tensor(value):
        return fn(where, value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, f"{where}.{k}" if where else str(k), fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(v, f"{where}[{i}]", fn) for i, v in enumerate(value)]
        return type(value)(mapped) if isinstance(value, list) else tuple(mapped)
    return value


def pack_document(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with its large float32 tensors in 16 bits, and the list of what was cast."""
    cast: list[str] = []

    def shrink(where: str, tensor: torch.Tensor) -> torch.Tensor:
        dtype = _target_dtype(where, tensor)
        if dtype is None:
            return tensor
        cast.append(where)
        return tensor.to(dtype)

    return {PACKED: _map_tensors(document, "", shrink), "cast": cast}


def unpack_document(packed: dict[str, Any], path: Path) -> dict[str, Any]:
    """The inverse of pack_document: every tensor it cast back in float32."""
    if PACKED not in packed or "cast" not in packed:
        raise ValueError(f"{path}: not a packed run file (no '{PACKED}' / 'cast' entries)")
    cast = set(packed["cast"])
    found: set[str] = set()

    def grow(where: str, tensor: torch.Tensor) -> torch.Tensor:
        if where not in cast:
            return tensor
        found.add(where)
        return tensor.to(torch.float32)

    document = _map_tensors(packed[PACKED], "", grow)
    if found != cast:
        raise ValueError(f"{path}: {len(cast - found)} packed tensors are missing, e.g. {sorted(cast - found)[:3]}")
    return document


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise ValueError(f"{path}: cannot be read as a checkpoint ({exc})") from exc


def run_finished(state_doc: dict[str, Any]) -> bool:
    """A state whose loop reached its config's last epoch (nothing left to resume)."""
    state, optim = state_doc.get("state", {}), state_doc.get("config", {}).get("optim", {})
    epochs = optim.get("epochs")
    return epochs is not None and state.get("epoch", 0) >= epochs and not state.get("batch_in_epoch", 0)


def _pending_phase(run_dir: Path, state_doc: dict[str, Any]) -> bool:
    """A distillation whose fine-tuning phase is configured but has no state yet."""
    finetune = state_doc.get("config", {}).get("finetune")
    return isinstance(finetune, dict) and finetune.get("epochs", 0) > 0 and not (run_dir / FINETUNE / LAST).is_file()


def _run_parts(run_dir: Path) -> list[str]:
    """The run folder itself ("") and its sub-runs, as paths relative to it."""
    subs = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and ((p / BEST).is_file() or (p / LAST).is_file()))
    return ["", *subs]


def _states(run_dir: Path, parts: list[str]) -> dict[str, dict[str, Any]]:
    """Every resume state of the run, by its name relative to run_dir."""
    names = [f"{part}/{LAST}" if part else LAST for part in parts]
    return {name: _load(run_dir / name) for name in names if (run_dir / name).is_file()}


def _finished(run_dir: Path, states: dict[str, dict[str, Any]]) -> bool:
    return all(run_finished(doc) and not _pending_phase((run_dir / name).parent, doc) for name, doc in states.items())


def _members(run_dir: Path, parts: list[str], keep_states: bool) -> tuple[list[str], list[str]]:
    """(checkpoint files, copied files) of the archive, relative to run_dir."""
    checkpoints, copies = [], []
    for part in parts:
        folder = run_dir / part
        for path in sorted(folder.iterdir()):
            name = f"{part}/{path.name}" if part else path.name
            if path.suffix == ".pt" and path.is_file() and (path.name != LAST or keep_states):
                checkpoints.append(name)
            elif path.is_file() and (path.name in LOGS or path.suffix == ".json") and path.name != MANIFEST:
                copies.append(name)
    return checkpoints, copies


def pack_run(run_dir: str | Path, dest: str | Path, *, keep_state: bool = False) -> Archive:
    """Pack `run_dir` into the new folder `dest` (refused when dest holds an archive already).
    `keep_state` keeps the last.pt files of a finished run too."""
    run_dir, dest = Path(run_dir), Path(dest)
    if not run_dir.is_dir() or not any(run_dir.glob("*.pt")):
        raise FileNotFoundError(f"{run_dir}: no checkpoint (*.pt), not a run folder")
    if (dest / MANIFEST).exists():
        raise ValueError(f"{dest} already holds an archive ({dest / MANIFEST}); remove it or choose another folder")
    parts = _run_parts(run_dir)
    states = _states(run_dir, parts)
    finished = _finished(run_dir, states)
    checkpoints, copies = _members(run_dir, parts, keep_state or not finished)
    files: dict[str, str] = {}
    before = after = 0
    for name in checkpoints:
        packed = pack_document(states[name] if name in states else _load(run_dir / name))
        atomic_write(dest / name, lambda tmp, packed=packed: torch.save(packed, tmp))
        files[name] = file_sha256(dest / name)
        before, after = before + (run_dir / name).stat().st_size, after + (dest / name).stat().st_size
    for name in copies:
        atomic_write(dest / name, lambda tmp, name=name: shutil.copyfile(run_dir / name, tmp))
        files[name] = file_sha256(dest / name)
    progress = states[LAST].get("state") if LAST in states else None
    manifest = {"format": FORMAT, "version": VERSION, "source": str(run_dir),
                "packed": datetime.now(UTC).isoformat(timespec="seconds"), "finished": finished,
                "progress": progress, "files": files}
    # Written last: a folder without its manifest is an interrupted pack, never taken for an archive.
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return Archive(dest, files, finished, before, after)


def read_manifest(archive: str | Path) -> dict[str, Any]:
    path = Path(archive) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{archive}: no {MANIFEST}, not a run archive (uniultra archive pack writes one)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: not a run archive (format {manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise ValueError(f"{path}: archive version {manifest['version']} is newer than this uniultra reads ({VERSION})")
    # Restore writes each name under the run folder: nothing may point outside it.
    outside = [n for n in manifest.get("files", {}) if Path(n).is_absolute() or ".." in Path(n).parts]
    if outside:
        raise ValueError(f"{path}: file names outside the archive folder, e.g. {outside[0]!r}")
    return manifest


def check_archive(archive: str | Path) -> dict[str, Any]:
    """The manifest of `archive`, after checking that every file it lists is there with its sha256."""
    archive = Path(archive)
    manifest = read_manifest(archive)
    for name, digest in manifest["files"].items():
        if not (archive / name).is_file():
            raise FileNotFoundError(f"{archive / name}: listed in {MANIFEST} but missing")
        if file_sha256(archive / name) != digest:
            raise ValueError(f"{archive / name}: sha256 differs from {MANIFEST} (damaged or edited)")
    return manifest


def restore_run(archive: str | Path, run_dir: str | Path) -> list[Path]:
    """Write the archive's files into `run_dir` as a run folder (float32 again); refused when
    run_dir holds a run already. Returns the files written."""
    archive, run_dir = Path(archive), Path(run_dir)
    manifest = check_archive(archive)
    taken = sorted(run_dir.glob("*.pt"))
    if taken:
        raise ValueError(f"{run_dir} already holds a run ({taken[0]}); restore into an empty folder")
    written = []
    # Models before states: a restore cut short never leaves a resumable state without its best.
    for name in sorted(manifest["files"], key=lambda n: Path(n).name == LAST):
        source = archive / name
        if name.endswith(".pt"):
            document = unpack_document(_load(source), source)
            atomic_write(run_dir / name, lambda tmp, d=document: torch.save(d, tmp))
        else:
            atomic_write(run_dir / name, lambda tmp, s=source: shutil.copyfile(s, tmp))
        written.append(run_dir / name)
    return written
