"""Whole predict time per box: `set_image` + `predict(box=...)` on one real image, any model.

For a zoomed model (the default) this is one crop, one encoder run and one decoder run per box:
what a user waits for after drawing a box. With `--auto CHANNEL`, also `set_image` +
`predict_auto(CHANNEL)` (no prompt: the whole image, through an own automatic encoder where the model
has one), and with `--tap X Y` a later tap on the same image with CHANNEL named (`predict(points=...)`
after a first, untimed tap: a located tap reuses the head's answer for the image). Median of repeated
runs after warm-up, per thread count, all models in the same run (compare only rows of one run: the CPU
and its load are recorded).

    python benchmarks/bench_box_latency.py --models default runs/previous-default.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from uniultra.atomic import atomic_write_text
from uniultra.data.image_io import read_image
from uniultra.evaluation.report import machine_info
from uniultra.inference.cpu import cpu_model
from uniultra.inference.loading import load_predictor

ROOT = Path(__file__).resolve().parent.parent


def time_calls(once: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `once`, after `warmup` untimed calls."""
    for _ in range(warmup):
        once()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        once()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_box(predictor, image: np.ndarray, box: np.ndarray, warmup: int, repeats: int) -> list[float]:
    def once() -> None:
        predictor.set_image(image)
        predictor.predict(box=box)

    return time_calls(once, warmup, repeats)


def time_auto(predictor, image: np.ndarray, channel: str, warmup: int, repeats: int) -> list[float]:
    def once() -> None:
        predictor.set_image(image)
        predictor.predict_auto(channel)

    return time_calls(once, warmup, repeats)


def time_later_tap(predictor, image: np.ndarray, tap: np.ndarray, channel: str, warmup: int,
                   repeats: int) -> list[float]:
    """A tap on an image already tapped once, its anatomy named (the located-tap path of a zoomed model)."""
    predictor.modality = channel
    predictor.set_image(image)
    try:
        return time_calls(lambda: predictor.predict(points=tap[None], labels=np.ones(1, dtype=np.int64)),
                          warmup, repeats)
    finally:
        predictor.modality = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default"])
    parser.add_argument("--image", default=str(ROOT.parent / "shared" / "data" / "busi" / "images" / "benign_10.png"))
    parser.add_argument("--box", nargs=4, type=float, default=[200, 150, 400, 330])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--auto", default=None, metavar="CHANNEL",
                        help="also time an automatic (no-prompt) answer through this channel")
    parser.add_argument("--tap", nargs=2, type=float, default=None, metavar=("X", "Y"),
                        help="with --auto: also time a later tap at (X, Y) with that channel named")
    parser.add_argument("--name", default="box-latency")
    args = parser.parse_args()
    image, box = read_image(args.image), np.array(args.box)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for spec in args.models:
            predictor = load_predictor(spec)
            calls = {"box": lambda p=predictor: time_box(p, image, box, 3, args.repeats)}
            if args.auto:
                calls["auto"] = lambda p=predictor: time_auto(p, image, args.auto, 3, args.repeats)
            if args.auto and args.tap and predictor.selects_modality(tap=True):
                calls["later tap"] = lambda p=predictor: time_later_tap(p, image, np.array(args.tap), args.auto, 3,
                                                                        args.repeats)
            for call, timed in calls.items():
                seconds = timed()
                rows.append({"model": spec, "predictor": type(predictor).__name__, "call": call,
                             "threads": threads, "median_ms": 1000 * float(np.median(seconds)),
                             "p10_ms": 1000 * float(np.percentile(seconds, 10)),
                             "p90_ms": 1000 * float(np.percentile(seconds, 90)), "load_average": os.getloadavg()[0]})
                print(json.dumps(rows[-1]), flush=True)
    document = {"benchmark": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {**machine_info(), "cpu_model": cpu_model()}, "image": Path(args.image).name,
                "image_hw": list(image.shape[:2]), "box": args.box, "rows": rows,
                "command": "python benchmarks/bench_box_latency.py --models " + " ".join(args.models)
                + (f" --auto {args.auto}" if args.auto else "")
                + (f" --tap {args.tap[0]:g} {args.tap[1]:g}" if args.tap else "")}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"{args.name}.json", json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
