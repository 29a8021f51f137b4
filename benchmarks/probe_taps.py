"""How a zoomed model answers one tap: every candidate crop scored against the truth.

    python benchmarks/probe_taps.py --model default --split val

A zoomed predictor (uniultra.inference.zoom) answers a tap on several crops (around the box of a
whole-image first pass, and squares of `DEFAULT_TAP_SCALES` of the image side centred on the tap) and
keeps one answer by a selection rule. This probe separates the two causes of a weak tap Dice:
- per candidate crop: the mean Dice of its answer (which crop scale suits which anatomy);
- "oracle": the best candidate per tap, i.e. the ceiling of any selection rule;
- selection rules over the same candidates: mean IoU agreement with the other answers (what shipped
  until 2026-12-02), the predicted IoU, and agreement + w x predicted IoU for several w.
Images: the split's images with exactly one object (one tap = its farthest interior point, as in
`uniultra evaluate --prompt point`). Writes `benchmarks/results/probe-taps-<split>.json` (or `--name`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from shared_sets import DATASETS

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import load_sample
from uniultra.data.prompts import make_prompt
from uniultra.evaluation.evaluate import load_datasets
from uniultra.inference.loading import load_predictor
from uniultra.inference.prompts import PromptSet
from uniultra.inference.zoom import BORDER_PENALTY, TAP_SCORE_WEIGHT, ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent
SCORE_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
PENALTIES = (0.0, 0.25, 0.5, 1.0)  # besides the shipped BORDER_PENALTY, with the shipped score weight


def add_tap_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Which zoomed model answers the taps of which split (shared by the tap probes)."""
    parser.add_argument("--model", default="default", help="a zoomed model: default or a checkpoint path")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--split", default="val", help="train, val, test, or all (every image)")
    parser.add_argument("--threads", type=int, default=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tap_probe_arguments(parser)
    parser.add_argument("--multimask", action="store_true",
                        help="each crop's three multimask answers are candidates (a lone point is ambiguous)")
    parser.add_argument("--name", default=None, help="result file name (default probe-taps-<split>)")
    parser.add_argument("--no-stability-swap", action="store_true",
                        help="answer with the single-mask output always (SAM2 swaps in the best multimask "
                        "output when it is unstable, dynamic_multimask_via_stability)")
    parser.add_argument("--rows-out", type=Path, default=None,
                        help="also write every tap's candidates (scores, areas, agreement; no masks) as JSON, "
                        "the input of benchmarks/fit_tap_selector.py")
    return parser.parse_args()


def single_object_taps(dataset):
    """(item, tap) for each image of `dataset` with exactly one object; the tap is its farthest interior
    point, as `uniultra evaluate --prompt point` places it."""
    for sample in dataset.samples:
        item = load_sample(sample)
        prompt = make_prompt(item["mask"], "point", stem=sample.stem)
        if prompt is not None and len(prompt.points) == 1:
            yield item, prompt.points[0, 0]


def zoomed_predictor(args: argparse.Namespace) -> ZoomPredictor:
    """The zoomed predictor of `args.model`, on `args.threads` threads (exits for a model without zoom)."""
    torch.set_num_threads(args.threads)
    zoom = load_predictor(args.model)
    if not isinstance(zoom, ZoomPredictor):
        raise SystemExit(f"{args.model}: not a zoomed model; its taps are answered on the whole image only")
    return zoom


def probe_each_tap(args: argparse.Namespace, probe_image, summarise, default_name: str) -> dict:
    """The common main of a tap probe: `probe_image(zoom, item, tap)` on every one-object image of the
    zoomed model of `args`, summarised per dataset into benchmarks/results/<name>.json; returns the rows."""
    zoom = zoomed_predictor(args)
    result = {"model": args.model, "split": args.split, "datasets": {}}
    return run_tap_probe(args, result, lambda item, tap, _: probe_image(zoom, item, tap), summarise, default_name)


def run_tap_probe(args: argparse.Namespace, result: dict, probe, summarise, default_name: str,
                  keep_rows: bool = False) -> dict:
    """For each dataset of `args`: `probe(item, tap, dataset_name)` per one-object image, then
    `summarise(rows)` into result["datasets"] (with `keep_rows`, the rows into result["rows"]); writes
    benchmarks/results/<args.name or default_name>.json and returns every row by dataset."""
    every_row = {}
    split = None if args.split == "all" else args.split  # all: every image of the sets (held-out folds)
    for ds in load_datasets([Path(args.data_root) / name for name in args.datasets], split, None):
        start, rows = time.perf_counter(), every_row.setdefault(ds.name, [])
        rows += [probe(item, tap, ds.name) for item, tap in single_object_taps(ds)]
        result["datasets"][ds.name] = {**summarise(rows), "seconds": round(time.perf_counter() - start, 1)}
        if keep_rows:
            result.setdefault("rows", {})[ds.name] = rows
        print(ds.name, json.dumps(result["datasets"][ds.name]), flush=True)
    out = ROOT / "benchmarks" / "results" / f"{args.name or default_name}.json"
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return every_row


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def tap_candidates(zoom: ZoomPredictor, image: np.ndarray, point: np.ndarray, multimask: bool) -> list[dict]:
    """Every crop's answer to one positive tap (the predictor's own crops, in its order); with
    `multimask`, each of a crop's three multimask answers is a candidate of its own."""
    zoom.set_image(image)
    prompts = PromptSet.from_user(None, point[None, None], np.ones((1, 1), dtype=np.int64), zoom.orig_hw)
    points, labels = prompts.points[0], prompts.labels[0]
    rois = [zoom._roi(None, points, labels)] + zoom._tap_rois(points)
    answers = [zoom._answer_on(zoom._require_image(), roi, None, points, labels, multimask, False) for roi in rois]
    return [{"mask": a[0][k], "predicted_iou": float(np.ravel(a[1])[k]), "cut_off": bool(np.ravel(a[3])[k]),
             "crop": [roi.width, roi.height]}
            for a, roi in zip(answers, rois, strict=True) for k in range(len(a[0]))]


def probe_image(zoom: ZoomPredictor, item: dict, point: np.ndarray, multimask: bool) -> dict:
    truth = item["mask"] > 0
    candidates = tap_candidates(zoom, item["image"], point, multimask)
    masks = [c["mask"] for c in candidates]
    union = [[(m | o).sum() for o in masks] for m in masks]
    iou = [[float((m & o).sum() / u) if u else 1.0 for o, u in zip(masks, row, strict=True)]
           for m, row in zip(masks, union, strict=True)]
    return {"dice": [dice(m, truth) for m in masks], "iou": iou, "area": [int(m.sum()) for m in masks],
            "crop_sides": list(zoom.tap_scales), "image_hw": list(truth.shape),
            **{k: [c[k] for c in candidates] for k in ("predicted_iou", "cut_off", "crop")}}


def choose(row: dict, score_weight: float | None, penalty: float = BORDER_PENALTY,
           among: list[int] | None = None) -> int:
    """Agreement (+ score_weight x predicted IoU) less the border penalty, over the candidates `among`
    (default all; agreement with those only); score_weight None: predicted IoU alone."""
    among = list(range(len(row["dice"]))) if among is None else among
    predicted = np.asarray(row["predicted_iou"])[among]
    cut = penalty * np.asarray(row["cut_off"], dtype=float)[among]
    if score_weight is None:
        return among[int(np.argmax(predicted - cut))]
    iou = np.asarray(row["iou"])[np.ix_(among, among)]
    agreement = (iou.sum(axis=1) - 1.0) / max(len(among) - 1, 1)
    return among[int(np.argmax(agreement + score_weight * predicted - cut))]


def _per_crop(row: dict) -> int:
    """Candidates per crop: 3 with --multimask, else 1."""
    return len(row["dice"]) // (1 + len(row["crop_sides"]))


def smallest_whole(row: dict) -> int:
    """The answer of the smallest square that is not empty and does not touch its border (the whole
    object fits: the finest view of it; of several multimask answers, the best predicted IoU); the
    last candidate when every answer is cut off."""
    per_crop = _per_crop(row)
    for start in range(per_crop, len(row["dice"]), per_crop):
        whole = [i for i in range(start, start + per_crop) if not row["cut_off"][i] and row["area"][i] > 0]
        if whole:
            return max(whole, key=lambda i: row["predicted_iou"][i])
    return len(row["dice"]) - 1


def best_token_per_crop(row: dict) -> int:
    """SAM's answer to a lone point on each crop (the multimask answer of highest predicted IoU), then
    the shipped rule across crops among those answers."""
    per_crop = _per_crop(row)
    picks = [max(range(start, start + per_crop), key=lambda i: row["predicted_iou"][i])
             for start in range(0, len(row["dice"]), per_crop)]
    return choose(row, TAP_SCORE_WEIGHT, among=picks)


def summarise(rows: list[dict]) -> dict:
    dices = np.asarray([r["dice"] for r in rows])
    rules = {"predicted IoU": (None, BORDER_PENALTY),
             **{f"agreement + {w} x predicted IoU": (w, BORDER_PENALTY) for w in SCORE_WEIGHTS},
             **{f"agreement + {TAP_SCORE_WEIGHT} x predicted IoU, border penalty {p}": (TAP_SCORE_WEIGHT, p)
                for p in PENALTIES}}
    return {"n": len(rows),
            "per_candidate": (100 * dices.mean(axis=0)).round(2).tolist(),
            "oracle": round(float(100 * dices.max(axis=1).mean()), 2),
            "rules": {**{name: round(float(100 * np.mean([r["dice"][choose(r, *rule)] for r in rows])), 2)
                         for name, rule in rules.items()},
                      "smallest square holding its whole answer":
                          round(float(100 * np.mean([r["dice"][smallest_whole(r)] for r in rows])), 2),
                      "best predicted IoU per crop, then agreement + 0.5 x predicted IoU":
                          round(float(100 * np.mean([r["dice"][best_token_per_crop(r)] for r in rows])), 2)},
            "candidates_cut_off": round(float(np.mean([r["cut_off"] for r in rows])), 4)}


def main() -> None:
    args = parse_args()
    zoom = zoomed_predictor(args)
    if args.no_stability_swap:
        zoom.model.sam_mask_decoder.dynamic_multimask_via_stability = False
    result = {"model": args.model, "split": args.split, "stability_swap": not args.no_stability_swap,
              "tap_scales": list(zoom.tap_scales),
              "candidates": [f"{crop}{f' token {k}' if args.multimask else ''}"
                             for crop in ["first pass box"] + [f"square {s}" for s in zoom.tap_scales]
                             for k in range(3 if args.multimask else 1)],
              "multimask": args.multimask, "datasets": {}}
    every_row = run_tap_probe(args, result, lambda item, tap, _: probe_image(zoom, item, tap, args.multimask),
                              summarise, f"probe-taps-{args.split}")
    if args.rows_out:
        atomic_write_text(args.rows_out, json.dumps({"model": args.model, "split": args.split, "rows": every_row}))
        print(f"wrote {args.rows_out}")


if __name__ == "__main__":
    main()
