"""A model against the inscribed ellipse on the committed test splits of every shared set.

Same prompts for every row (seed 0): box J = 20 and J = 0 (ellipse and model), one tap
(`point`; the anatomy named by the dataset's folder, as `uniultra evaluate` does, and again not named,
as for anatomy the model has no channel for) and box J = 20 + one corrective click (model only). Per row
and dataset: Dice, IoU, HD95 and, for the model's box rows, how clean the masks are:
- leak: share of images whose mask has more than 2 % of its area outside the prompt boxes
  enlarged by 10 % of their size on each side;
- holes: share of images whose mask has a hole (background enclosed by the mask).
Also the median seconds per object of a whole predict (image in, mask out; machine load noted).

    python benchmarks/bench_universal.py --model default --name universal-default
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import ndimage
from shared_sets import DATASETS

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.inference.cpu import cpu_model
from uniultra.inference.zoom import ZoomPredictor, tight_boxes_for

ROOT = Path(__file__).resolve().parent.parent
# (row, prompt mode, jitter, setting), zoomed models only for a setting: "tight" answers the exact boxes as
# `--tight-boxes` does; "unnamed" taps without naming the anatomy (no channel locates them). The ellipse
# answers the plain box rows.
ROWS = (("box J=20", "box", 20.0, None), ("box J=0", "box", 0.0, None), ("box J=0, tight boxes", "box", 0.0, "tight"),
        ("one tap", "point", 0.0, None), ("one tap, anatomy not named", "point", 0.0, "unnamed"),
        ("box J=20 + click", "box+click", 20.0, None))
LEAK_AREA, BOX_MARGIN = 0.02, 0.10


def leaks(prediction: np.ndarray, boxes: np.ndarray | None) -> bool:
    if boxes is None or not prediction.any():
        return False
    inside = np.zeros_like(prediction)
    h, w = prediction.shape
    for x0, y0, x1, y1 in boxes:
        mx, my = BOX_MARGIN * (x1 - x0 + 1), BOX_MARGIN * (y1 - y0 + 1)
        inside[max(0, int(y0 - my)): min(h, int(np.ceil(y1 + my)) + 1),
               max(0, int(x0 - mx)): min(w, int(np.ceil(x1 + mx)) + 1)] = True
    return (prediction & ~inside).sum() > LEAK_AREA * prediction.sum()


@contextmanager
def taps_unnamed(predictor, unnamed: bool):
    """Taps answered as if no anatomy were named: no modality, and the automatic head does not locate them."""
    if not unnamed:
        yield
        return
    before = predictor.tap_locator, predictor.modality
    predictor.tap_locator, predictor.modality = False, None
    try:
        yield
    finally:
        predictor.tap_locator, predictor.modality = before


def has_hole(prediction: np.ndarray) -> bool:
    return bool((ndimage.binary_fill_holes(prediction) & ~prediction).any())


def run_row(method, datasets, mode: str, jitter: float) -> dict:
    flags: dict[str, list[tuple[bool, bool]]] = {}

    def inspect(item, prompt, prediction):
        flags.setdefault(item["dataset"], []).append((leaks(prediction, prompt.boxes), has_hole(prediction)))

    results = evaluate(method, datasets, prompt_mode=mode, jitter=jitter, seed=0, progress=False, on_image=inspect)
    row = {}
    for r in results:
        summary = r.summary()
        marks = flags.get(r.name, [])
        per_object = [x["predict_seconds"] / max(1, x["n_objects"]) for x in r.rows]
        summary["leak_share"] = float(np.mean([m[0] for m in marks])) if marks else None
        summary["hole_share"] = float(np.mean([m[1] for m in marks])) if marks else None
        summary["median_seconds_per_object"] = float(np.median(per_object)) if per_object else None
        row[r.name] = summary
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--name", default="universal-default")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--no-ellipse", action="store_true")
    parser.add_argument("--rows", nargs="+", choices=[r[0] for r in ROWS], default=None,
                        help="re-run only these rows of the model; the others are kept from the JSON")
    args = parser.parse_args()
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    datasets = load_datasets([Path(args.data_root) / name for name in args.datasets], "test", None)
    methods = {"model": make_method(args.model)}
    if not args.no_ellipse and not args.rows:
        methods["ellipse"] = make_method("baseline:ellipse")
    rows: dict[str, dict] = json.loads(out.read_text())["rows"] if args.rows and out.is_file() else {}
    for label, method in methods.items():
        zoomed = isinstance(getattr(method, "predictor", None), ZoomPredictor)
        for row, mode, jitter, setting in ROWS:
            if (label == "ellipse" and (mode != "box" or setting)) or (args.rows and row not in args.rows) or \
                    (setting and not zoomed):
                continue
            start = time.perf_counter()
            with tight_boxes_for(getattr(method, "predictor", None), setting == "tight", args.model), \
                    taps_unnamed(getattr(method, "predictor", None), setting == "unnamed"):
                rows.setdefault(label, {})[row] = run_row(method, datasets, mode, jitter)
            rows[label][row]["seconds"] = time.perf_counter() - start
            print(f"{label} {row}: " + ", ".join(f"{k} {100 * v['dice']['mean']:.2f}"
                                                  for k, v in rows[label][row].items() if k != "seconds"), flush=True)
    document = {"benchmark": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": {**machine_info(), "cpu_model": cpu_model()}, "model": args.model, "split": "test",
                "seed": 0, "protocol": [list(r) for r in ROWS],
                "leak_definition": f"mask area outside the boxes + {BOX_MARGIN:.0%} margin > {LEAK_AREA:.0%}",
                "command": f"python benchmarks/bench_universal.py --model {args.model} --name {args.name}",
                "rows": rows}
    if args.rows:
        document["rows_re_run"] = args.rows
    atomic_write_text(out, json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
