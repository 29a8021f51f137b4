"""How large a crop around each box should a zoomed model answer on? A sweep of the inference margin.

    python benchmarks/probe_zoom_margin.py --model default --margins 1.2 1.3 1.4 1.5 1.6
    python benchmarks/probe_zoom_margin.py --model runs/loo/grow-finetune-phantoms3/ddti/best.pt \\
        --datasets ddti --split all --name ddti-held-out

A zoomed model answers every box on a crop of the box enlarged `margin` times (the checkpoint's
`meta.inference.zoom.margin`; training drew it from `zoom.margin`, [1.15, 1.8] for the default's recipe).
A smaller crop shows the object larger and less of what surrounds it; a larger one shows more context.
For each margin: box Dice / HD95 per set at the given jitter and the mean over sets.
`--split all` takes every image of a set (a held-out fold's protocol).
Writes benchmarks/results/probe-zoom-margin-<name>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from box_rows import box_row, save_result
from shared_sets import DATASETS

from uniultra.evaluation.evaluate import load_datasets, make_method
from uniultra.inference.zoom import ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent


def sweep_margins(model: str, datasets, margins: list[float], jitter: float) -> tuple[float, dict[str, dict]]:
    method = make_method(model)
    predictor = getattr(method, "predictor", None)
    if not isinstance(predictor, ZoomPredictor):
        raise SystemExit(f"{model}: not a zoomed model, it has no crop margin")
    shipped, rows = predictor.margin, {}
    for margin in margins:
        predictor.margin = margin
        row = box_row(method, datasets, jitter, f"margin {margin:g}")
        per_set = {name: {"dice": round(dice, 2), "hd95": round(row["hd95"][name], 2)}
                   for name, dice in row["dice"].items()}
        rows[f"{margin:g}"] = {"sets": per_set, "mean_dice": round(row["mean_dice"], 2)}
    predictor.margin = shipped
    return shipped, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--name", default="val")
    parser.add_argument("--split", default="val", help="a split name, or 'all' for every image")
    parser.add_argument("--jitter", type=float, default=20.0, help="box jitter J, px at 1024 scale")
    parser.add_argument("--margins", type=float, nargs="+", default=[1.2, 1.3, 1.4, 1.5, 1.6])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    split = None if args.split == "all" else args.split
    datasets = load_datasets([Path(args.data_root) / name for name in args.datasets], split, None)
    start = time.perf_counter()
    shipped, rows = sweep_margins(args.model, datasets, args.margins, args.jitter)
    best = max(rows, key=lambda m: rows[m]["mean_dice"])
    command = (f"python benchmarks/probe_zoom_margin.py --model {args.model} --name {args.name} --split {args.split} "
               f"--jitter {args.jitter:g} --datasets {' '.join(args.datasets)} "
               f"--margins {' '.join(f'{m:g}' for m in args.margins)}")
    out = save_result(f"probe-zoom-margin-{args.name}", {
        "model": args.model, "split": args.split, "prompt": f"box J={args.jitter:g}, seed 0",
        "shipped_margin": shipped, "best_margin": float(best), "seconds": round(time.perf_counter() - start, 1),
        "command": command, "margins": rows})
    print(f"best margin {best} (shipped {shipped:g}); wrote {out}")


if __name__ == "__main__":
    main()
