"""PEFT comparison with seeds (issue "The seeds' claims"; paper Table V at CPU scale).

One config (configs/cpu/peft-tg3k.yaml: a foundation that never saw the target, adapted to it) is
run once per (variant, seed); a variant changes only `peft`, and a seed only `seed`, so data,
prompts, epochs and learning rate are the same in every row. Each run is evaluated on the
target's test split with box prompts at J = 20 and J = 0; the foundation itself (no adaptation)
is the first row. The table gives mean and a 95 % confidence interval across seeds (Student t).

    python benchmarks/bench_peft.py --seeds 0 1 2                 # every variant
    python benchmarks/bench_peft.py --variants ch_adapter lora --seeds 0
    python benchmarks/bench_peft.py --table                       # markdown of the JSON

Writes runs/peft/<target>/<variant>/seed<k>/ and benchmarks/results/peft-<target>.json (after every
run, so an interrupted sweep keeps what it finished; a run whose best.pt exists is not retrained).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.engine.config import load_train_config
from uniultra.engine.trainer import train
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.evaluation.seeds import mean_ci

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# Each variant's `peft` section replaces the config's; the CH-Adapter ablations of the paper are
# "context only" (= the plain adapter), "edge only", "context + edge" (ch_adapter) and the edge
# width c = 1 vs 8.
VARIANTS = {
    "ch_adapter": {"method": "ch_adapter", "edge_channels": 8},
    "ch_adapter_c1": {"method": "ch_adapter", "edge_channels": 1},
    "ch_adapter_edge_only": {"method": "ch_adapter", "edge_channels": 8, "context_branch": False},
    "adapter": {"method": "adapter"},
    "lora": {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0},
    "adapter_lora": {"method": "adapter_lora", "lora_rank": 4, "lora_alpha": 4.0},
    "decoder_only": {"method": "decoder_only"},
    "full": {"method": "full"},
    # The same with the mask decoder frozen: in a model this small the decoder holds 4.2 M of the
    # 5.1 M parameters and trains in every row above, so these rows isolate what the encoder-side
    # method adds (the prompt encoder and no_mem_embed still train).
    "ch_adapter_enc": {"method": "ch_adapter", "edge_channels": 8, "train_mask_decoder": False},
    "ch_adapter_edge_only_enc": {"method": "ch_adapter", "edge_channels": 8, "context_branch": False,
                                 "train_mask_decoder": False},
    "adapter_enc": {"method": "adapter", "train_mask_decoder": False},
    "lora_enc": {"method": "lora", "lora_rank": 4, "lora_alpha": 4.0, "train_mask_decoder": False},
    "full_enc": {"method": "full", "train_mask_decoder": False},
}
PROTOCOL = (("box J=20", 20.0), ("box J=0", 0.0))
FOUNDATION = "foundation (no adaptation)"
# Parameter groups of the trainable report outside the image encoder (they train in every method here).
DECODER_SIDE = ("prompt_encoder", "mask_decoder", "no_mem_embed")


def run_one(config_path: Path, variant: str, seed: int, out_root: Path) -> dict:
    out_dir = out_root / variant / f"seed{seed}"
    peft = {"ratio": 0.25, "scale": 0.5, "placement": "every_block", **VARIANTS[variant]}
    config = load_train_config(config_path, overrides={"peft": peft, "seed": seed, "out_dir": str(out_dir)})
    start = time.perf_counter()
    if not (out_dir / "best.pt").is_file():
        train(config, resume=True)
    log = json.loads((out_dir / "log.json").read_text())
    return {"variant": variant, "seed": seed, "checkpoint": str(out_dir / "best.pt"),
            "trainable": log.get("trainable"), "train_seconds": _train_seconds(log),
            "wall_seconds_this_call": time.perf_counter() - start}


def _train_seconds(log: dict) -> float:
    return float(sum((r.get("seconds_train") or 0) + (r.get("seconds_val") or 0) for r in log["epochs"]))


def score(spec: str, datasets: list) -> dict:
    method = make_method(spec)
    rows = {}
    for row, jitter in PROTOCOL:
        results = evaluate(method, datasets, prompt_mode="box", jitter=jitter, seed=0, progress=False)
        rows[row] = {r.name: r.summary() for r in results}
    return rows


def table(document: dict) -> str:
    target = document["target"]
    lines = [f"| {target} test (n = {document['n_test']}) | seeds | trained in the encoder | trained in all "
             "| Dice J=20 | HD95 J=20 | Dice J=0 | HD95 J=0 | Dice J=20 minus CH-Adapter's, same seed | train min |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_variant: dict[str, list[dict]] = {}
    for run in document["runs"]:
        by_variant.setdefault(run["variant"], []).append(run)
    dice = {(r["variant"], r["seed"]): 100 * r["rows"]["box J=20"][target]["dice"]["mean"] for r in document["runs"]}
    for variant, runs in by_variant.items():
        cells = []
        for row in ("box J=20", "box J=0"):
            for metric, scale in (("dice", 100.0), ("hd95", 1.0)):
                values = [scale * r["rows"][row][target][metric]["mean"] for r in runs]
                mean, half = mean_ci(values)
                cells.append(f"{mean:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}"))
        trainable = runs[0].get("trainable") or {}
        encoder = sum(g["trainable"] for name, g in trainable.get("groups", {}).items() if name not in DECODER_SIDE)
        minutes = np.mean([r.get("train_seconds", 0.0) for r in runs]) / 60
        lines.append(f"| {variant} | {len(runs)} | {_params(encoder)} | {_params(trainable.get('trainable'))} | "
                     + " | ".join(cells) + f" | {_paired(variant, runs, dice)} | {minutes:.1f} |")
    return "\n".join(lines)


def _paired(variant: str, runs: list[dict], dice: dict) -> str:
    """Mean and 95 % interval of the per-seed difference to the CH-Adapter row of the same kind (the
    `_enc` rows against ch_adapter_enc): seeds pair runs that saw the same batches."""
    reference = "ch_adapter_enc" if variant.endswith("_enc") else "ch_adapter"
    pairs = [dice[(variant, r["seed"])] - dice[(reference, r["seed"])] for r in runs
             if (reference, r["seed"]) in dice]
    if variant == reference or len(pairs) < 2:
        return "–"
    mean, half = mean_ci(pairs)
    return f"{mean:+.2f} ± {half:.2f}"


def _params(count: int | None) -> str:
    if not count:
        return "0"
    return f"{count / 1e6:.3f} M" if count >= 1e5 else f"{count / 1e3:.1f} k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/peft-tg3k.yaml")
    parser.add_argument("--target", default="tg3k", help="the adapted dataset (its folder name)")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=None, help="default runs/peft/<target>")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the JSON and exit")
    args = parser.parse_args()
    result_file = RESULTS / f"peft-{args.target}.json"
    if args.table:
        print(table(json.loads(result_file.read_text())))
        return
    out_root = Path(args.out or f"runs/peft/{args.target}")
    datasets = load_datasets([Path(args.data_root) / args.target], "test", None)
    document = json.loads(result_file.read_text()) if result_file.is_file() else {"runs": []}
    base = load_train_config(Path(args.config)).model.base
    document.update({"benchmark": f"peft-{args.target}", "target": args.target, "config": args.config,
                     "n_test": len(datasets[0]), "machine": machine_info(), "foundation": base,
                     "protocol": [list(p) for p in PROTOCOL], "command": "python benchmarks/bench_peft.py "
                     f"--config {args.config} --target {args.target} --seeds ..."})
    done = {(r["variant"], r["seed"]) for r in document["runs"]}
    if (FOUNDATION, 0) not in done:
        document["runs"].insert(0, {"variant": FOUNDATION, "seed": 0, "checkpoint": base,
                                    "rows": score(base, datasets), "trainable": None, "train_seconds": 0.0})
        atomic_write_text(result_file, json.dumps(document, indent=1))
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed) in done:
                continue
            run = run_one(Path(args.config), variant, seed, out_root)
            run["rows"] = score(run["checkpoint"], datasets)
            run["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            document["runs"].append(run)
            atomic_write_text(result_file, json.dumps(document, indent=1))
            dice = 100 * run["rows"]["box J=20"][args.target]["dice"]["mean"]
            print(f"{variant} seed {seed}: Dice J=20 {dice:.2f}, {run['train_seconds'] / 60:.1f} min", flush=True)
    print(table(document))


if __name__ == "__main__":
    main()
