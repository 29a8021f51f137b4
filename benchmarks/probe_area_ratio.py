"""Does a model fill the box? Per image: Dice and mask area / true area, for several models, same boxes.

    python benchmarks/probe_area_ratio.py --models default runs/complex-candidate.safetensors --dataset tg3k

Written for the thyroid gland (tg3k), which wraps around the trachea: a model that has not learned
its shape draws a blob over the whole box, trachea included (area ratio well above 1). Test split,
box J = 20 (seed 0, the prompts of `uniultra evaluate`). Writes `benchmarks/results/<name>.json` with
every image's row and, per model, the mean Dice, the median area ratio and the share of images whose
mask is more than 1.3 times the truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import load_sample
from uniultra.data.prompts import make_prompt
from uniultra.evaluation.evaluate import load_datasets
from uniultra.inference.loading import load_predictor

ROOT = Path(__file__).resolve().parent.parent
OVERFILL = 1.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default"])
    parser.add_argument("--dataset", default="tg3k")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--name", default=None, help="result file name (default area-ratio-<dataset>)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    predictors = {spec: load_predictor(spec) for spec in args.models}
    (dataset,) = load_datasets([Path(args.data_root) / args.dataset], args.split, None)
    rows = []
    for sample in dataset.samples:
        item = load_sample(sample)
        truth = item["mask"] > 0
        prompt = make_prompt(item["mask"], "box", stem=sample.stem, jitter=args.jitter)
        if prompt is None:
            continue
        row = {"stem": sample.stem}
        for spec, predictor in predictors.items():
            predictor.set_image(item["image"])
            mask = np.asarray(predictor.predict(box=prompt.boxes)[0]).reshape(-1, *truth.shape).any(0)
            row[spec] = {"dice": float(2 * (mask & truth).sum() / (mask.sum() + truth.sum())),
                         "area_ratio": float(mask.sum() / truth.sum())}
        rows.append(row)
    summary = {spec: {"dice": round(100 * float(np.mean([r[spec]["dice"] for r in rows])), 2),
                      "median_area_ratio": round(float(np.median([r[spec]["area_ratio"] for r in rows])), 3),
                      f"share_over_{OVERFILL}": round(float(np.mean([r[spec]["area_ratio"] > OVERFILL
                                                                     for r in rows])), 3)}
               for spec in predictors}
    print(json.dumps(summary, indent=1))
    out = ROOT / "benchmarks" / "results" / f"{args.name or f'area-ratio-{args.dataset}'}.json"
    atomic_write_text(out, json.dumps({"dataset": args.dataset, "split": args.split, "jitter": args.jitter,
                                       "n": len(rows), "summary": summary, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
