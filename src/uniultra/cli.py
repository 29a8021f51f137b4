"""The `uniultra` command line: each sub-command lives beside the code it drives.

A command module exposes `register(subparsers)`, which adds its parser and sets `func`
(a callable taking the parsed namespace and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules are imported lazily by name so `uniultra --help` stays fast and a broken optional
# dependency of one command does not take the others down.
COMMAND_MODULES: tuple[str, ...] = (
    "uniultra.models.info_command",
    "uniultra.models.pack_command",
    "uniultra.data.commands",
    "uniultra.evaluation.command",
    "uniultra.segment.command",
    "uniultra.engine.command",
    "uniultra.distill.command",
    "uniultra.auto.command",
    "uniultra.serve.command",
    "uniultra.export.command",
    "uniultra.bench.command",
)


def build_parser() -> argparse.ArgumentParser:
    from uniultra import __version__

    parser = argparse.ArgumentParser(prog="uniultra", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"uniultra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        # User errors get one clear line, not a traceback.
        print(f"uniultra {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
