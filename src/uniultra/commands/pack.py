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
    add_meta_arg(p)
    p.add_argument("--decoder-blur", type=int, choices=(0, 1, 2), default=None,
                   help="set the decoder's fixed anti-lattice blur after the last (1) or both (2) upscaling "
                        "steps, 0 = none (no weights; default: keep the checkpoint's)")
    p.add_argument("--prompt-model", default=None, metavar="SPEC",
                   help="with an automatic-mode checkpoint: the model that answers box and point prompts in the "
                        "packed file (a path or 'default'; a head it has is left out); the checkpoint's own base "
                        "stays as the automatic head's encoder")
    p.set_defaults(func=run)


def json_object(text: str) -> dict:
    """argparse type of `--meta`: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {type(value).__name__}")
    return value


def add_meta_arg(parser: argparse.ArgumentParser) -> None:
    """`--meta` of the commands that write a model file (pack, average)."""
    parser.add_argument("--meta", type=json_object, default={}, help="JSON object merged into the file's metadata")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniultra.inference.loading import pack_model

    path = pack_model(args.checkpoint, args.out, half=args.half, meta=args.meta, decoder_blur=args.decoder_blur,
                      prompt_model=args.prompt_model)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB)")
    return 0
