"""`uniultra average`: one model from the averaged weights of several fine-tuned from one start."""

from __future__ import annotations

import argparse

from uniultra.commands.pack import add_meta_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "average",
        help="average the weights of models fine-tuned from one starting point into one file (a model soup)",
        description="Write one standalone model whose weights are the (weighted) mean of the given checkpoints' "
        "weights. Meant for runs fine-tuned from the SAME starting weights (other seeds, other data mixes): "
        "their average is one model at the speed of one, often better than each. Models trained from "
        "different random starts do not average into a working model. Automatic-mode checkpoints are refused: "
        "average the base models, then train a head on the result (`uniultra auto train`).",
    )
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints of one architecture")
    p.add_argument("--out", required=True, help="output file (.safetensors or .pt)")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one positive mixing weight per checkpoint (normalised to sum 1; default: equal)")
    p.add_argument("--half", action="store_true", help="store weights as fp16 (half the size on disk)")
    add_meta_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from uniultra.inference.loading import average_models

    path = average_models(args.checkpoints, args.out, weights=args.weights, half=args.half, meta=args.meta)
    print(f"wrote {path} ({Path(path).stat().st_size / 1e6:.2f} MB), the average of {len(args.checkpoints)} models")
    return 0
