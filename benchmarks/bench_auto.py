"""Automatic mode (no prompt) of a model with an automatic head: Dice per dataset and presence AUC.

For every image of the chosen split of each dataset (empty-truth images included), the head's
answer is scored twice: as the head draws it on the whole image ("head"), and refined, i.e. the
box of its main parts answered on a crop like a user's box (`ZoomPredictor.refine_auto`, what
`predict --prompt none` runs for a zoomed model). Presence: ROC AUC of the head's presence
probability, images with an object vs images without (BUSI's normal scans), where both exist.

    python benchmarks/bench_auto.py --model default --split test --name auto-default
    python benchmarks/bench_auto.py --model runs/cpu/auto-default/best.pt --split val

Writes benchmarks/results/<name>.json (per image: presence, Dice of both answers; per dataset:
the summaries) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from shared_sets import DATASETS
from tqdm import tqdm

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.evaluation.metrics import image_metrics
from uniultra.evaluation.report import machine_info
from uniultra.inference.loading import load_predictor
from uniultra.inference.zoom import ZoomPredictor

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ANSWERS = ("head", "refined")


def roc_auc(positive: list[float], negative: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half; None without both classes."""
    if not positive or not negative:
        return None
    pos, neg = np.asarray(positive)[:, None], np.asarray(negative)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def run_dataset(predictor: ZoomPredictor, dataset: SegmentationDataset,
                answers: tuple[str, ...] = ANSWERS) -> list[dict]:
    predictor.modality = dataset.name
    rows = []
    for sample in tqdm(dataset.samples, desc=dataset.name, unit="img", leave=False):
        item = load_sample(sample)
        predictor.set_image(item["image"])
        row = {"stem": sample.stem, "truth_empty": not item["mask"].any()}
        for answer in answers:
            predictor.refine_auto = answer == "refined"
            mask, score, _ = predictor.predict_without_prompt()
            metrics = image_metrics(np.asarray(mask, dtype=bool), item["mask"])
            row[answer] = {"dice": metrics.dice, "hd95": metrics.hd95, "empty": not np.asarray(mask).any()}
            row["presence"] = float(score)
        rows.append(row)
    return rows


def summarise(rows: list[dict], answers: tuple[str, ...] = ANSWERS) -> dict:
    lesion = [r for r in rows if not r["truth_empty"]]
    normal = [r for r in rows if r["truth_empty"]]
    summary = {"n": len(rows), "n_lesion": len(lesion), "n_empty_truth": len(normal),
               "presence_auc": roc_auc([r["presence"] for r in lesion], [r["presence"] for r in normal])}
    for answer in answers:
        finite = [r[answer]["hd95"] for r in lesion if np.isfinite(r[answer]["hd95"])]
        summary[answer] = {
            "dice_all": float(np.mean([r[answer]["dice"] for r in rows])),
            "dice_lesion": float(np.mean([r[answer]["dice"] for r in lesion])) if lesion else None,
            "hd95_lesion_finite": float(np.mean(finite)) if finite else None,
            "empty_answers_on_normals": sum(r[answer]["empty"] for r in normal),
        }
    return summary


def table(document: dict) -> str:
    lines = ["| dataset (split) | images (lesion / empty) | head: Dice lesion / all | refined: Dice lesion / all "
             "| normals answered empty | presence AUC |", "|---|---|---|---|---|---|"]
    for name, s in document["datasets"].items():
        cells = [f"{_pct(s[a]['dice_lesion'])} / {_pct(s[a]['dice_all'])}" for a in ANSWERS]
        empty = f"{s['refined']['empty_answers_on_normals']} of {s['n_empty_truth']}" if s["n_empty_truth"] else "–"
        auc = "–" if s["presence_auc"] is None else f"{s['presence_auc']:.3f}"
        lines.append(f"| {name} ({document['split']}) | {s['n']} ({s['n_lesion']} / {s['n_empty_truth']}) | "
                     + " | ".join(cells) + f" | {empty} | {auc} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="test")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--name", default=None, help="results file stem (default auto-<split>)")
    args = parser.parse_args()
    predictor = load_predictor(args.model)
    if not isinstance(predictor, ZoomPredictor) or not callable(getattr(predictor, "predict_auto", None)):
        raise SystemExit(f"{args.model}: needs a zoomed model with an automatic head")
    start = time.perf_counter()
    per_image, summaries = {}, {}
    for name in args.datasets:
        dataset = SegmentationDataset(Path(args.data_root) / name, split=args.split)
        per_image[name] = run_dataset(predictor, dataset)
        summaries[name] = summarise(per_image[name])
    document = {"benchmark": "auto-mode", "model": args.model, "split": args.split, "date": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(), "seconds": time.perf_counter() - start,
        "command": f"python benchmarks/bench_auto.py --model {args.model} --split {args.split}",
        "datasets": summaries, "images": per_image}
    atomic_write_text(RESULTS / f"{args.name or 'auto-' + args.split}.json", json.dumps(document, indent=1))
    print(table(document))


if __name__ == "__main__":
    main()
