"""Do two automatic heads trained on one frozen encoder average into a working head? (why `uniultra
average` refuses automatic-mode checkpoints)

    python benchmarks/probe_auto_head_average.py --models runs/cpu/auto-ph3s1-seed0/best.pt \\
        runs/cpu/auto-ph3s1-seed1/best.pt --split val

Each head is answered alone and their equal-weight average (every weight of the checkpoints averaged; the
frozen encoder and the fitted presence probe are identical in both, so only the heads' weights differ),
no prompt, on every image of the split, as `bench_auto.py` scores it. The heads' new parts (prompt
generator, per-channel queries, presence head) start from random weights drawn with each run's seed,
unlike second stages fine-tuned from one model (`probe_weight_average.py`).
Writes benchmarks/results/probe-auto-head-average-<split>.json and prints each table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_auto import ANSWERS, run_dataset, summarise, table
from box_rows import save_result
from shared_sets import DATASETS

from uniultra.data.dataset import SegmentationDataset
from uniultra.inference.loading import load_auto_model, load_predictor
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.weight_average import average_states

ROOT = Path(__file__).resolve().parent.parent


def averaged_head(paths: list[str], out: Path) -> Path:
    models = [load_auto_model(p) for p in paths]
    models[0].load_state_dict(average_states([m.state_dict() for m in models], names=paths))
    save_auto_model(models[0], out, meta={"averaged_from": paths, "note": "probe: auto heads averaged"})
    return out


def scored(model: str, split: str, data_root: str) -> dict:
    predictor = load_predictor(model)
    summaries = {name: summarise(run_dataset(predictor, SegmentationDataset(Path(data_root) / name, split=split)))
                 for name in DATASETS}
    mean = float(np.mean([s["head"]["dice_all"] for s in summaries.values()]))
    print(f"{model}:\n" + table({"datasets": summaries, "split": split}) + f"\nmean head Dice (all) {100 * mean:.2f}")
    return {"datasets": summaries, "mean_head_dice_all": mean}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs=2, required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", default="runs/auto-head-average.safetensors", type=Path)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    start = time.perf_counter()
    average = averaged_head(args.models, args.out)
    rows = {label: scored(model, args.split, args.data_root)
            for label, model in (("first", args.models[0]), ("second", args.models[1]), ("average", str(average)))}
    models = " ".join(args.models)
    out = save_result(f"probe-auto-head-average-{args.split}", {
        "command": f"python benchmarks/probe_auto_head_average.py --models {models} --split {args.split}",
        "models": args.models, "split": args.split, "answers": list(ANSWERS), "seconds": time.perf_counter() - start,
        "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
