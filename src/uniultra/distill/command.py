"""`uniultra distill`: deep-supervised distillation of UniUltra-mini from an adapted teacher
(docs/distill.md).

Several processes: `torchrun --nproc_per_node N -m uniultra distill --config ...` (DDP; nccl on
CUDA, gloo on CPU). Only process 0 writes logs and checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from uniultra.config_io import merge_dicts


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil UniUltra-mini from an adapted teacher (DSKD, then optional fine-tuning; DDP, resumable)",
        description="Deep-supervised knowledge distillation (SPEC 4) from a YAML config. Relative paths are "
                    "resolved against the current directory. Writes OUT/{student.pt,distilled.pt,last.pt,"
                    "steps.csv,epochs.csv,log.json,curves.png,distill_report.json} and OUT/finetune/.",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML distillation config (configs/cpu/...)")
    parser.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                        help="teacher checkpoint (UniUltra, with CH-Adapters); overrides teacher.checkpoint")
    parser.add_argument("--teacher-base", default=None, metavar="CHECKPOINT",
                        help="base file of an adapter-only teacher (default: the path recorded in it)")
    parser.add_argument("--data", action="append", default=None, metavar="DIR",
                        help="dataset folder (repeatable); replaces the config's data list, train/val splits")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (overrides out_dir)")
    parser.add_argument("--epochs", type=int, default=None, help="DSKD epochs (overrides optim.epochs)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="end-to-end fine-tuning epochs after DSKD (overrides finetune.epochs; 0 = none)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT/last.pt (starts fresh when there is none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="override any config key, e.g. --set levels=[1] (value read as YAML; repeatable)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1, mps (overrides device)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (lines every log_every steps instead)")
    parser.set_defaults(func=run_distill)


def build_overrides(args: argparse.Namespace) -> dict:
    from uniultra.engine.config import parse_set_option

    overrides: dict = {}
    for text in args.set_options:
        overrides = merge_dicts(overrides, parse_set_option(text))
    teacher = {k: v for k, v in (("checkpoint", args.teacher), ("base", args.teacher_base)) if v is not None}
    if teacher:
        overrides = merge_dicts(overrides, {"teacher": teacher})
    if args.out is not None:
        overrides["out_dir"] = args.out
    if args.epochs is not None:
        overrides = merge_dicts(overrides, {"optim": {"epochs": args.epochs}})
    if args.finetune_epochs is not None:
        overrides = merge_dicts(overrides, {"finetune": {"epochs": args.finetune_epochs}})
    if args.device is not None:
        overrides["device"] = args.device
    if args.progress is not None:
        overrides["progress"] = args.progress
    return overrides


def run_distill(args: argparse.Namespace) -> int:
    from uniultra.distill.config import load_distill_config
    from uniultra.distill.trainer import distill

    config = load_distill_config(args.config, build_overrides(args), args.data)
    command = shlex.join(["uniultra", *sys.argv[1:]])
    result = distill(config, resume=args.resume, command=command, source=str(args.config))
    dskd = result.report.get("dskd", {})
    if dskd.get("best_val_loss") is not None:
        print(f"DSKD: {dskd.get('epochs')} epochs, best val L_DSKD {dskd['best_val_loss']:.4g} at epoch "
              f"{dskd.get('best_epoch')}")
    ft = result.report.get("finetune")
    if ft and ft.get("best_val_dice") is not None:
        print(f"fine-tuning: {ft['epochs']} epochs, best val Dice {100 * ft['best_val_dice']:.2f} at epoch "
              f"{ft['best_epoch']}")
    return 0
