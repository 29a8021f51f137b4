"""Can unsupervised regions locate a tap on anatomy the model was never trained on?

    python benchmarks/probe_tap_regions.py --model default --split val
    python benchmarks/probe_tap_regions.py --model runs/loo/universal-zoom/ddti/best.pt \
        --datasets ddti --split all --name probe-tap-regions-held-out-ddti

The automatic head locates a tap only on the anatomy it was trained on (BENCHMARKS.md, "A tap located
by the automatic head"); held out, the choice among the crops loses 14-25 Dice against its best crop.
The region maps the foundation stage trains on (uniultra.data.regions: superpixels merged by boundary
contrast, nine levels from tissue patches to organs) need no labels and no training, so they can be
computed for any image at inference. Here every distinct region holding the tap (one per level at
most) is answered as a box with the tap, loosened by TAP_LOCATOR_PADDING, as the head's part is; its
agreement is the IoU of that answer with the region. Rules scored against the crops-only answer:
- the best-agreeing region's answer when its agreement is above a threshold, else the crops';
- the largest region whose answer agrees, else the crops';
- the region answers pooled with the crops' answers under the crops' own score;
- the same pool with near-identical answers (IoU above DUPLICATE_IOU) counted once in the agreement,
  among the region answers only or among all (nested regions of several levels often give one answer
  several times, and its copies then outvote the crops);
- oracles over the region answers and over everything.
Writes `benchmarks/results/probe-tap-regions-<split>.json` (or `--name`), with the region maps' time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from probe_tap_fixed_point import box_answer, iou, shipped_scores
from probe_taps import add_tap_probe_arguments, dice, probe_each_tap, tap_candidates

from uniultra.atomic import atomic_write_text
from uniultra.data.regions import region_label_maps
from uniultra.inference.zoom import BORDER_PENALTY, TAP_SCORE_WEIGHT, ZoomPredictor, _voters

THRESHOLDS = (0.5, 0.6, 0.7, 0.8)
DUPLICATE_IOU = (0.85, 0.9, 0.95)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tap_probe_arguments(parser)
    parser.add_argument("--name", default=None, help="result file name (default probe-tap-regions-<split>)")
    parser.add_argument("--select", nargs="+", type=Path, default=None, metavar="RESULT",
                        help="no probing: choose a rule from these held-out result files, one fold left out at "
                        "a time (the rule with the best mean over the other folds' sets, scored on the fold "
                        "left out), and print the table")
    parser.add_argument("--rows-out", type=Path, default=None,
                        help="also write every tap's row (Dice, IoU matrix, scores; no masks) as JSON")
    return parser.parse_args()


def regions_under(image: np.ndarray, point: np.ndarray) -> list[np.ndarray]:
    """The distinct regions holding `point`, fine to coarse, as masks at the image's size."""
    maps = region_label_maps(image)
    h, w = image.shape[:2]
    y = min(int(point[1] * maps.shape[1] / h), maps.shape[1] - 1)
    x = min(int(point[0] * maps.shape[2] / w), maps.shape[2] - 1)
    found, seen = [], []
    for level in maps:
        label = level[y, x]
        if label == 0:
            continue
        small = level == label
        if any(np.array_equal(small, s) for s in seen):
            continue
        seen.append(small)
        found.append(np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST)))
    return found


def probe_image(zoom: ZoomPredictor, item: dict, point: np.ndarray) -> dict:
    truth = item["mask"] > 0
    candidates = tap_candidates(zoom, item["image"], point, False)
    start = time.perf_counter()
    regions = regions_under(item["image"], point)
    seconds = time.perf_counter() - start
    boxed = [box_answer(zoom, r, point) or (np.zeros_like(truth), 0.0, False) for r in regions]
    answers = [b[0] for b in boxed]
    masks = [c["mask"] for c in candidates] + answers
    return {"dice": [dice(c["mask"], truth) for c in candidates],
            "region_dice": [dice(a, truth) for a in answers],
            "agreement": [iou(a, r) for a, r in zip(answers, regions, strict=True)],
            "region_area": [int(r.sum()) for r in regions],
            "iou": [[iou(m, o) for o in masks] for m in masks],
            "predicted_iou": [c["predicted_iou"] for c in candidates],
            "cut_off": [c["cut_off"] for c in candidates],
            "region_predicted_iou": [b[1] for b in boxed], "region_cut_off": [b[2] for b in boxed],
            "region_seconds": seconds}


def crops_only(row: dict) -> dict:
    """The row restricted to the crops' candidates, as shipped_scores reads it."""
    n = len(row["dice"])
    return {**row, "iou": [r[:n] for r in row["iou"][:n]]}


