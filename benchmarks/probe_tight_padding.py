"""Which padding should `--tight-boxes` add to exact boxes for this model? A sweep on the val splits.

    python benchmarks/probe_tight_padding.py --model default --pads 0 2 4 6 8

A zoomed model trained on loosened boxes (J drawn from {0, 10, 20, 30} px) reads an exact box as one
that cuts into the object; `--tight-boxes` pushes every box out by uniultra.inference.zoom.TIGHT_BOX_PADDING
px (1024 scale) first, and cuts the answer to the box as drawn (`ZoomPredictor.clip_to_boxes`; `--no-clip`
sweeps the padding alone, as before 2026-12-05 afternoon). The padding was chosen on val for the default of its
day; a model that draws larger or smaller boundaries may want another. For each padding: box J = 0 Dice /
HD95 per val set and the mean over sets. Writes benchmarks/results/probe-tight-padding-<name>.json.
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
from uniultra.inference.zoom import TIGHT_BOX_PADDING, ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent


def sweep(model: str, datasets, pads: list[float], clip: bool) -> dict[str, dict]:
    method = make_method(model)
    predictor = getattr(method, "predictor", None)
    if not isinstance(predictor, ZoomPredictor) or predictor.supports_exact_box:
        raise SystemExit(f"{model}: padding applies to zoomed models without exact-box tokens only")
    predictor.clip_to_boxes = clip
    rows = {}
    for pad in pads:
        predictor.box_padding = pad
        results = evaluate(method, datasets, prompt_mode="box", jitter=0.0, seed=0, progress=False)
        summaries = {r.name: r.summary() for r in results}
        per_set = {name: {"dice": round(100 * x["dice"]["mean"], 2), "hd95": round(x["hd95"]["mean"], 2)}
                   for name, x in summaries.items()}
        mean = round(float(np.mean([v["dice"] for v in per_set.values()])), 2)
        rows[f"{pad:g}"] = {"sets": per_set, "mean_dice": mean}
        print(f"pad {pad:g}: mean {mean:.2f}", per_set, flush=True)
    predictor.box_padding = 0.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--name", default="val")
    parser.add_argument("--split", default="val")
    parser.add_argument("--pads", type=float, nargs="+", default=[0.0, 2.0, 4.0, 6.0, 8.0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--no-clip", action="store_true", help="do not cut the answers to the boxes as drawn")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    datasets = load_datasets([Path(args.data_root) / name for name in args.datasets], args.split, None)
    start = time.perf_counter()
    rows = sweep(args.model, datasets, args.pads, clip=not args.no_clip)
    best = max(rows, key=lambda pad: rows[pad]["mean_dice"])
    document = {"benchmark": f"probe-tight-padding-{args.name}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "model": args.model, "split": args.split, "prompt": "box J=0, seed 0",
                "shipped_padding": TIGHT_BOX_PADDING, "best_padding": float(best), "clip_to_boxes": not args.no_clip,
                "seconds": round(time.perf_counter() - start, 1),
                "command": f"python benchmarks/probe_tight_padding.py --model {args.model} --name {args.name} "
                           f"--split {args.split} --pads {' '.join(f'{p:g}' for p in args.pads)}"
                           + (" --no-clip" if args.no_clip else ""),
                "pads": rows}
    out = ROOT / "benchmarks" / "results" / f"probe-tight-padding-{args.name}.json"
    atomic_write_text(out, json.dumps(document, indent=1))
    print(f"best padding {best} (shipped {TIGHT_BOX_PADDING:g}); wrote {out}")


if __name__ == "__main__":
    main()
