"""Variants of the located tap (anatomy named) that need no training: do any beat the shipped rule?

    python benchmarks/probe_tap_variants.py --split val

The shipped rule (`ZoomPredictor._located_tap`): the automatic head's part under the tap (its logits read with the
presence gate off since 2026-12-06 night: a tap says the object is there), its box loosened
by TAP_LOCATOR_PADDING, answered with the tap; kept when it agrees with the part (TAP_LOCATOR_AGREEMENT), the
answer being the mean of the box answer's and the head's logits; else the tap's crops answer. Per one-object
image (tap = the farthest interior point), the Dice of:
- `shipped`: that rule, end to end; `crops`: the crops alone (what the rule falls back on);
- `blend paddings`: the box answers of paddings 0, 10 and 20 px averaged before the blend;
- `blend mirrored`: the box answer averaged with its mirrored image's (flipped back) before the blend;
- `blend all`: both averages at once;
- `lower threshold`: where the tap lies in no part of the head's mask, the part of its logits above
  -1, -2 or -3 (the first that holds the tap) locates it, under the same rule;
- `regions where the locator gives up`: the answer with no anatomy named (the crops AND the unsupervised
  regions holding the tap) wherever the shipped rule falls back on the crops;
- `located answer votes`: a located answer that disagrees with the head's part joins the crops' vote
  (`ZoomPredictor.tap_locator_votes`) instead of being dropped.
Writes `benchmarks/results/probe-tap-variants-<split>.json` (or `--name`).
"""

from __future__ import annotations

import argparse

import numpy as np
from probe_taps import add_tap_probe_arguments, dice, run_tap_probe, zoomed_predictor

from uniultra.data.prompts import pad_boxes
from uniultra.inference.roi import mask_box
from uniultra.inference.zoom import TAP_LOCATOR_AGREEMENT, TAP_LOCATOR_PADDING, ZoomPredictor, parts_under

LOWER_THRESHOLDS = (-1.0, -2.0, -3.0)
PADDINGS = (0.0, TAP_LOCATOR_PADDING, 20.0)
BLENDS = ("blend paddings", "blend mirrored", "blend all")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_tap_probe_arguments(parser)
    parser.add_argument("--name", default=None)
    return parser.parse_args()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def box_logits(zoom: ZoomPredictor, image: np.ndarray, box: np.ndarray, point: np.ndarray,
               mirrored: bool = False) -> np.ndarray:
    """The zoomed box + tap answer's logits at image size (of the mirrored image, flipped back)."""
    if not mirrored:
        return np.asarray(zoom.predict(box=box, points=point[None], labels=np.ones(1, dtype=np.int64),
                                       return_logits=True)[0][0], np.float32)
    width = image.shape[1]
    zoom.set_image(np.ascontiguousarray(image[:, ::-1]))
    flipped_box = np.array([width - box[2], box[1], width - box[0], box[3]], np.float32)
    flipped_point = np.array([width - point[0], point[1]], np.float32)
    logits = np.asarray(zoom.predict(box=flipped_box, points=flipped_point[None], labels=np.ones(1, dtype=np.int64),
                                     return_logits=True)[0][0], np.float32)[:, ::-1]
    zoom.set_image(image)
    return logits


def kept_dice(logits: np.ndarray, point: np.ndarray, truth: np.ndarray) -> float:
    part = parts_under(logits > 0, point[None])
    return dice(part, truth) if part is not None else 0.0


