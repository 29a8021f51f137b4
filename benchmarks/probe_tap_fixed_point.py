"""Does a tap's answer survive being asked again as a box? A class-agnostic check of its extent.

    python benchmarks/probe_tap_fixed_point.py --model default --split val
    python benchmarks/probe_tap_fixed_point.py --model runs/loo/universal-zoom/ddti/best.pt \
        --datasets ddti --split all --name probe-tap-fixed-point-held-out-ddti

A zoomed model answers a tap on several crops and keeps one answer (uniultra.inference.zoom). On
anatomy it was not trained on, the choice among those crops loses 14-25 Dice against the best crop
(BENCHMARKS.md, "Leave one dataset out"), and the automatic head's locator cannot help there: it
knows the trained anatomy only. The model answers boxes far better than taps, so each candidate
is asked again as a box: the box of its part under the tap, loosened by TAP_LOCATOR_PADDING, with
the tap. An answer whose extent is right should come back nearly unchanged (a fixed point); one
that holds a fragment of the object, or spills into its neighbour, should change. Per candidate this
writes the Dice of the tap answer and of its box answer and their IoU ("consistency"); the rules
scored on them:
- shipped: the predictor's own choice (agreement + TAP_SCORE_WEIGHT x predicted IoU - border penalty);
- shipped, refined: the shipped candidate's box answer when it agrees with it (IoU above
  TAP_LOCATOR_AGREEMENT, as the head's locator), else the shipped answer;
- the shipped score + w x consistency, answered by the tap answer or by its box answer (when they agree);
- the oracle over the tap answers and over the box answers.
Images: those with exactly one object (probe_taps.single_object_taps). Writes
`benchmarks/results/probe-tap-fixed-point-<split>.json` (or `--name`).
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_taps import add_tap_probe_arguments, dice, probe_each_tap, tap_candidates

from uniultra.data.prompts import pad_boxes
from uniultra.inference.roi import mask_box
from uniultra.inference.zoom import (
    BORDER_PENALTY,
    TAP_LOCATOR_AGREEMENT,
    TAP_LOCATOR_PADDING,
    TAP_SCORE_WEIGHT,
    ZoomPredictor,
    parts_under,
)

CONSISTENCY_WEIGHTS = (0.25, 0.5, 1.0, 2.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tap_probe_arguments(parser)
    parser.add_argument("--name", default=None, help="result file name (default probe-tap-fixed-point-<split>)")
    return parser.parse_args()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def box_answer(zoom: ZoomPredictor, mask: np.ndarray, point: np.ndarray) -> tuple | None:
    """The candidate `mask` asked again as the box of its part under the tap (loosened), with the tap:
    (mask, predicted IoU, whether it touches its crop's border)."""
    part = parts_under(mask, point[None])
    if part is None:
        return None
    box = pad_boxes(mask_box(part), zoom.orig_hw, TAP_LOCATOR_PADDING)
    points, labels = point[None].astype(np.float64), np.ones(1, dtype=np.int64)
    answer = zoom._answer_on(zoom._require_image(), zoom._roi(box, points, labels), box, points, labels, False,
                             False, exact_box=False)
    return answer[0][0], float(np.ravel(answer[1])[0]), bool(np.ravel(answer[3])[0])


def probe_image(zoom: ZoomPredictor, item: dict, point: np.ndarray) -> dict:
    truth = item["mask"] > 0
    candidates = tap_candidates(zoom, item["image"], point, False)
    masks = [c["mask"] for c in candidates]
    boxed = [box_answer(zoom, m, point) for m in masks]
    boxed = [None if b is None else b[0] for b in boxed]
    return {"dice": [dice(m, truth) for m in masks],
            "box_dice": [dice(m if b is None else b, truth) for m, b in zip(masks, boxed, strict=True)],
            "consistency": [iou(m, b) if b is not None else 0.0 for m, b in zip(masks, boxed, strict=True)],
            "iou": [[iou(m, o) for o in masks] for m in masks],
            "predicted_iou": [c["predicted_iou"] for c in candidates],
            "cut_off": [c["cut_off"] for c in candidates]}


def shipped_scores(row: dict) -> np.ndarray:
    """The zoomed predictor's own score of each candidate (zoom._most_agreed)."""
    iou_matrix = np.asarray(row["iou"])
    agreement = (iou_matrix.sum(axis=1) - 1.0) / max(len(iou_matrix) - 1, 1)
    return agreement + TAP_SCORE_WEIGHT * np.asarray(row["predicted_iou"]) - \
        BORDER_PENALTY * np.asarray(row["cut_off"], dtype=float)


def answered(row: dict, pick: int, boxed: bool) -> float:
    """Dice of candidate `pick`, by its box answer when `boxed` and that answer agrees with it."""
    if boxed and row["consistency"][pick] > TAP_LOCATOR_AGREEMENT:
        return row["box_dice"][pick]
    return row["dice"][pick]


def summarise(rows: list[dict]) -> dict:
    def mean(values) -> float:
        return round(float(100 * np.mean(list(values))), 2)

    shipped = [int(np.argmax(shipped_scores(r))) for r in rows]
    pairs = list(zip(rows, shipped, strict=True))
    rules = {"shipped": mean(r["dice"][k] for r, k in pairs),
             "shipped, refined by its box answer": mean(answered(r, k, True) for r, k in pairs)}
    for w in CONSISTENCY_WEIGHTS:
        picks = [int(np.argmax(shipped_scores(r) + w * np.asarray(r["consistency"]))) for r in rows]
        rules[f"shipped + {w} x consistency"] = mean(r["dice"][k] for r, k in zip(rows, picks, strict=True))
        rules[f"shipped + {w} x consistency, refined"] = mean(answered(r, k, True)
                                                              for r, k in zip(rows, picks, strict=True))
    picks = [int(np.argmax(r["consistency"])) for r in rows]
    rules["consistency alone, refined"] = mean(answered(r, k, True) for r, k in zip(rows, picks, strict=True))
    return {"n": len(rows), "rules": rules,
            "oracle, tap answers": mean(max(r["dice"]) for r in rows),
            "oracle, box answers": mean(max(r["box_dice"]) for r in rows),
            "shipped pick refined (agreeing)": round(float(np.mean([r["consistency"][k] > TAP_LOCATOR_AGREEMENT
                                                                    for r, k in zip(rows, shipped, strict=True)])), 3)}


def main() -> None:
    args = parse_args()
    probe_each_tap(args, probe_image, summarise, f"probe-tap-fixed-point-{args.split}")


if __name__ == "__main__":
    main()
