"""Can a box's prior (its extent, its inscribed ellipse) correct the model's mask at inference?

    python benchmarks/probe_box_fit.py --model default --split val
    python benchmarks/probe_box_fit.py --model default --split val --tight --rules blend:1 blend:2 blend:4
    python benchmarks/probe_box_fit.py --model runs/loo/universal-zoom-complex/ddti/best.pt --datasets ddti \
        --split all --name ddti-held-out-complex

A box says how far its object reaches: a mask whose bounding box is much smaller than the prompt (held
out, ddti's cystic nodules outlined by their dark fluid only) contradicts it. Each box is answered on its
crop as `ZoomPredictor` does, and one rule (`--rules`, each a row) changes the answer:
- `extent`, `main-extent`, `ellipse-iou`, `score`: among the single-mask output AND the three multimask
  outputs, keep the candidate maximising a fit to the box (IoU of the mask's bounding box, of its main
  parts' box, or of the mask with the inscribed ellipse; `score`: none) + TIE x its predicted IoU;
- `blend:W`: the single mask's logits plus W x (1 - the normalised radius of the inscribed ellipse);
- `clip`: the single mask with everything outside the box as drawn removed (with `--tight`: the box is
  exact, so nothing of the object lies outside it, whatever the padding the model was shown);
- `threshold`: the single mask's logits cut at each of THRESHOLDS, keeping the cut whose mask extent fits
  the box best (ties to the cut nearest 0): a box known to be exact says how far the mask must reach.
With `--tight` the exact boxes (J = 0) are answered as `--tight-boxes` does and the rules read the box as
drawn. Box J = 0 and J = 20 (seed 0), against the plain answer and the inscribed ellipse. Writes
`benchmarks/results/probe-box-fit-<name>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from box_rows import box_row
from scipy import ndimage
from shared_sets import DATASETS

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.inference.prompts import LOGIT_CLAMP, PromptSet
from uniultra.inference.roi import crop, mask_box, mask_edges, paste
from uniultra.inference.zoom import MAIN_PART_SHARE, ZoomPredictor, answer_tight_boxes

ROOT = Path(__file__).resolve().parent.parent
TIE = 0.1  # weight of the predicted IoU (--tie)
THRESHOLDS = (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0)  # logit cuts of the `threshold` rule


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def fit(mask: np.ndarray, box: np.ndarray, rule: str) -> float:
    """How well a candidate mask agrees with its box prompt (crop pixels)."""
    if rule == "score":
        return 0.0
    if rule == "ellipse-iou":
        return _iou(mask, inscribed_ellipse(box, mask.shape))
    if rule == "main-extent":
        mask_extent = np.asarray(mask_edges(mask_parts(mask))) if mask.any() else None
    else:
        extent = mask_box(mask)
        mask_extent = None if extent is None else extent + np.array([0, 0, 1, 1])
    return 0.0 if mask_extent is None else box_iou(mask_extent, box)


def mask_parts(mask: np.ndarray) -> np.ndarray:
    components, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(components.ravel())[1:]
    return np.isin(components, np.flatnonzero(areas >= MAIN_PART_SHARE * areas.max()) + 1)


def inscribed_ellipse(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]] + 0.5
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = max((box[2] - box[0]) / 2, 0.5), max((box[3] - box[1]) / 2, 0.5)
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def ellipse_field(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """1 - the normalised radius of the ellipse inscribed in an inclusive box, clipped to [-1, 1]."""
    rows, cols = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    rx, ry = (box[2] - box[0] + 1) / 2, (box[3] - box[1] + 1) / 2
    return np.clip(1 - np.sqrt(((cols - cx) / rx) ** 2 + ((rows - cy) / ry) ** 2), -1, 1).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


class BoxFitZoomPredictor(ZoomPredictor):
    """Box prompts: the candidate (single or multimask) whose mask extent fits the box best."""

    rule = "extent"
    tie = TIE
    _user_boxes = None
    _fit_box = None

    def predict(self, box=None, points=None, labels=None, **kwargs):
        # With --tight-boxes the prompt is padded before it is answered; the fit is to the box as drawn.
        self._user_boxes = PromptSet.from_user(box, points, labels, self.orig_hw).boxes
        return super().predict(box, points, labels, **kwargs)

    def _predict_object(self, image, prompts, i, multimask, return_logits):
        self._fit_box = None if self._user_boxes is None else self._user_boxes[i]
        return super()._predict_object(image, prompts, i, multimask, return_logits)

    def _answer_on(self, image, roi, box, points, labels, multimask, return_logits):
        if box is None or points is not None or multimask:
            return super()._answer_on(image, roi, box, points, labels, multimask, return_logits)
        self.predictor.set_image(crop(image, roi))
        self._whole_image_set = False
        local = box - np.tile(roi.offset, 2)
        single = self.predictor.predict(box=local, return_logits=True)
        target = local if self._fit_box is None else self._fit_box - np.tile(roi.offset, 2)
        if self.rule == "clip":
            logits = np.asarray(single[0], np.float32).copy()
            inside = np.zeros(logits.shape[-2:], dtype=bool)
            x0, y0 = np.floor(target[:2]).astype(int).clip(0)
            x1, y1 = np.ceil(target[2:]).astype(int) + 1
            inside[y0:y1, x0:x1] = True
            logits[..., ~inside] = -LOGIT_CLAMP
            full = paste(logits, roi, self.orig_hw, -LOGIT_CLAMP)
            return (full if return_logits else full > self.predictor.mask_threshold), single[1], single[2], False
        if self.rule == "threshold":
            logits = np.asarray(single[0], np.float32)
            fits = [fit(logits[0] > cut, target, "extent") - 1e-3 * abs(cut) for cut in THRESHOLDS]
            shifted = logits - THRESHOLDS[int(np.argmax(fits))] + self.predictor.mask_threshold
            full = paste(shifted, roi, self.orig_hw, -LOGIT_CLAMP)
            return (full if return_logits else full > self.predictor.mask_threshold), single[1], single[2], False
        if self.rule.startswith("blend"):
            # The inscribed ellipse of the box as drawn, as a logit field (1 at its centre, 0 on it).
            weight = float(self.rule.split(":")[1])
            logits = np.asarray(single[0], np.float32) + weight * ellipse_field(target, single[0].shape[-2:])
            full = paste(logits, roi, self.orig_hw, -LOGIT_CLAMP)
            return (full if return_logits else full > self.predictor.mask_threshold), single[1], single[2], False
        multi = self.predictor.predict(box=local, multimask=True, return_logits=True)
        logits = np.concatenate([np.asarray(single[0], np.float32), np.asarray(multi[0], np.float32)])
        scores = np.concatenate([np.ravel(single[1]), np.ravel(multi[1])])
        fits = [fit(candidate > self.predictor.mask_threshold, target, self.rule) + self.tie * float(scores[k])
                for k, candidate in enumerate(logits)]
        best = int(np.argmax(fits))
        full = paste(logits[best:best + 1], roi, self.orig_hw, -LOGIT_CLAMP)
        answer = full if return_logits else full > self.predictor.mask_threshold
        return answer, scores[best:best + 1], single[2], False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a zoomed model: default or a checkpoint path")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--split", default="val", help="val, test, or all (every image: a held-out set)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--tight", action="store_true",
                        help="exact boxes answered as --tight-boxes does (J = 0 only), the fit to the box as drawn")
    parser.add_argument("--tie", type=float, default=TIE, help="weight of the predicted IoU in the choice")
    parser.add_argument("--rules", nargs="+", default=["extent", "main-extent", "ellipse-iou", "score"])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    datasets = load_datasets([Path(args.data_root) / n for n in args.datasets],
                             None if args.split == "all" else args.split, None)
    rows = {}
    for variant in ("ellipse", "plain", *args.rules):
        method = make_method("baseline:ellipse" if variant == "ellipse" else args.model)
        if variant in args.rules:
            method.predictor.__class__ = BoxFitZoomPredictor
            method.predictor.rule, method.predictor.tie = variant, args.tie
        if args.tight and variant != "ellipse":
            answer_tight_boxes(method.predictor)
        for jitter in ((0.0,) if args.tight else (0.0, 20.0)):
            key = f"{variant} J={jitter:g}" + (", tight boxes" if args.tight and variant != "ellipse" else "")
            rows[key] = box_row(method, datasets, jitter, key)
    name = args.name or args.split
    document = {"benchmark": f"probe-box-fit-{name}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "model": args.model, "split": args.split, "tie": args.tie, "rows": rows,
                "command": "python benchmarks/probe_box_fit.py " + " ".join(sys.argv[1:])}
    out = ROOT / "benchmarks" / "results" / f"probe-box-fit-{name}.json"
    atomic_write_text(out, json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