def located_rows(zoom: ZoomPredictor, image: np.ndarray, head: np.ndarray, part: np.ndarray, point: np.ndarray,
                 truth: np.ndarray) -> dict:
    """The shipped blend and its averaged variants for the head's `part` under the tap, with the agreement."""
    answers = {pad: box_logits(zoom, image, pad_boxes(mask_box(part)[None], truth.shape, pad)[0] if pad
                               else mask_box(part), point) for pad in PADDINGS}
    box = pad_boxes(mask_box(part)[None], truth.shape, TAP_LOCATOR_PADDING)[0]
    mirrored = box_logits(zoom, image, box, point, mirrored=True)
    shipped = answers[TAP_LOCATOR_PADDING]
    averages = {"blend": shipped, "blend paddings": np.mean([answers[p] for p in PADDINGS], axis=0),
                "blend mirrored": (shipped + mirrored) / 2,
                "blend all": np.mean([*answers.values(), mirrored], axis=0)}
    return {"agreement": iou(shipped > 0, part),
            **{name: kept_dice((logits + head) / 2, point, truth) for name, logits in averages.items()}}


def probe_image(zoom: ZoomPredictor, item: dict, point: np.ndarray, channel: str) -> dict:
    truth, image = item["mask"] > 0, item["image"]
    tap = dict(points=point[None], labels=np.ones(1, dtype=np.int64))
    zoom.set_image(image)
    zoom.modality = None
    unnamed = np.asarray(zoom.predict(**tap)[0][0], bool)
    zoom.modality, zoom.tap_locator = channel, False
    crops = np.asarray(zoom.predict(**tap)[0][0], bool)
    zoom.tap_locator = True
    shipped = np.asarray(zoom.predict(**tap)[0][0], bool)
    zoom.tap_locator_votes = True
    votes = np.asarray(zoom.predict(**tap)[0][0], bool)
    zoom.tap_locator_votes = False
    head = np.asarray(zoom.predict_auto(channel, return_logits=True, presence_gate="off")[0], np.float32)
    row = {"shipped": dice(shipped, truth), "crops": dice(crops, truth), "unnamed": dice(unnamed, truth),
           "located answer votes": dice(votes, truth)}
    part = parts_under(head > zoom.mask_threshold, point[None])
    if part is not None:
        row["located"] = located_rows(zoom, image, head, part, point, truth)
        return row
    for threshold in LOWER_THRESHOLDS:
        part = parts_under(head > threshold, point[None])
        if part is not None:
            row["lower threshold"] = located_rows(zoom, image, head, part, point, truth)
            break
    return row


def variant(row: dict, name: str) -> float:
    """The Dice of one variant on one tap; the crops answer wherever its locator gives up."""
    if name == "regions where the locator gives up":
        kept = row.get("located", {}).get("agreement", 0.0) > TAP_LOCATOR_AGREEMENT
        return row["located"]["blend"] if kept else row["unnamed"]
    located = row.get("located") or (row.get("lower threshold") if name == "lower threshold" else None)
    if located is None or located["agreement"] <= TAP_LOCATOR_AGREEMENT:
        return row["crops"]
    return located["blend" if name == "lower threshold" else name]


def summarise(rows: list[dict]) -> dict:
    direct = ("shipped", "crops", "located answer votes")
    names = (*direct, *BLENDS, "lower threshold", "regions where the locator gives up")
    rule = {"dice_" + name.replace(" ", "_"): round(100 * float(np.mean([r[name] if name in direct else variant(r, name)
                                                                           for r in rows])), 2)
            for name in names}
    gave_up = sum(1 for r in rows if r.get("located", {}).get("agreement", 0.0) <= TAP_LOCATOR_AGREEMENT)
    return {"n": len(rows), "taps_left_to_the_crops": gave_up,
            "taps_in_no_part": sum(1 for r in rows if "located" not in r), **rule}


def main() -> None:
    args = parse_args()
    zoom = zoomed_predictor(args)
    if not zoom.modality_choices:
        raise SystemExit(f"{args.model}: not a zoomed model with an automatic head of several channels")
    result = {"model": args.model, "split": args.split, "datasets": {}}
    run_tap_probe(args, result, lambda item, tap, name: probe_image(zoom, item, tap, name), summarise,
                  f"probe-tap-variants-{args.split}")


if __name__ == "__main__":
    main()
