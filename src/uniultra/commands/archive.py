"""`uniultra archive`: pack a run folder small enough to commit, and restore it (engine.run_archive)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "pack a training run small enough to commit (resumable), or restore it"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "archive", help=HELP,
        description="A run folder of uniultra train, auto train or distill packed for a repository: 16-bit "
                    "tensors, the resume state only while the run is unfinished, the logs and reports; restore it, "
                    "then resume with the run's own command and --resume --out DIR.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    pack = sub.add_parser("pack", help="pack RUN_DIR into the new folder DEST (e.g. weights/NAME)")
    pack.add_argument("run_dir", metavar="RUN_DIR")
    pack.add_argument("dest", metavar="DEST")
    pack.add_argument("--keep-state", action="store_true",
                      help="keep the last.pt files (optimiser, RNG) of a finished run too")
    pack.set_defaults(func=run_pack)
    restore = sub.add_parser("restore", help="write the archive ARCHIVE back as the run folder RUN_DIR")
    restore.add_argument("archive", metavar="ARCHIVE")
    restore.add_argument("run_dir", metavar="RUN_DIR")
    restore.set_defaults(func=run_restore)


def run_pack(args: argparse.Namespace) -> int:
    from uniultra.engine.run_archive import pack_run

    archive = pack_run(args.run_dir, args.dest, keep_state=args.keep_state)
    models = ", ".join(n for n in archive.files if n.endswith(".pt") and not n.endswith("last.pt"))
    resumable = any(n.endswith("last.pt") for n in archive.files)
    state = ", resume state" if resumable else ""
    kind = f"{'resumable' if resumable else 'finished'}: {models or 'no model yet'}{state}, logs"
    print(f"wrote {archive.path} ({kind}); checkpoints {archive.bytes_before / 1e6:.1f} MB -> "
          f"{archive.bytes_after / 1e6:.1f} MB")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from uniultra.engine.run_archive import restore_run

    written = restore_run(args.archive, args.run_dir)
    print(f"restored {len(written)} files into {args.run_dir}")
    if (Path(args.run_dir) / "last.pt").is_file():
        print(f"continue with the run's command plus: --resume --out {args.run_dir}")
    return 0
