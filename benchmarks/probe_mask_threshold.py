"""Would another logit threshold draw better masks? Box Dice / HD95 at several mask thresholds.

    python benchmarks/probe_mask_threshold.py --model default --split val --thresholds 0 -0.5 -1 -2
    python benchmarks/probe_mask_threshold.py --model runs/loo/universal-zoom-complex/ddti/best.pt \\
        --datasets ddti --split all --thresholds 0 -1 --name ddti-held-out-complex

A mask is the model's logits above `mask_threshold` (0 by default: probability 0.5). A lower threshold
grows every mask by about a pixel at its boundary. Box J = 20 and J = 0 on the given sets, the same
prompts for every threshold. Writes benchmarks/results/probe-mask-threshold-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from shared_sets import DATASETS

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--split", default="val", help="a split name, or all")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, -0.5, -1.0, -2.0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--name", default=None, help="result name (default: the split)")
    args = parser.parse_args()
    datasets = load_datasets([Path(args.data_root) / n for n in args.datasets],
                             None if args.split == "all" else args.split, None)
    method = make_method(args.model)
    # A zoomed predictor thresholds with its wrapped predictor's mask_threshold.
    thresholded = getattr(method.predictor, "predictor", method.predictor)
    rows = {}
    for jitter in (20.0, 0.0):
        for threshold in args.thresholds:
            thresholded.mask_threshold = threshold
            results = evaluate(method, datasets, prompt_mode="box", jitter=jitter, seed=0, progress=False)
            dice = {r.name: round(100 * r.summary()["dice"]["mean"], 2) for r in results}
            row = {"dice": dice, "hd95": {r.name: round(r.summary()["hd95"]["mean"], 1) for r in results},
                   "mean_dice": round(float(np.mean(list(dice.values()))), 2)}
            rows[f"J={jitter:g} threshold {threshold:g}"] = row
            print(f"J={jitter:g} threshold {threshold:g}: {dice} mean {row['mean_dice']}", flush=True)
    name = args.name or args.split
    document = {"benchmark": f"probe-mask-threshold-{name}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "model": args.model, "split": args.split, "rows": rows}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"probe-mask-threshold-{name}.json",
                      json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
