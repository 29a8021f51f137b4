"""`uniultra export onnx`: encoder + decoder ONNX graphs and their metadata, for deployment."""

from __future__ import annotations

import argparse
import sys

EXTRA_HINT = "install the export extra: pip install 'uniultra[export]' (onnx, onnxruntime, onnxscript)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a model for deployment (ONNX)",
        description="Export a model for deployment.",
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    onnx = formats.add_parser(
        "onnx",
        help="image encoder + prompt decoder as two ONNX graphs",
        description="Write encoder.onnx (normalised image -> image embedding + high-res features), decoder.onnx "
        "(features + points/box, dynamic number of points -> low-res mask logits, IoU), for a model with an "
        "automatic head (the default has one) auto_decoder.onnx (features + channel id -> mask logits, "
        "presence), optionally encoder.int8.onnx, and uniultra-onnx.json (pre-processing constants, label "
        "meanings, config, sha256 of each file). Run them with uniultra.export.OnnxPredictor (needs no torch).",
    )
    onnx.add_argument("--model", required=True, help="checkpoint path, 'default', or 'preset:NAME' (random weights)")
    onnx.add_argument("--out", required=True, help="output directory (created if missing)")
    onnx.add_argument("--size", type=int, default=None,
                      help="input size, a multiple of 32 (default: the checkpoint's, 1024 for presets)")
    onnx.add_argument("--int8", action="store_true", help="also write a dynamically INT8-quantised encoder")
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 18 (default 20)")
    onnx.add_argument("--attention", choices=("ort", "onnx"), default="ort",
                      help="'ort': onnxruntime's fused MultiHeadAttention op (default, fastest); "
                      "'onnx': standard ops only, for other runtimes")
    onnx.add_argument("--no-fold", action="store_true",
                      help="keep the neck's and decoder's high-res 1x1 convs separate (default: composed into one)")
    onnx.set_defaults(func=run_onnx)


def run_onnx(args: argparse.Namespace) -> int:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        print(f"uniultra export: error: {exc.name} is not installed; {EXTRA_HINT}", file=sys.stderr)
        return 2
    from uniultra.export.onnx_export import DEFAULT_OPSET, ExportError, export_onnx

    try:
        result = export_onnx(
            args.model,
            args.out,
            image_size=args.size,
            int8=args.int8,
            opset=args.opset or DEFAULT_OPSET,
            fold_high_res=not args.no_fold,
            attention=args.attention,
        )
    except ExportError as exc:
        print(f"uniultra export: error: {exc}", file=sys.stderr)
        return 1
    meta = result.metadata
    print(f"exported {meta['model']['preset']} at {meta['image_size']} px (opset {meta['onnx_opset']}) "
          f"to {result.out_dir}")
    for key, path in result.files.items():
        print(f"  {key:<13} {path.name:<20} {path.stat().st_size / 1e6:8.2f} MB")
    print(f"  metadata      {result.metadata_path.name}")
    worst = max(v for k, v in result.check.items() if "int8" not in k)
    print(f"onnxruntime vs PyTorch on the export inputs: max abs difference {worst:.2e}")
    print(f"use: uniultra.export.OnnxPredictor({str(result.out_dir)!r}{', int8=True' if args.int8 else ''})")
    return 0
