"""End-to-end speed of `uniultra evaluate` with a baseline on 600 BUSI images.

Measures everything a user waits for: reading image and mask, building the seeded prompt, the
baseline prediction at native resolution and all four metrics. Target: under a minute on the
2-core CPU. Writes benchmarks/results/evaluate-baseline.json.

    .venv/bin/python benchmarks/bench_evaluate.py [--data ../shared/data/busi] [--images 600]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "evaluate-baseline.json"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "busi")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--model", default="baseline:ellipse")
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs; the median time is reported")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if not (args.data / "images").is_dir():
        print(f"skipped: {args.data} is absent", file=sys.stderr)
        return 0
    from uniultra.atomic import atomic_write_text
    from uniultra.data.dataset import SegmentationDataset
    from uniultra.evaluation.evaluate import evaluate, make_method
    from uniultra.evaluation.report import machine_info

    dataset = SegmentationDataset(args.data)
    # Natural order lists benign_* then malignant_*: the first 600 are all lesion images.
    dataset.samples = dataset.samples[: args.images]
    method = make_method(args.model)
    timings, result = [], None
    for _ in range(args.repeats):
        start = time.perf_counter()
        (result,) = evaluate(method, [dataset], prompt_mode="box", jitter=args.jitter, seed=0, progress=False)
        timings.append(time.perf_counter() - start)
    seconds = sorted(timings)[len(timings) // 2]
    summary = result.summary()
    record = {
        "benchmark": "evaluate-baseline",
        "command": " ".join(["python", "benchmarks/bench_evaluate.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        # The machine is shared: the load says how much of the 2 cores this run really had.
        "load_average_1min": round(os.getloadavg()[0], 2),
        "dataset": dataset.name,
        "model": args.model,
        "prompt": "box",
        "jitter": args.jitter,
        "images": len(dataset.samples),
        "scored_images": summary["n"],
        "seconds": round(seconds, 3),
        "all_runs_seconds": [round(t, 3) for t in timings],
        "images_per_second": round(len(dataset.samples) / seconds, 2),
        "dice_mean": summary["dice"]["mean"],
        "note": "end to end: read image + mask, prompt, prediction at native size, Dice/IoU/HD/HD95",
    }
    atomic_write_text(args.out, json.dumps(record, indent=1) + "\n")
    print(f"{record['images']} images in {seconds:.1f} s ({record['images_per_second']} img/s), "
          f"Dice {100 * record['dice_mean']:.2f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
