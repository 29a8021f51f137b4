"""`uniultra bench`: benchmarks whose numbers go into BENCHMARKS.md (one sub-command each)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark (speed)", description="Run a benchmark.")
    benches = p.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    speed = benches.add_parser(
        "speed",
        help="latency, FLOPs, parameters and peak memory: PyTorch, onnxruntime and OpenVINO, fp32/bf16/int8",
        description="For each model: encoder, one-box decoder and end-to-end predict latency (median after "
        "warm-up, threads fixed) on every runtime that can run here (PyTorch fp32 / bf16 encoder, onnxruntime "
        "fp32 / dynamic-INT8 encoder, OpenVINO fp32 / bf16 / NNCF-INT8 encoder), parameters, FLOPs, peak RSS in a "
        "fresh process; the CPU model, its ISA flags and the fp32 / bf16 matmul peaks of the same run, and each "
        "encoder's achieved GFLOP/s as a fraction of the fp32 peak. Writes OUT_DIR/speed-<date>.json and prints "
        "a markdown table.",
    )
    speed.add_argument("--models", default="mini,tiny", help="comma-separated presets (default mini,tiny)")
    speed.add_argument("--size", type=int, default=1024, help="model input size (default 1024)")
    speed.add_argument("--threads", type=int, default=2, help="intra-op threads for every runtime (default 2)")
    speed.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (default 10)")
    speed.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    speed.add_argument("--image-size", default="600x800", metavar="HxW",
                       help="size of the uint8 test image for end-to-end timing (default 600x800)")
    speed.add_argument("--with-official", action="store_true",
                       help="also time the official sam2 image encoder built with the same configs")
    speed.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-memory subprocesses")
    speed.add_argument("--runtime", "--runtimes", dest="runtimes", default="all", metavar="LIST",
                       help="comma-separated runtimes to measure, named as --runtime of predict: torch, torch-bf16, "
                       "onnx, onnx-int8, openvino, openvino-bf16, openvino-int8 (default all; those that cannot "
                       "run here, e.g. bf16 without bf16 units, are skipped and listed)")
    speed.add_argument("--peak-size", type=int, default=2048, metavar="N",
                       help="matrix size of the fp32 / bf16 matmul peak measurement (default 2048)")
    speed.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"),
                       help="where speed-<date>.json goes (default benchmarks/results)")
    speed.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                       help="also write the table into FILE's speed section (e.g. BENCHMARKS.md); "
                       "other sections are kept")
    speed.set_defaults(func=run_speed_command)


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"--image-size must look like 600x800, got {text!r}") from exc
    if h < 32 or w < 32:
        raise ValueError(f"--image-size must be at least 32x32, got {text!r}")
    return h, w


def _parse_runtimes(text: str) -> tuple[str, ...]:
    from uniultra.bench.speed import RUNTIME_KEYS, RUNTIMES

    if text == "all":
        return RUNTIMES
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIME_KEYS]
    if unknown or not names:
        raise ValueError(f"--runtime: unknown {unknown}; choose from {', '.join(RUNTIME_KEYS)} (comma-separated)")
    return tuple(RUNTIME_KEYS[n] for n in names)


def run_speed_command(args: argparse.Namespace) -> int:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("uniultra bench: error: onnxruntime is not installed; pip install 'uniultra[export]'", file=sys.stderr)
        return 2
    from uniultra.bench.speed import SpeedConfig, markdown_table, run_speed, update_benchmarks_md, write_results

    cfg = SpeedConfig(
        models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
        size=args.size,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
        with_official=args.with_official,
        image_hw=_parse_hw(args.image_size),
        rss=args.rss,
        runtimes=_parse_runtimes(args.runtimes),
        peak_size=args.peak_size,
    )
    results = run_speed(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    results["command"] = "uniultra " + shlex.join(sys.argv[sys.argv.index("bench"):] if "bench" in sys.argv
                                                  else ["bench", "speed"])
    path = write_results(results, args.out_dir)
    table = markdown_table(results)
    print(table)
    print(f"\nresults: {path}", file=sys.stderr)
    if args.markdown is not None:
        update_benchmarks_md(args.markdown, results, table)
        print(f"updated: {args.markdown}", file=sys.stderr)
    return 0
