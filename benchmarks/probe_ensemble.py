"""Does averaging the logits of several zoomed models beat each of them? (an ensemble of runs)

    python benchmarks/probe_ensemble.py --models default runs/tg3k3-candidate.safetensors --split val
    python benchmarks/probe_ensemble.py --models runs/loo/A/ddti/best.pt runs/loo/B/ddti/best.pt \
        --datasets ddti --split all --name ddti-held-out

Every box is answered on one crop (the first model's zoom margin) by every model; the logits are
averaged before the threshold, the predicted IoUs too. Each model alone and the ensemble, box J = 0 and
J = 20 (seed 0), against the inscribed ellipse under the same boxes. Runs of one recipe differ by about
1 Dice on a set (BENCHMARKS.md, "Seed variance of the recipe"); averaging them is nnU-Net's answer to
that noise. K models cost K encoder runs per box, which the 30 ms budget does not allow on PyTorch:
a win here is an argument for distilling the ensemble into one model, not for shipping it.
Writes `benchmarks/results/probe-ensemble-<name>.json`.
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
from uniultra.evaluation.evaluate import ModelMethod, load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.inference.zoom import ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent


class AveragedPredictor:
    """SAM2's `set_image` / `predict` over several predictors of one input size: mean logits and scores."""

    def __init__(self, predictors: list) -> None:
        self.predictors = predictors

    def __getattr__(self, name: str):
        if name == "predictors":
            raise AttributeError(name)
        return getattr(self.predictors[0], name)

    @property
    def supports_exact_box(self) -> bool:
        return all(p.supports_exact_box for p in self.predictors)

    def set_image(self, image) -> None:
        for predictor in self.predictors:
            predictor.set_image(image)

    def predict(self, return_logits: bool = False, **kwargs):
        answers = [p.predict(return_logits=True, **kwargs) for p in self.predictors]
        logits = np.mean([np.asarray(a[0], dtype=np.float32) for a in answers], axis=0)
        scores = np.mean([np.asarray(a[1]) for a in answers], axis=0)
        low = np.mean([np.asarray(a[2], dtype=np.float32) for a in answers], axis=0)
        return (logits if return_logits else logits > self.mask_threshold), scores, low


def ensemble_method(specs: list[str]) -> ModelMethod:
    zoomed = [make_method(spec).predictor for spec in specs]
    if not all(isinstance(p, ZoomPredictor) for p in zoomed):
        raise SystemExit("every model must be a zoomed model (zoom in its inference metadata)")
    inner = AveragedPredictor([p.predictor for p in zoomed])
    return ModelMethod("ensemble", ZoomPredictor(inner, zoomed[0].margin), False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="zoomed models: default or checkpoint paths")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--split", default="val", help="val, test, or all (every image: a held-out set)")
    parser.add_argument("--name", default=None, help="result file suffix (default: the split)")
    parser.add_argument("--singles", action="store_true", help="also evaluate each model alone")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    split = None if args.split == "all" else args.split
    datasets = load_datasets([Path(args.data_root) / name for name in args.datasets], split, None)
    methods = [("ellipse", make_method("baseline:ellipse"))]
    if args.singles:
        methods += [(spec, make_method(spec)) for spec in args.models]
    methods.append(("ensemble", ensemble_method(args.models)))
    rows = {}
    for label, method in methods:
        for jitter in (0.0, 20.0):
            rows[f"{label} J={jitter:g}"] = box_row(method, datasets, jitter, f"{label} J={jitter:g}")
    name = args.name or args.split
    document = {"benchmark": f"probe-ensemble-{name}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "models": args.models, "split": args.split, "rows": rows,
                "command": "python benchmarks/probe_ensemble.py --models " + " ".join(args.models)
                           + f" --datasets {' '.join(args.datasets)} --split {args.split}"
                           + (" --singles" if args.singles else "") + (f" --name {args.name}" if args.name else "")}
    out = ROOT / "benchmarks" / "results" / f"probe-ensemble-{name}.json"
    atomic_write_text(out, json.dumps(document, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
