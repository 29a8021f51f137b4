"""`uniultra info`: parameters and FLOPs of a preset or a checkpoint."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch

from uniultra.evaluation.model_info import describe, format_info
from uniultra.models.config import PRESETS, preset
from uniultra.models.image_model import SAM2ImageModel


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info",
        help="parameters and FLOPs of a model",
        description="Print parameter counts (trunk, neck, image encoder, decoder, whole model) and FLOPs "
        "(attention included) of a preset or a checkpoint.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="architecture preset (random weights)")
    source.add_argument("--model", help="checkpoint path or 'default'")
    p.add_argument("--size", type=int, default=None, help="input size, a multiple of 32 (default 1024 for presets)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.preset:
        # Parameters do not depend on the values, so a meta-device model is enough and instant.
        with torch.device("meta"):
            model = SAM2ImageModel(preset(args.preset, args.size or 1024))
    else:
        from uniultra.inference.loading import load_any_model

        model = load_any_model(args.model, image_size=args.size)
    info = describe(model)
    print(json.dumps(asdict(info), indent=2) if args.json else format_info(info))
    return 0
