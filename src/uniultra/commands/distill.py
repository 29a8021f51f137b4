"""`uniultra distill`: deep-supervised distillation of UniUltra-mini from an adapted teacher
(docs/distill.md).

Several processes: `torchrun --nproc_per_node N -m uniultra distill --config ...` (DDP; nccl on
CUDA, gloo on CPU). Only process 0 writes logs and checkpoints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uniultra.commands.train import add_data_option, add_out_option, add_run_options, command_line, run_overrides
from uniultra.config_io import merge_dicts


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distil UniUltra-mini from an adapted teacher (DSKD, or MDKD with a general teacher, then optional "
             "fine-tuning; DDP, resumable)",
        description="Deep-supervised knowledge distillation (SPEC 4; with an `mdkd` section: multi-modal decoupled "
                    "distillation, SPEC 5) from a YAML config. Relative paths are "
                    "resolved against the current directory. Writes OUT/{student.pt,distilled.pt,last.pt,"
                    "steps.csv,epochs.csv,log.json,curves.png,distill_report.json} and OUT/finetune/.",
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML distillation config (configs/cpu/...)")
    parser.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                        help="teacher checkpoint (UniUltra, with CH-Adapters); overrides teacher.checkpoint")
    parser.add_argument("--teacher-base", default=None, metavar="CHECKPOINT",
                        help="base file of an adapter-only teacher (default: the path recorded in it)")
    parser.add_argument("--general-teacher", default=None, metavar="CHECKPOINT",
                        help="MDKD: the general teacher (a foundation checkpoint without adapters); overrides "
                             "mdkd.general_teacher and turns MDKD on with the mdkd section's defaults if the config "
                             "has none")
    add_data_option(parser)
    add_out_option(parser)
    parser.add_argument("--epochs", type=int, default=None, help="DSKD epochs (overrides optim.epochs)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="end-to-end fine-tuning epochs after DSKD (overrides finetune.epochs; 0 = none)")
    add_run_options(parser, set_example="levels=[1]",
                    progress_help="no progress bars (lines every log_every steps instead)")
    parser.set_defaults(func=run_distill)


def build_overrides(args: argparse.Namespace) -> dict:
    # The shared options touch none of the teacher / finetune keys, so merging these last only
    # makes them win over a --set of the same key, as before.
    overrides = run_overrides(args)
    teacher = {k: v for k, v in (("checkpoint", args.teacher), ("base", args.teacher_base)) if v is not None}
    if teacher:
        overrides = merge_dicts(overrides, {"teacher": teacher})
    if args.general_teacher is not None:
        overrides = merge_dicts(overrides, {"mdkd": {"general_teacher": args.general_teacher}})
    if args.finetune_epochs is not None:
        overrides = merge_dicts(overrides, {"finetune": {"epochs": args.finetune_epochs}})
    return overrides


def run_distill(args: argparse.Namespace) -> int:
    from uniultra.distill.config import load_distill_config
    from uniultra.distill.trainer import distill

    config = load_distill_config(args.config, build_overrides(args), args.data)
    result = distill(config, resume=args.resume, command=command_line(), source=str(args.config))
    dskd = result.report.get("dskd", {})
    loss = "L_MDKD" if result.report.get("mdkd") else "L_DSKD"
    if dskd.get("best_val_loss") is not None:
        print(f"DSKD: {dskd.get('epochs')} epochs, best val {loss} {dskd['best_val_loss']:.4g} at epoch "
              f"{dskd.get('best_epoch')}")
    ft = result.report.get("finetune")
    if ft and ft.get("best_val_dice") is not None:
        print(f"fine-tuning: {ft['epochs']} epochs, best val Dice {100 * ft['best_val_dice']:.2f} at epoch "
              f"{ft['best_epoch']}")
    return 0
