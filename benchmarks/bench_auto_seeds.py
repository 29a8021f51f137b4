"""The modality decoder vs one shared query in automatic mode, with seeds (issue "The seeds' claims", item 2).

The automatic head of the bundled default (configs/cpu/auto-default.yaml: six datasets, presence
head, its own decoder copy) is trained once per (arm, seed); the arms differ only in
`model.modality_decoder` (one learned query + hypernetwork per dataset, or one shared by all), a seed
only in `seed`. Each head is scored on the test splits without any prompt (the head's own answer,
as `predict --prompt none` on an export): Dice on images with an object, per dataset, and busi's
presence ROC AUC (lesions vs normal scans).

    python benchmarks/bench_auto_seeds.py --seeds 0 1 2 --epochs 6
    python benchmarks/bench_auto_seeds.py --table

Writes runs/auto-seeds/<arm>/seed<k>/ and benchmarks/results/auto-seeds.json after every run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench_auto import DATASETS, run_dataset, summarise
from seed_sweep import sweep

from uniultra.auto.config import load_auto_config
from uniultra.auto.trainer import train_auto
from uniultra.data.dataset import SegmentationDataset
from uniultra.evaluation.report import machine_info
from uniultra.evaluation.seeds import mean_ci, paired_difference, verdict
from uniultra.inference.cpu import cpu_model
from uniultra.inference.loading import load_predictor

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "auto-seeds.json"
ARMS = {"modality_decoder": True, "shared_query": False}


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    out = Path(args.out) / arm / f"seed{seed}"
    if not (out / "best.pt").is_file():
        config = load_auto_config(ROOT / "configs/cpu/auto-default.yaml", {
            "model": {"modality_decoder": ARMS[arm]}, "seed": seed, "out_dir": str(out),
            "optim": {"epochs": args.epochs}, "cache_dir": args.cache})
        train_auto(config, resume=True)
    log = json.loads((out / "log.json").read_text())
    return out / "best.pt", float(sum((r.get("seconds_train") or 0) + (r.get("seconds_val") or 0)
                                      for r in log.get("epochs", [])))


def score(checkpoint: Path, data_root: Path) -> dict:
    predictor = load_predictor(str(checkpoint))
    return {name: summarise(run_dataset(predictor, SegmentationDataset(data_root / name, split="test"), ("head",)),
                            ("head",)) for name in DATASETS}


def lesion_dice(run: dict, name: str) -> float:
    return 100 * run["test"][name]["head"]["dice_lesion"]


def table(document: dict) -> str:
    runs = document["runs"]
    lines = ["| arm | seeds | " + " | ".join(DATASETS) + " | mean | busi presence AUC | train min |",
             "|---|---|" + "---|" * (len(DATASETS) + 3)]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        cells = [_cell([lesion_dice(r, d) for r in mine]) for d in DATASETS]
        mean = _cell([sum(lesion_dice(r, d) for d in DATASETS) / len(DATASETS) for r in mine])
        auc = _cell([r["test"]["busi"]["presence_auc"] for r in mine], 3)
        minutes = sum(r["train_seconds"] for r in mine) / len(mine) / 60
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + f" | {mean} | {auc} | {minutes:.1f} |")
    by_arm: dict[str, dict[int, float]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = sum(lesion_dice(r, d) for d in DATASETS) / len(DATASETS)
    mean, half, n = paired_difference(by_arm.get("modality_decoder", {}), by_arm.get("shared_query", {}))
    if n:
        shown = f"{mean:+.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")
        lines += ["", f"modality decoder minus shared query, mean lesion Dice, same seed ({n} seeds): {shown} "
                      f"({verdict(mean, half)})"]
    return "\n".join(lines)


def _cell(values: list[float], digits: int = 2) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/auto-seeds")
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULT.read_text())))
        return
    header = {"benchmark": "auto-seeds", "config": "configs/cpu/auto-default.yaml", "epochs": args.epochs,
              "machine": {**machine_info(), "cpu": cpu_model()},
              "protocol": "no prompt, head answer, test splits; Dice on images with an object"}

    def run_one(arm: str, seed: int) -> dict:
        checkpoint, seconds = run_arm(arm, seed, args)
        test = score(checkpoint, Path(args.data_root))
        return {"checkpoint": str(checkpoint), "train_seconds": seconds, "test": test}

    document = sweep(RESULT, header, args.arms, args.seeds, run_one,
                     lambda run: f"busi {lesion_dice(run, 'busi'):.2f}, {run['train_seconds'] / 60:.1f} min")
    print(table(document))


if __name__ == "__main__":
    main()
