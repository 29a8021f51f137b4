"""Fit a learned choice among a tap's candidate answers, and compare it with the shipped rule.

    python benchmarks/probe_taps.py --model default --split train --rows-out runs/tap-selector/train-rows.json
    python benchmarks/probe_taps.py --model default --split val --rows-out runs/tap-selector/val-rows.json
    python benchmarks/fit_tap_selector.py --train runs/tap-selector/train-rows.json \
        --eval runs/tap-selector/val-rows.json [--leave-one-out]

A tap is answered on several crops (uniultra.inference.zoom); the shipped rule keeps the answer with the
highest agreement + 0.5 x predicted IoU. Here a linear score over per-candidate features
(`candidate_features`: what the predictor knows without the truth) is fitted to maximise the expected
Dice of the softmax choice on the --train taps, then scored by its argmax on the --eval taps, per set,
next to the shipped rule and the oracle; with --leave-one-out each set is scored by weights fitted
without it. Writes benchmarks/results/<name>.json with the weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.report import machine_info
from uniultra.inference.zoom import BORDER_PENALTY, TAP_SCORE_WEIGHT

ROOT = Path(__file__).resolve().parent.parent
# Area shares below this count as empty in the logarithmic area features.
MIN_SHARE = 1e-4


def agreement(iou: np.ndarray) -> np.ndarray:
    """Each candidate's mean IoU with the others ((C, C) -> (C,)); 0 for a single candidate."""
    count = len(iou)
    if count == 1:
        return np.zeros(1)
    return (iou.sum(axis=1) - np.diag(iou)) / (count - 1)


def shipped_choice(answers: dict) -> int:
    """Index of the candidate the shipped rule keeps."""
    score = (agreement(answers["iou"]) + TAP_SCORE_WEIGHT * answers["predicted_iou"]
             - BORDER_PENALTY * answers["cut_off"].astype(float))
    return int(np.argmax(score))


def feature_names(count: int) -> tuple[str, ...]:
    return ("agreement", "predicted IoU", "cut off", "log image share", "crop share", "IoU with first pass",
            "IoU with whole image", "empty") + tuple(f"candidate {i}" for i in range(count))


# The default's tap is answered on the first pass's crop and the six squares of TAP_SIDES.
FEATURE_NAMES = feature_names(7)


def candidate_features(answers: dict, image_hw: tuple[int, int]) -> np.ndarray:
    """(C, F) features of the C candidates, F = len(feature_names(C)); a candidate's index is one-hot, so
    a learned rule can prefer a crop size (weights only fit predictors with the same crops)."""
    iou, area = answers["iou"], answers["area"]
    image_share = area / float(image_hw[0] * image_hw[1])
    columns = [agreement(iou), answers["predicted_iou"], answers["cut_off"].astype(float),
               np.log(np.maximum(image_share, MIN_SHARE)), area / answers["crop_area"], iou[:, 0], iou[:, -1],
               (area == 0).astype(float)]
    return np.concatenate([np.stack(columns, axis=1), np.eye(len(area))], axis=1)


def load(path: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray, dict]]]:
    """Per set: (features (C, F), Dice (C,), row) of every tap."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {name: [(candidate_features(_answers(row), tuple(row["image_hw"])), np.asarray(row["dice"]), row)
                   for row in taps] for name, taps in rows.items()}


def _answers(row: dict) -> dict:
    return {"iou": np.asarray(row["iou"]), "predicted_iou": np.asarray(row["predicted_iou"]),
            "cut_off": np.asarray(row["cut_off"], dtype=bool), "area": np.asarray(row["area"], dtype=float),
            "crop_area": np.asarray([w * h for w, h in row["crop"]], dtype=float)}


def fit(sets: dict[str, list], l2: float, temperature: float, steps: int) -> np.ndarray:
    """Weights maximising the expected Dice of softmax(score / temperature), each set weighing the same
    whatever its number of taps, less l2 x |w|^2."""
    taps = [t for name in sorted(sets) for t in sets[name]]
    features = torch.tensor(np.stack([f for f, _, _ in taps]), dtype=torch.float64)  # (T, C, F)
    dices = torch.tensor(np.stack([d for _, d, _ in taps]), dtype=torch.float64)  # (T, C)
    share = torch.tensor([1.0 / (len(sets[name]) * len(sets)) for name in sorted(sets) for _ in sets[name]],
                         dtype=torch.float64)
    weights = torch.zeros(features.shape[-1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        choice = torch.softmax(features @ weights / temperature, dim=1)
        loss = -((choice * dices).sum(dim=1) * share).sum() + l2 * (weights ** 2).sum()
        loss.backward()
        optimiser.step()
    return weights.detach().numpy()


def scores(taps: list[tuple[np.ndarray, np.ndarray, dict]], weights: np.ndarray) -> dict[str, float]:
    learned = [d[int(np.argmax(f @ weights))] for f, d, _ in taps]
    shipped = [d[shipped_choice(_answers(row))] for _, d, row in taps]
    return {"n": len(taps), "learned": round(100 * float(np.mean(learned)), 2),
            "shipped": round(100 * float(np.mean(shipped)), 2),
            "oracle": round(100 * float(np.mean([d.max() for _, d, _ in taps])), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True, help="probe_taps.py --rows-out of the fitting taps")
    parser.add_argument("--eval", type=Path, required=True, help="probe_taps.py --rows-out of the scored taps")
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--name", default="tap-selector")
    parser.add_argument("--leave-one-out", action="store_true",
                        help="score each --eval set with weights fitted on the OTHER sets' --train taps (an "
                        "anatomy the rule never saw); the weights written are still those fitted on every set")
    args = parser.parse_args()
    torch.manual_seed(0)
    train_sets, eval_sets = load(args.train), load(args.eval)
    weights = fit(train_sets, args.l2, args.temperature, args.steps)
    result = {name: scores(taps, fit({k: v for k, v in train_sets.items() if k != name}, args.l2,
                                     args.temperature, args.steps) if args.leave_one_out else weights)
              for name, taps in eval_sets.items()}
    for name, row in result.items():
        print(f"{name}: {row}")
    means = {k: round(float(np.mean([r[k] for r in result.values()])), 2) for k in ("learned", "shipped", "oracle")}
    print(f"mean over sets: {means}")
    print("weights: " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURE_NAMES, weights, strict=True)))
    document = {"benchmark": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                "train": str(args.train), "eval": str(args.eval), "leave_one_out": args.leave_one_out,
                "fit": {"l2": args.l2, "temperature": args.temperature, "steps": args.steps},
                "features": list(FEATURE_NAMES), "weights": weights.round(5).tolist(),
                "sets": result, "mean": means}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"{args.name}.json", json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
