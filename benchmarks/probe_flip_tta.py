"""Does averaging a box's answer with its mirror image help a zoomed model? (test-time augmentation)

    python benchmarks/probe_flip_tta.py --model default --split val

Each box is answered on its crop as `ZoomPredictor` does, and on the horizontally mirrored crop with
the mirrored box; the two logit maps are averaged (mirrored back) before the threshold. Box J = 0 and
J = 20 on the six shared sets, against the plain zoomed predictor. It costs one more encoder run per
box, which the 30 ms budget allows on OpenVINO bf16 only. Writes
`benchmarks/results/probe-flip-tta-<split>.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from box_rows import box_row
from shared_sets import DATASETS

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.inference.prompts import LOGIT_CLAMP
from uniultra.inference.roi import crop, paste
from uniultra.inference.zoom import ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent


class MirroredZoomPredictor(ZoomPredictor):
    """Box prompts: the mean of the crop's logits and the mirrored crop's (mirrored back)."""

    def _answer_on(self, image, roi, box, points, labels, multimask, return_logits):
        if box is None or points is not None:
            return super()._answer_on(image, roi, box, points, labels, multimask, return_logits)
        patch, local = crop(image, roi), box - np.tile(roi.offset, 2)
        width = patch.shape[1]
        mirrored_box = np.array([width - 1 - local[2], local[1], width - 1 - local[0], local[3]])
        answers = [self._answer_crop(patch, local, multimask),
                   self._answer_crop(np.ascontiguousarray(patch[:, ::-1]), mirrored_box, multimask)]
        logits = (answers[0][0] + answers[1][0][..., ::-1]) / 2
        scores = (np.asarray(answers[0][1]) + np.asarray(answers[1][1])) / 2
        full = paste(logits, roi, self.orig_hw, -LOGIT_CLAMP)
        return (full if return_logits else full > self.predictor.mask_threshold), scores, answers[0][2], False

    def _answer_crop(self, patch: np.ndarray, box: np.ndarray, multimask: bool):
        self.predictor.set_image(patch)
        self._whole_image_set = False
        logits, scores, low = self.predictor.predict(box=box, multimask=multimask, return_logits=True)
        return np.asarray(logits, dtype=np.float32), scores, low


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="a zoomed model: default or a checkpoint path")
    parser.add_argument("--split", default="val")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    datasets = load_datasets([Path(args.data_root) / name for name in DATASETS], args.split, None)
    rows = {}
    for variant in ("plain", "mirrored"):
        method = make_method(args.model)
        if not isinstance(method.predictor, ZoomPredictor):
            raise SystemExit(f"{args.model} is not a zoomed model (no zoom in its inference metadata)")
        if variant == "mirrored":
            method.predictor.__class__ = MirroredZoomPredictor
        for jitter in (0.0, 20.0):
            label = f"{variant} J={jitter:g}"
            rows[label] = box_row(method, datasets, jitter, label)
    document = {"benchmark": f"probe-flip-tta-{args.split}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "model": args.model, "split": args.split,
                "command": f"python benchmarks/probe_flip_tta.py --model {args.model} --split {args.split}",
                "rows": rows}
    out = ROOT / "benchmarks" / "results" / f"probe-flip-tta-{args.split}.json"
    atomic_write_text(out, json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
