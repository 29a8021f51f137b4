"""`--runtime` of predict, demo, evaluate and serve: one definition, one help text.

Not a command. Registering it imports nothing heavy; the choice is turned into a model spec by
uniultra.export.runtime.runtime_spec when the command runs.
"""

from __future__ import annotations

import argparse
import sys

# Equal to uniultra.export.runtime.RUNTIMES (tests/test_openvino.py checks); spelled out so that
# building the parser imports no torch.
RUNTIME_CHOICES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "auto")
RUNTIME_HELP = (
    "engine that runs --model: torch, torch-bf16 (encoder under bf16 autocast), onnx / onnx-int8 (onnxruntime), "
    "openvino / openvino-bf16 / openvino-int8 (OpenVINO; int8 by NNCF calibrated on phantoms), or auto (the fastest "
    "for this CPU by a fixed rule: openvino-bf16 with bf16 units, else onnx, else torch). A checkpoint is exported "
    "to ONNX once into a cache ($UNIULTRA_CACHE_DIR, default ~/.cache/uniultra). bf16 falls back to fp32 on CPUs "
    "without bf16 units. Default: --model as given (a checkpoint runs on PyTorch)"
)


def add_runtime_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=RUNTIME_CHOICES, default=None, help=RUNTIME_HELP)


def model_spec(args: argparse.Namespace, automatic: bool = False) -> str:
    """`args.model` turned into the spec that runs it on `args.runtime` (notes go to stderr)."""
    if args.runtime is None:
        return args.model
    from uniultra.export.runtime import runtime_spec

    return runtime_spec(args.model, args.runtime, image_size=args.size, device=args.device, automatic=automatic,
                        log=lambda message: print(message, file=sys.stderr, flush=True))