def located(row: dict, threshold: float, largest: bool) -> float:
    shipped = row["dice"][int(np.argmax(shipped_scores(crops_only(row))))]
    agreeing = [k for k, a in enumerate(row["agreement"]) if a > threshold]
    if not agreeing:
        return shipped
    key = (lambda k: row["region_area"][k]) if largest else (lambda k: row["agreement"][k])
    return row["region_dice"][max(agreeing, key=key)]


def pooled(row: dict) -> float:
    """The regions' answers among the crops' under the crops' score (agreement, predicted IoU, border)."""
    n = len(row["dice"])
    scores = shipped_scores({"iou": row["iou"], "predicted_iou": row["predicted_iou"] + row["region_predicted_iou"],
                             "cut_off": row["cut_off"] + row["region_cut_off"]})
    k = int(np.argmax(scores))
    return row["dice"][k] if k < n else row["region_dice"][k - n]


def pooled_once(row: dict, duplicate_iou: float, regions_only: bool) -> float:
    """`pooled`, with each candidate's agreement the mean over the OTHER groups of near-identical answers
    (IoU above `duplicate_iou`, grouped greedily in order) of its mean IoU with a group's members."""
    n = len(row["dice"])
    iou = np.asarray(row["iou"])
    groups = _voters(iou, n if regions_only else 0, duplicate_iou)  # the predictor's own grouping
    agreement = np.array([np.mean([iou[k, g].mean() for g in groups if k not in g] or [0.0])
                          for k in range(len(iou))])
    predicted = np.asarray(row["predicted_iou"] + row["region_predicted_iou"])
    cut_off = np.asarray(row["cut_off"] + row["region_cut_off"], dtype=float)
    k = int(np.argmax(agreement + TAP_SCORE_WEIGHT * predicted - BORDER_PENALTY * cut_off))
    return row["dice"][k] if k < n else row["region_dice"][k - n]


def summarise(rows: list[dict]) -> dict:
    def mean(values) -> float:
        return round(float(100 * np.mean(list(values))), 2)

    rules = {"crops only (shipped)": mean(r["dice"][int(np.argmax(shipped_scores(crops_only(r))))] for r in rows),
             "pooled with the crops": mean(pooled(r) for r in rows)}
    for d in DUPLICATE_IOU:
        rules[f"pooled, region copies once above {d}"] = mean(pooled_once(r, d, True) for r in rows)
        rules[f"pooled, all copies once above {d}"] = mean(pooled_once(r, d, False) for r in rows)
    for t in THRESHOLDS:
        rules[f"best-agreeing region above {t}"] = mean(located(r, t, False) for r in rows)
        rules[f"largest agreeing region above {t}"] = mean(located(r, t, True) for r in rows)
    return {"n": len(rows), "rules": rules,
            "oracle, crops": mean(max(r["dice"]) for r in rows),
            "oracle, regions": mean(max(r["region_dice"], default=0.0) for r in rows),
            "oracle, both": mean(max(r["dice"] + r["region_dice"]) for r in rows),
            "regions per tap": round(float(np.mean([len(r["region_dice"]) for r in rows])), 2),
            "region maps, s per image": round(float(np.mean([r["region_seconds"] for r in rows])), 3)}


def select_rule(paths: list[Path]) -> dict:
    """Nested choice of a rule over held-out folds: for each fold, the rule with the best mean Dice over
    the other folds' sets, scored on that fold's sets. An honest estimate of what choosing on held-out
    folds gives a fold it has not seen."""
    folds = {path.stem: json.loads(path.read_text())["datasets"] for path in paths}
    rules = list(next(iter(next(iter(folds.values())).values()))["rules"])
    out = {}
    for fold, sets in folds.items():
        others = [s["rules"] for f, d in folds.items() if f != fold for s in d.values()]
        chosen = max(rules, key=lambda r: np.mean([o[r] for o in others]))
        out[fold] = {"chosen": chosen, **{name: {"chosen": s["rules"][chosen],
                                                 "shipped": s["rules"]["crops only (shipped)"]}
                                          for name, s in sets.items()}}
    return out


def main() -> None:
    args = parse_args()
    if args.select:
        print(json.dumps(select_rule(args.select), indent=1))
        return
    rows = probe_each_tap(args, probe_image, summarise, f"probe-tap-regions-{args.split}")
    if args.rows_out:
        atomic_write_text(args.rows_out, json.dumps(rows) + "\n")


if __name__ == "__main__":
    main()
