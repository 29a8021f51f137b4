"""The `uniultra` command line: each sub-command is a module of uniultra.commands.

A command module exposes `register(subparsers)`, which adds its parser(s) and sets `func`
(a callable taking the parsed namespace and returning an exit code).

Dispatch is lazy: `COMMANDS` maps each command name to its module and its one-line help, so
`uniultra --help` imports no command module at all, and `uniultra NAME ...` imports only the
module of NAME (`uniultra --help` and `uniultra data check` never import torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    help: str


# In the order of `uniultra --help`. `help` must equal the help its module registers (a test checks).
COMMANDS: dict[str, Command] = {
    "info": Command("uniultra.commands.info", "parameters and FLOPs of a model"),
    "pack": Command("uniultra.commands.pack",
                    "write a standalone (optionally fp16) model file from a checkpoint"),
    "average": Command("uniultra.commands.average", "average the weights of models fine-tuned from one starting "
                       "point into one file (a model soup)"),
    "data": Command("uniultra.commands.data",
                    "check a dataset folder, make its train/val/test split or choose a coreset"),
    "evaluate": Command("uniultra.commands.evaluate",
                        "Dice/IoU/HD/HD95 of a model or baseline per dataset, with seeded prompts"),
    "predict": Command("uniultra.commands.segment",
                       "segment an image (or a folder) with box / point prompts, or with none (automatic mode)"),
    "demo": Command("uniultra.commands.segment", "segment example images with the bundled model and print Dice"),
    "train": Command("uniultra.commands.train", "train / adapt a model (PEFT, DDP, resumable) from a YAML config"),
    "archive": Command("uniultra.commands.archive",
                       "pack a training run small enough to commit (resumable), or restore it"),
    "distill": Command("uniultra.commands.distill",
                       "distil UniUltra-mini from an adapted teacher (DSKD, or MDKD with a general teacher, then "
                       "optional fine-tuning; DDP, resumable)"),
    "auto": Command("uniultra.commands.auto", "automatic (no-prompt) segmentation: train its head"),
    "serve": Command("uniultra.commands.serve", "interactive segmentation in the browser (web app + JSON API)"),
    "export": Command("uniultra.commands.export", "export a model for deployment (ONNX)"),
    "bench": Command("uniultra.commands.bench", "run a benchmark (speed)"),
}

# Every command module once, in help order (kept for callers that register them all).
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(c.module for c in COMMANDS.values()))


def _top_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    from uniultra import __version__

    parser = argparse.ArgumentParser(prog="uniultra", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"uniultra {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    return parser, sub


def chosen_command(argv: list[str]) -> str | None:
    """The command named on the command line: the first word that is not an option (the top-level
    parser has only -h/--help and --version, which take no value); None without a known one."""
    for word in argv:
        if word in ("--", "-h", "--help"):  # top-level help lists every command: no module needed
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser. With `command`: the real parser(s) of that command's module only (imported now).
    Without: every command as a stub carrying its help (nothing imported); enough for `--help`, a
    missing command or an unknown one, which never reach a command's own options."""
    parser, sub = _top_parser()
    if command is not None:
        importlib.import_module(COMMANDS[command].module).register(sub)
    else:
        for name, entry in COMMANDS.items():
            sub.add_parser(name, help=entry.help, add_help=False)
    return parser


def build_full_parser() -> argparse.ArgumentParser:
    """Every command's real parser (imports every command module, torch included)."""
    parser, sub = _top_parser()
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(chosen_command(argv)).parse_args(argv)
    if not hasattr(args, "func"):  # a stub parsed: only possible if the command lookup disagreed
        raise SystemExit(f"uniultra: cannot run {args.command!r}")
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        # User errors get one clear line, not a traceback.
        print(f"uniultra {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
