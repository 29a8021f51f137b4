"""The automatic head as a tap's locator: does knowing the anatomy turn a tap into a good box?

    python benchmarks/probe_tap_locator.py --split val

A lone tap says where, not how far: the zoomed predictor answers it on several crops and keeps the
answer they agree on. A model with an automatic head (the bundled default: one channel per training
set) already segments its known anatomies with no prompt at all. Here, per tap: the head's mask for
the image's own set (its channel), the connected part of it holding the tap, and the box of that part
answered like a user's box together with the tap (`ZoomPredictor.predict(box=..., points=...)`,
loosened by --paddings px at 1024 scale). When the tap is in no part, the shipped tap answer stays.
Rows: the shipped answer, the head's part itself, the locator always (+ each padding), and the locator
kept only when its answer agrees with the part (IoU above each of AGREEMENTS; what
`ZoomPredictor` ships with TAP_LOCATOR_AGREEMENT and TAP_LOCATOR_PADDING), Dice over the split's
one-object images (tap = the farthest interior point, as `uniultra evaluate --prompt point`).
Writes `benchmarks/results/probe-tap-locator-<split>.json` (or `--name`). A set the head has no channel for
(a leave-one-out fold's model on its held-out set) gets the shipped answer and, with --every-channel, the
every-channel rows only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from probe_taps import add_tap_probe_arguments, dice, run_tap_probe, zoomed_predictor

from uniultra.data.prompts import pad_boxes
from uniultra.inference.roi import mask_box
from uniultra.inference.zoom import TAP_LOCATOR_AGREEMENT, ZoomPredictor, parts_under

ROOT = Path(__file__).resolve().parent.parent
AGREEMENTS = (0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tap_probe_arguments(parser)
    parser.add_argument("--paddings", nargs="+", type=float, default=[0.0, 10.0, 20.0])
    parser.add_argument("--name", default=None)
    parser.add_argument("--every-channel", action="store_true",
                        help="also: the anatomy NOT named; every channel locates, and the answer that agrees best "
                        "with its channel's part is kept (above TAP_LOCATOR_AGREEMENT; first padding)")
    return parser.parse_args()


def tapped_part(mask: np.ndarray, point: np.ndarray) -> np.ndarray | None:
    """The connected part of `mask` that holds the tap, or None (the shipped locator's rule)."""
    return parts_under(mask, point[None])


def probe_image(zoom: ZoomPredictor, item: dict, point: np.ndarray, channel: str, paddings: list[float],
                every: bool) -> dict:
    truth = item["mask"] > 0
    zoom.set_image(item["image"])
    tap = dict(points=point[None], labels=np.ones(1, dtype=np.int64))
    shipped = np.asarray(zoom.predict(**tap)[0][0], dtype=bool)
    if channel not in zoom.modality_choices:  # a held-out set (--split all on a fold's model): no channel of its own
        row = {"shipped": dice(shipped, truth), "tap_in_head_mask": False, "head_part": 0.0,
               **{f"{kind} pad {pad:g}": dice(shipped, truth) for pad in paddings for kind in ("locator", "blend")}}
        return {**row, **(every_channel(zoom, truth, point, paddings[0], row["shipped"]) if every else {})}
    head_logits, presence, _ = zoom.predict_auto(channel, return_logits=True)
    found = np.asarray(head_logits) > zoom.mask_threshold
    part = tapped_part(found, point)
    row = {"shipped": dice(shipped, truth), "tap_in_head_mask": part is not None, "presence": presence,
           "head_part": dice(part, truth) if part is not None else 0.0}
    for pad in paddings:
        if part is None:
            row[f"locator pad {pad:g}"] = row[f"blend pad {pad:g}"] = row["shipped"]
            continue
        box = pad_boxes(mask_box(part)[None], truth.shape, pad)[0] if pad else mask_box(part)
        logits, scores, _ = zoom.predict(box=box, **tap, return_logits=True)
        answer = np.asarray(logits[0]) > zoom.mask_threshold
        row[f"locator pad {pad:g}"] = dice(answer, truth)
        # The head and the box answer together: their mean logit, the part under the tap.
        blend = tapped_part((np.asarray(logits[0]) + np.asarray(head_logits)) / 2 > zoom.mask_threshold, point)
        row[f"blend pad {pad:g}"] = dice(blend, truth) if blend is not None else 0.0
        # What a rule could read without the truth: agreement of the three answers, the locator's score.
        row[f"features pad {pad:g}"] = {"iou_with_part": iou(answer, part), "iou_with_shipped": iou(answer, shipped),
                                        "predicted_iou": float(np.ravel(scores)[0]),
                                        "part_share": float(part.mean()), "shipped_share": float(shipped.mean())}
    if every:
        row.update(every_channel(zoom, truth, point, paddings[0], row["shipped"]))
    return row


def every_channel(zoom: ZoomPredictor, truth: np.ndarray, point: np.ndarray, pad: float, shipped: float) -> dict:
    """The tap located by each channel of the head; kept: the answer agreeing best with its part."""
    tap = dict(points=point[None], labels=np.ones(1, dtype=np.int64))
    best = (0.0, None, None)
    for channel in zoom.modality_choices:
        part = tapped_part(np.asarray(zoom.predict_auto(channel)[0], dtype=bool), point)
        if part is None:
            continue
        box = pad_boxes(mask_box(part)[None], truth.shape, pad)[0]
        answer = np.asarray(zoom.predict(box=box, **tap)[0][0], dtype=bool)
        best = max(best, (iou(answer, part), channel, answer), key=lambda b: b[0])
    agreement, channel, answer = best
    kept = agreement > TAP_LOCATOR_AGREEMENT
    return {"every channel": dice(answer, truth) if kept else shipped,
            "every channel picked": channel if kept else None}


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def gated(row: dict, pad: str, agreement: float, answer: str = "locator") -> float:
    """The Dice of the locator's answer (or `answer`: blend) when it agrees with the head's part, else the
    shipped answer's."""
    features = row.get(f"features pad {pad}")
    keep = features is not None and features["iou_with_part"] > agreement
    return row[f"{answer} pad {pad}"] if keep else row["shipped"]


def summarise(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("tap_in_head_mask", "presence", "every channel picked")
            and not k.startswith("features")]
    inside = [r for r in rows if r["tap_in_head_mask"]]
    pads = [k.removeprefix("locator pad ") for k in keys if k.startswith("locator pad ")]
    return {"n": len(rows), "tap_in_head_mask": round(len(inside) / len(rows), 4),
            "dice": {k: round(100 * float(np.mean([r[k] for r in rows])), 2) for k in keys},
            "dice_locator_if_it_agrees_with_the_part": {
                f"pad {pad}, IoU > {a}": round(100 * float(np.mean([gated(r, pad, a) for r in rows])), 2)
                for pad in pads for a in AGREEMENTS},
            "dice_blend_if_the_locator_agrees_with_the_part": {
                f"pad {pad}, IoU > {a}": round(100 * float(np.mean([gated(r, pad, a, "blend") for r in rows])), 2)
                for pad in pads for a in AGREEMENTS},
            "dice_where_tap_in_head_mask": {k: round(100 * float(np.mean([r[k] for r in inside])), 2)
                                            for k in keys} if inside else {}}


def main() -> None:
    args = parse_args()
    zoom = zoomed_predictor(args)
    if not zoom.modality_choices:
        raise SystemExit(f"{args.model}: not a zoomed model with an automatic head of several channels")
    result = {"model": args.model, "split": args.split, "channels": list(zoom.modality_choices), "datasets": {}}
    run_tap_probe(args, result,
                  lambda item, tap, name: probe_image(zoom, item, tap, name, args.paddings, args.every_channel),
                  summarise, f"probe-tap-locator-{args.split}", keep_rows=True)


if __name__ == "__main__":
    main()
