"""Does averaging the weights of second stages fine-tuned from one first stage beat each? (a model soup)

    python benchmarks/probe_weight_average.py --folds ddti busi tg3k carotid usgra \\
        --mixes grow-finetune-phantoms3+grow-finetune-phantoms9 grow-finetune-phantoms3+grow-finetune-snug

For each leave-one-out fold, every recipe named in a mix must have finished that fold (runs/loo/RECIPE/FOLD/
best.pt; all of them fine-tune the fold's same packed first stage, so their weights can be averaged).
Each recipe alone and each mix (equal weights, `uniultra average`) answer all the held-out images, box J = 20
(seed 0), as `bench_loo.py` does. Unlike an ensemble of answers (`probe_ensemble.py`), a weight average costs
nothing at inference: one model, the speed of one.
Writes benchmarks/results/probe-weight-average-<name>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench_loo import FOLDS
from box_rows import box_row, save_result

from uniultra.evaluation.evaluate import load_datasets, make_method
from uniultra.inference.loading import average_models

ROOT = Path(__file__).resolve().parent.parent


def fold_model(runs: Path, fold: str, mix: list[str], cache: Path) -> Path | None:
    """The fold's model of one recipe, or the (cached) weight average of several; None if one is missing."""
    sources = [runs / recipe / fold / "best.pt" for recipe in mix]
    if not all(s.is_file() for s in sources):
        return None
    if len(sources) == 1:
        return sources[0]
    out = cache / fold / f"{'+'.join(mix)}.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        average_models(sources, out, meta={"loo_fold": fold})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", nargs="+", choices=sorted(FOLDS), default=list(FOLDS))
    parser.add_argument("--mixes", nargs="+", required=True,
                        help="RECIPE or RECIPE+RECIPE[+...]: a recipe alone, or the average of several")
    parser.add_argument("--runs", default="runs/loo", type=Path)
    parser.add_argument("--cache", default="runs/weight-average", type=Path)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--name", default="held-out")
    args = parser.parse_args()
    rows: dict[str, dict[str, dict]] = {}
    start = time.perf_counter()
    for fold in args.folds:
        datasets = load_datasets([Path(args.data_root) / name for name in FOLDS[fold]], None, None)
        for mix in args.mixes:
            model = fold_model(args.runs, fold, mix.split("+"), args.cache)
            if model is None:
                print(f"{fold} {mix}: a recipe has not finished this fold, skipped", flush=True)
                continue
            rows.setdefault(fold, {})[mix] = box_row(make_method(str(model)), datasets, args.jitter, f"{fold} {mix}")
    out = save_result(f"probe-weight-average-{args.name}", {
        "command": "python benchmarks/probe_weight_average.py --folds " + " ".join(args.folds)
                   + " --mixes " + " ".join(args.mixes) + f" --jitter {args.jitter:g} --name {args.name}",
        "protocol": "every image of the held-out set(s), box prompts loosened by up to `jitter` px, seed 0",
        "jitter": args.jitter, "seconds": time.perf_counter() - start, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
