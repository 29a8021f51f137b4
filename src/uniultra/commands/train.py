"""`uniultra train`: train or adapt a model from a YAML config (docs/training.md).

Several processes: `torchrun --nproc_per_node N -m uniultra train --config ...` (DDP; nccl on
CUDA, gloo on CPU). Only process 0 writes logs and checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from uniultra.config_io import merge_dicts
from uniultra.shipped import resolve_config, shipped_config_names


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train / adapt a model (PEFT, DDP, resumable) from a YAML config",
        description="Train from a YAML config. Relative paths in the config are resolved against the "
                    "current directory. Writes OUT/{last.pt,best.pt,steps.csv,epochs.csv,log.json,curves.png}.",
    )
    parser.add_argument("--config", required=True, metavar="FILE|NAME",
                        help="YAML training config: a file (e.g. configs/cpu/...), or the name of a config shipped "
                             f"with the package ({', '.join(shipped_config_names()) or 'none'})")
    add_data_option(parser)
    parser.add_argument("--base", default=None, metavar="CHECKPOINT",
                        help="starting checkpoint: a file (official SAM2 .pt or UniUltra), 'default' (the bundled "
                             "model) or 'preset:NAME' (random init); overrides model.base")
    add_out_option(parser)
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides optim.epochs)")
    add_run_options(parser, set_example="optim.lr=5e-4",
                    progress_help="no progress bar / cache bars (lines every log_every steps instead)")
    parser.set_defaults(func=run_train)


# --- options shared with `uniultra distill` ------------------------------------------------------

def add_data_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", default=None, metavar="DIR",
                        help="dataset folder (repeatable); replaces the config's data list, train/val splits")


def add_out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (overrides out_dir)")


def add_run_options(parser: argparse.ArgumentParser, *, set_example: str, progress_help: str) -> None:
    """--resume, --set, --device, --no-progress (registered last, so they close the help)."""
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt (starts fresh when there is none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help=f"override any config key, e.g. --set {set_example} (value read as YAML; repeatable)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (overrides device)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help=progress_help)


def set_overrides(set_options: list[str]) -> dict:
    """The config overrides of every --set KEY=VALUE, merged in order."""
    from uniultra.engine.config import parse_set_option

    overrides: dict = {}
    for text in set_options:
        overrides = merge_dicts(overrides, parse_set_option(text))
    return overrides


def run_overrides(args: argparse.Namespace) -> dict:
    """The config overrides of the shared options: every --set, then --out, --epochs (the
    run's optim.epochs), --device and --no-progress, which win over a --set of the same key."""
    overrides = set_overrides(args.set_options)
    if args.out is not None:
        overrides["out_dir"] = args.out
    if args.epochs is not None:
        overrides = merge_dicts(overrides, {"optim": {"epochs": args.epochs}})
    if args.device is not None:
        overrides["device"] = args.device
    if args.progress is not None:
        overrides["progress"] = args.progress
    return overrides


def command_line() -> str:
    """This process's command line as one would type it, recorded in the run's logs."""
    return shlex.join(["uniultra", *sys.argv[1:]])


# --- uniultra train -------------------------------------------------------------------------------

DEFAULT_BASE = "default"
PRESET_PREFIX = "preset:"


def build_overrides(args: argparse.Namespace) -> dict:
    overrides = run_overrides(args)
    if args.base is not None:
        # --base wins over --set model.base; no other option touches the model section.
        if args.base.startswith(PRESET_PREFIX):
            # What load_model calls preset:NAME: a random initialisation of that preset.
            model = {"base": None, "preset": args.base[len(PRESET_PREFIX):]}
        else:
            model = {"base": args.base}
        overrides = merge_dicts(overrides, {"model": model})
    return overrides


def resolve_base(config):
    """model.base `default` (from --base or the config) -> the bundled default model's file, which
    is what the trainer loads (it takes a checkpoint path); any other value is left as it is."""
    import dataclasses

    if config.model.base != DEFAULT_BASE:
        return config
    from uniultra.inference.loading import bundled_default_path

    path = bundled_default_path()
    if not path.is_file():
        raise FileNotFoundError(f"model.base default: the bundled default model is not in this installation "
                                f"({path}); pass a checkpoint file with --base")
    return config.replace(model=dataclasses.replace(config.model, base=str(path)))


def run_train(args: argparse.Namespace) -> int:
    from uniultra.engine.config import load_train_config
    from uniultra.engine.trainer import train

    config_path = resolve_config(args.config)
    config = resolve_base(load_train_config(config_path, build_overrides(args), args.data))
    result = train(config, resume=args.resume, command=command_line(), source=str(config_path))
    state = result.state
    if state.best_epoch is not None and state.best_score is not None:
        print(f"done: {state.epoch} epochs, {state.step} steps; best val Dice {100 * state.best_score:.2f} "
              f"at epoch {state.best_epoch}; {result.out_dir / 'best.pt'}")
    else:
        print(f"done: {state.epoch} epochs, {state.step} steps; {result.out_dir / 'best.pt'}")
    return 0
