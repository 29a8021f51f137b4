"""A run folder packed small enough to commit (`uniultra archive pack`), and put back (`restore`).

A CPU run may outlive a session or a machine: its folder under runs/ does not survive, a git
repository does. The archive keeps what resuming and evaluating need, at about half the size:
- `last.pt` (the resume state) while the run is unfinished; a finished run keeps only `best.pt`;
- `best.pt`;
- the logs (steps.csv, epochs.csv, log.json, curves.png).
Float32 tensors are stored in 16 bits: weights and EMA in float16 (10 mantissa bits), the
optimiser's state in bfloat16, because Adam's second moments reach 1e-20, far below float16's
range (they would round to zero and blow the next steps up). Scalars (Adam's step counts) and
small tensors stay float32, integer tensors (RNG states) as they are. Restoring casts back to
float32, so a resumed run continues from weights within float16 rounding of the saved ones: not
bit-identical to an uninterrupted run, unlike `--resume` from the original `last.pt`.
Subfolders (phantom data written by the trainer) are left out: the trainer writes them again
from their seed. `ARCHIVE.json` lists every file with its sha256; restore checks them.
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


def pack_run(run_dir: str | Path, dest: str | Path, *, keep_state: bool = False) -> Archive:
    """Pack `run_dir` into the new folder `dest` (refused when dest holds an archive already).
    `keep_state` keeps last.pt of a finished run too."""
    run_dir, dest = Path(run_dir), Path(dest)
    if not (run_dir / BEST).is_file() and not (run_dir / LAST).is_file():
        raise FileNotFoundError(f"{run_dir}: no {BEST} or {LAST}, not a run folder")
    if (dest / MANIFEST).exists():
        raise ValueError(f"{dest} already holds an archive ({dest / MANIFEST}); remove it or choose another folder")
    state = _load(run_dir / LAST) if (run_dir / LAST).is_file() else None
    finished = state is None or run_finished(state)
    tensors = {BEST: run_dir / BEST} if (run_dir / BEST).is_file() else {}
    if state is not None and (keep_state or not finished):
        tensors[LAST] = run_dir / LAST
    files: dict[str, str] = {}
    before = after = 0
    for name, source in tensors.items():
        packed = pack_document(state if name == LAST else _load(source))
        atomic_write(dest / name, lambda tmp, packed=packed: torch.save(packed, tmp))
        files[name] = file_sha256(dest / name)
        before, after = before + source.stat().st_size, after + (dest / name).stat().st_size
    for name in LOGS:
        if (run_dir / name).is_file():
            atomic_write(dest / name, lambda tmp, name=name: shutil.copyfile(run_dir / name, tmp))
            files[name] = file_sha256(dest / name)
    progress = state.get("state") if state is not None else None
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
    taken = [run_dir / n for n in (LAST, BEST) if (run_dir / n).exists()]
    if taken:
        raise ValueError(f"{run_dir} already holds a run ({taken[0]}); restore into an empty folder")
    written = []
    # best.pt before last.pt: a restore cut short never leaves a resumable state without its best.
    for name in sorted(manifest["files"], key=lambda n: n == LAST):
        source = archive / name
        if name in (BEST, LAST):
            document = unpack_document(_load(source), source)
            atomic_write(run_dir / name, lambda tmp, d=document: torch.save(d, tmp))
        else:
            atomic_write(run_dir / name, lambda tmp, s=source: shutil.copyfile(s, tmp))
        written.append(run_dir / name)
    return written
