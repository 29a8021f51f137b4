"""Distillation claims with seeds (issue "The seeds' claims", item 2).

Every arm is a shipped config plus overrides of `levels`, `seed`, epochs and `out_dir` only, so
the arms of one seed differ in what they test and nothing else:

    no_teacher    the same mini and fine-tuning recipe without a teacher (mini-universal-scratch.yaml
                  on busi + ddti + tg3k, as many epochs as the students' fine-tuning)
    dskd_l1 / dskd_l23 / dskd_l123
                  DSKD of levels {1}, {2,3}, {1,2,3} (distill-mini-universal.yaml), then fine-tuning
    subset_random / subset_kcenter / subset_gradient
                  DSKD levels {1,2,3} + fine-tuning on 346 of the 1729 train images, chosen at random,
                  by k-center on the teacher's embedding, or by k-center on per-image decoder
                  gradients (distill-mini-coreset.yaml with `uniultra data coreset`'s file)
    mdkd          MDKD (mdkd-mini-universal.yaml: shared weights from the foundation, the modality
                  controller from the adapted teacher), then the same fine-tuning as DSKD, each
                  sample under its dataset's modality (and so evaluated)

Each student is scored on the test splits of busi, ddti and tg3k with jittered boxes (J = 20,
seed 0, 256 px), and a row gives mean and 95 % interval across seeds; a paired column gives the
per-seed difference to the arm it is compared with (see COMPARISONS).

    python benchmarks/bench_distill_seeds.py --teacher T.pt --foundation F.pt --arms no_teacher dskd_l123 --seeds 0 1 2
    python benchmarks/bench_distill_seeds.py --table

Writes runs/distill-seeds/<arm>/seed<k>/ and benchmarks/results/distill-seeds.json after every
run (an interrupted sweep keeps what it finished; a finished run is not retrained).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml
from seed_sweep import sweep

from uniultra.distill.config import load_distill_config
from uniultra.distill.trainer import distill
from uniultra.engine.config import load_train_config
from uniultra.engine.trainer import train
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.evaluation.seeds import mean_ci, paired_difference, verdict
from uniultra.inference.cpu import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "distill-seeds.json"
DATASETS = ("busi", "ddti", "tg3k")
SUBSET_K = 346
LEVELS = {"dskd_l1": [1], "dskd_l23": [2, 3], "dskd_l123": [1, 2, 3]}
SUBSETS = {"subset_random": "random", "subset_kcenter": "kcenter", "subset_gradient": "gradient"}
ARMS = ("no_teacher", *LEVELS, *SUBSETS, "mdkd")
# (arm, the arm it is compared with): the claims of the seed papers.
COMPARISONS = (
    ("dskd_l1", "no_teacher"), ("dskd_l23", "no_teacher"), ("dskd_l123", "no_teacher"),
    ("dskd_l23", "dskd_l1"), ("dskd_l123", "dskd_l23"),
    ("subset_kcenter", "subset_random"), ("subset_gradient", "subset_random"),
    ("mdkd", "dskd_l123"),
)


def _data(root: Path, subset: str | None = None) -> list[dict]:
    return [{"path": str(root / name), **({"subset": subset} if subset else {})} for name in DATASETS]


def run_arm(arm: str, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    """Train one (arm, seed) unless its final checkpoint exists; its path and train seconds."""
    out = Path(args.out) / arm / f"seed{seed}"
    root = Path(args.data_root)
    if arm == "no_teacher":
        final = out / "best.pt"
        if not final.is_file():
            config = load_train_config(ROOT / "configs/cpu/mini-universal-scratch.yaml", overrides={
                "data": _data(root), "seed": seed, "out_dir": str(out), "cache_dir": args.cache,
                "optim": {"epochs": args.finetune_epochs}})
            train(config, resume=True)
        return final, _seconds(out / "log.json")
    config_name, overrides = _distill_overrides(arm, seed, args)
    overrides.update({"seed": seed, "out_dir": str(out), "cache_dir": args.cache,
                      "teacher": {"checkpoint": args.teacher},
                      "teacher_cache": {"enabled": True, "dir": str(Path(args.cache) / "teacher"), "dtype": "float16"}})
    final = out / "student.pt"
    if not final.is_file():
        distill(load_distill_config(ROOT / "configs/cpu" / config_name, overrides), resume=True)
    return final, _seconds(out / "log.json") + _seconds(out / "finetune" / "log.json")


def _distill_overrides(arm: str, seed: int, args: argparse.Namespace) -> tuple[str, dict]:
    root = Path(args.data_root)
    epochs = {"optim": {"epochs": args.dskd_epochs}, "finetune": {"epochs": args.finetune_epochs}}
    if arm in LEVELS:
        return "distill-mini-universal.yaml", {"levels": LEVELS[arm], "data": _data(root), **epochs}
    if arm in SUBSETS:
        subset = make_subset(SUBSETS[arm], seed, args)
        return "distill-mini-coreset.yaml", {
            "data": _data(root, str(subset)), "optim": {"epochs": args.subset_epochs},
            "finetune": {"epochs": args.subset_epochs}}
    if arm == "mdkd":
        dskd = yaml.safe_load((ROOT / "configs/cpu/distill-mini-universal.yaml").read_text())
        return "mdkd-mini-universal.yaml", {"data": _data(root), "mdkd": {"general_teacher": args.foundation},
                                            "optim": {"epochs": args.dskd_epochs},
                                            "finetune": {**dskd["finetune"], "epochs": args.finetune_epochs}}
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def make_subset(method: str, seed: int, args: argparse.Namespace) -> Path:
    """The subset file of one method and seed (made once with `uniultra data coreset`)."""
    out = Path(args.out) / "subsets" / f"{method}-{SUBSET_K}-seed{seed}.txt"
    if not out.is_file():
        words = [sys.executable, "-m", "uniultra", "data", "coreset",
                 *(str(Path(args.data_root) / name) for name in DATASETS), "--k", str(SUBSET_K),
                 "--method", method, "--seed", str(seed), "--out", str(out), "--no-progress"]
        if method != "random":
            words += ["--teacher", args.teacher, "--threads", str(args.threads),
                      "--cache-dir", str(Path(args.cache) / "coreset")]
        subprocess.run(words, check=True)
    return out


def _seconds(log_file: Path) -> float:
    if not log_file.is_file():
        return 0.0
    log = json.loads(log_file.read_text())
    return float(sum((r.get("seconds_train") or 0) + (r.get("seconds_val") or 0) for r in log.get("epochs", [])))


def score(checkpoint: Path, datasets: list) -> dict:
    results = evaluate(make_method(str(checkpoint)), datasets, prompt_mode="box", jitter=20.0, seed=0, progress=False)
    return {r.name: r.summary() for r in results}


def mean_dice(run: dict) -> float:
    return 100 * sum(run["test"][name]["dice"]["mean"] for name in DATASETS) / len(DATASETS)


def table(document: dict) -> str:
    runs = document["runs"]
    dice_columns = " | ".join(f"{d} Dice" for d in DATASETS)
    lines = [f"| arm | seeds | {dice_columns} | mean Dice | mean HD95 px | train min |",
             "|---|---|" + "---|" * (len(DATASETS) + 3)]
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        cells = [_cell([100 * r["test"][d]["dice"]["mean"] for r in mine]) for d in DATASETS]
        minutes = sum(r["train_seconds"] for r in mine) / len(mine) / 60
        hd95 = _cell([sum(r["test"][d]["hd95"]["mean"] for d in DATASETS) / len(DATASETS) for r in mine])
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells)
                     + f" | {_cell([mean_dice(r) for r in mine])} | {hd95} | {minutes:.1f} |")
    lines += ["", "| claim: arm minus reference (mean Dice, same seed) | seeds | difference | verdict |",
              "|---|---|---|---|"]
    by_arm = {}
    for r in runs:
        by_arm.setdefault(r["arm"], {})[r["seed"]] = mean_dice(r)
    for arm, reference in COMPARISONS:
        mean, half, n = paired_difference(by_arm.get(arm, {}), by_arm.get(reference, {}))
        if n:
            shown = f"{mean:+.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")
            lines.append(f"| {arm} - {reference} | {n} | {shown} | {verdict(mean, half)} |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    mean, half = mean_ci(values)
    return f"{mean:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", default="runs/cpu/universal-teacher-zoom/best.pt")
    parser.add_argument("--foundation", default="runs/cpu/foundation-c32-zoom/best.pt", help="MDKD's general teacher")
    parser.add_argument("--dskd-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--subset-epochs", type=int, default=6, help="DSKD and fine-tuning epochs on a subset")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/distill-seeds")
    parser.add_argument("--cache", default="runs/cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="print the markdown tables of the JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULT.read_text())))
        return
    datasets = load_datasets([Path(args.data_root) / name for name in DATASETS], "test", None)
    header = {"benchmark": "distill-seeds", "teacher": args.teacher, "foundation": args.foundation,
              "machine": {**machine_info(), "cpu": cpu_model()}, "protocol": "box J=20, seed 0, test splits",
              "budget": {"dskd_epochs": args.dskd_epochs, "finetune_epochs": args.finetune_epochs,
                         "subset_epochs": args.subset_epochs, "subset_k": SUBSET_K}}

    def run_one(arm: str, seed: int) -> dict:
        checkpoint, seconds = run_arm(arm, seed, args)
        return {"checkpoint": str(checkpoint), "train_seconds": seconds, "test": score(checkpoint, datasets)}

    document = sweep(RESULT, header, args.arms, args.seeds, run_one,
                     lambda run: f"mean Dice {mean_dice(run):.2f}, {run['train_seconds'] / 60:.1f} min")
    print(table(document))


if __name__ == "__main__":
    main()
