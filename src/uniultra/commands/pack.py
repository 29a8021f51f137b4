"""`uniultra pack`: turn a training checkpoint into one standalone deployable file."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pack",
        help="write a standalone (optionally fp16) model file from a checkpoint",
        description="Load any checkpoint load_model understands (adapter-only files with their base included) "
        "and write it as one standalone UniUltra file (.safetensors or .pt).",
    )
    p.add_argument("checkpoint", help="source checkpoint")
    p.add_argument("out", help="output file (.safetensors or .pt)")
    p.add_argument("--half", action="store_true", help="store weights as fp16 (half the size on disk)")
    p.add_argument("--meta", default="{}", help="JSON object merged into the file's metadata")
    p.add_argument("--decoder-blur", type=int, choices=(0, 1, 2), default=None,
                   help="set the decoder's fixed anti-lattice blur after the last (1) or both (2) upscaling "
                        "steps, 0 = none (no weights; default: keep the checkpoint's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniultra.inference.loading import pack_model

    try:
        meta = json.loads(args.meta)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--meta is not a JSON object ({exc})") from exc
    path = pack_model(args.checkpoint, args.out, half=args.half, meta=meta, decoder_blur=args.decoder_blur)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)")
    return 0
