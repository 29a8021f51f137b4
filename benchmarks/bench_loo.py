"""Leave-one-dataset-out validation of a training recipe (issue "Universal for real").

For a fold, the recipe's config is trained WITHOUT the held-out set(s) (every data entry whose
folder is held out is removed: labels and unsupervised regions alike), then the model is
evaluated on ALL images of the held-out set(s), next to the inscribed ellipse under the same
boxes: box J = 0, box J = 20, one tap (`point`), and box J = 20 + one corrective click. The two
usgra sets share their images, so they are held out together.

    python benchmarks/bench_loo.py --config configs/cpu/universal-zoom.yaml --fold carotid
    python benchmarks/bench_loo.py --table            # the markdown table of every finished fold

A two-stage recipe (a stage that fine-tunes a `model.base`) gives its first stage with --stage1: the fold
trains (or reuses) the first stage without the held-out set(s), packs it (fp16, with the second stage's
decoder blur, as `uniultra pack --half --decoder-blur` does for the full recipe) and starts the second
stage from that file instead of the config's `model.base`:

    python benchmarks/bench_loo.py --config configs/cpu/two-stage-complex.yaml \
        --stage1 configs/cpu/universal-zoom-complex.yaml --fold ddti

A fold model can also be the weight average of finished folds of recipes that fine-tune one first stage
(`uniultra average`; the fold's models must share their starting weights):

    python benchmarks/bench_loo.py --average grow-finetune-phantoms3 grow-finetune-phantoms9 \
        --name average-ph3-ph9 --fold ddti

Writes runs/loo/<recipe>/<fold>/ (config.yaml, training logs, best.pt) and
benchmarks/results/loo-<recipe>-<fold>.json. A fold whose best.pt exists is not retrained.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from uniultra.atomic import atomic_write_text
from uniultra.engine.config import load_train_config
from uniultra.engine.trainer import train
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info
from uniultra.inference.loading import average_models, pack_model
from uniultra.inference.zoom import tight_boxes_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FOLDS = {"busi": ("busi",), "ddti": ("ddti",), "tg3k": ("tg3k",), "carotid": ("carotid",),
         "usgra": ("usgra_nerve", "usgra_vessel")}
# (row label, prompt mode, jitter, tight boxes); the ellipse answers the untightened box modes only.
# "tight boxes": the exact boxes answered as `--tight-boxes` does (the model's exact-box tokens, or each box
# loosened by uniultra.inference.zoom.TIGHT_BOX_PADDING for a model without them).
PROTOCOL = (("box J=0", "box", 0.0, False), ("box J=0, tight boxes", "box", 0.0, True),
            ("box J=20", "box", 20.0, False), ("one tap", "point", 0.0, False),
            ("box J=20 + click", "box+click", 20.0, False))


TABLE_COLUMNS = (("ellipse", "box J=0"), ("model", "box J=0"), ("model", "box J=0, tight boxes"),
                 ("ellipse", "box J=20"), ("model", "box J=20"), ("model", "one tap"), ("model", "box J=20 + click"))


def fold_config(config_path: Path, held_out: tuple[str, ...], out_dir: Path, epochs: int | None,
                seed: int | None = None) -> dict:
    document = yaml.safe_load(config_path.read_text())
    if seed is not None:
        document["seed"] = seed
    kept = [e for e in document["data"] if not e.get("path") or Path(e["path"]).name not in held_out]
    document["data"] = kept
    document["out_dir"] = str(out_dir)
    if epochs is not None:
        document["optim"]["epochs"] = epochs
    return document


def train_fold(config: Path, held_out: tuple[str, ...], out_dir: Path, epochs: int | None,
               base: Path | None = None, seed: int | None = None) -> dict:
    """Train `config` without the held-out set(s) into out_dir (skipped when its best.pt exists);
    `base` replaces the config's model.base (a two-stage recipe's fold-specific first stage); `seed`
    the config's seed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    document = fold_config(config, held_out, out_dir, epochs, seed)
    if base is not None:
        document["model"]["base"] = str(base)
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(document, sort_keys=False))
    if not (out_dir / "best.pt").is_file():
        train(load_train_config(out_dir / "config.yaml"), resume=True)
    return document


def packed_first_stage(stage1: Path, second: Path, held_out: tuple[str, ...], out_root: Path, fold: str) -> Path:
    """The fold's first stage, trained (or reused) and packed as the second stage expects its base."""
    stage1_dir = out_root / stage1.stem / fold
    train_fold(stage1, held_out, stage1_dir, None)
    blur = ((yaml.safe_load(second.read_text())["model"].get("config") or {}).get("decoder") or {}).get("upscale_blur")
    packed = stage1_dir / f"packed-blur{blur}.safetensors"
    if not packed.is_file():
        pack_model(stage1_dir / "best.pt", packed, half=True, decoder_blur=blur,
                   meta={"loo_fold": fold, "stage1": str(stage1)})
    return packed


def recipe_name(config: str, seed: int | None) -> str:
    """The name of a recipe's runs and results: the config's stem, `-seedN` for another seed than its own."""
    return Path(config).stem + ("" if seed is None else f"-seed{seed}")


def averaged_fold(recipes: list[str], fold: str, out_root: Path, out_dir: Path) -> dict:
    """The fold's model as the weight average of the same fold of finished `recipes` (built once)."""
    sources = [out_root / r / fold / "best.pt" for r in recipes]
    if not (out_dir / "best.pt").is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        average_models(sources, out_dir / "best.pt", meta={"loo_fold": fold})
    return {"averaged_from": [str(s) for s in sources]}


def run_fold(args: argparse.Namespace) -> None:
    recipe = args.name if args.average else recipe_name(args.config, args.seed)
    held_out = FOLDS[args.fold]
    out_dir = Path(args.out) / recipe / args.fold
    start = time.perf_counter()
    base = None
    if args.average:
        document = averaged_fold(args.average, args.fold, Path(args.out), out_dir)
    else:
        if args.stage1:
            base = packed_first_stage(Path(args.stage1), Path(args.config), held_out, Path(args.out), args.fold)
        document = train_fold(Path(args.config), held_out, out_dir, args.epochs, base, args.seed)
    train_seconds = time.perf_counter() - start
    datasets = load_datasets([Path(args.data_root) / name for name in held_out], None, None)
    result_file = RESULTS / f"loo-{recipe}-{args.fold}.json"
    rows = json.loads(result_file.read_text())["rows"] if args.rows and result_file.is_file() else {}
    for label, spec in (("ellipse", "baseline:ellipse"), ("model", str(out_dir / "best.pt"))):
        method = make_method(spec)
        for row, mode, jitter, tight in PROTOCOL:
            if (label == "ellipse" and (mode != "box" or tight)) or (args.rows and row not in args.rows):
                continue
            t0 = time.perf_counter()
            with tight_boxes_for(getattr(method, "predictor", None), tight, spec):
                results = evaluate(method, datasets, prompt_mode=mode, jitter=jitter, seed=0, progress=False)
            rows.setdefault(label, {})[row] = {r.name: r.summary() for r in results}
            rows[label][row]["seconds"] = time.perf_counter() - t0
            print(f"{args.fold} {label} {row}: " + ", ".join(
                f"{r.name} Dice {100 * r.summary()['dice']['mean']:.2f}" for r in results), flush=True)
    document = {"benchmark": f"loo-{recipe}-{args.fold}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "recipe": args.config, "held_out": list(held_out),
                "train_config": document, "train_seconds_this_call": train_seconds,
                "train_minutes": "0 (weight average)" if args.average else _train_minutes(out_dir),
                "stage1": args.stage1, "average": args.average,
                "stage1_train_minutes": _train_minutes(Path(args.out) / Path(args.stage1).stem / args.fold)
                if args.stage1 else None,
                "train_log": str(out_dir), "protocol": [list(p) for p in PROTOCOL], "seed": 0,
                "train_seed": document.get("seed", 0),
                "command": _command(args),
                "rows": rows}
    if args.rows:
        document["rows_re_evaluated"] = {"rows": args.rows, "date": document["date"]}
    atomic_write_text(result_file, json.dumps(document, indent=1))


def _command(args: argparse.Namespace) -> str:
    if args.average:
        recipes = " ".join(args.average)
        return f"python benchmarks/bench_loo.py --average {recipes} --name {args.name} --fold {args.fold}"
    return (f"python benchmarks/bench_loo.py --config {args.config} --fold {args.fold}"
            + (f" --epochs {args.epochs}" if args.epochs is not None else "")
            + (f" --stage1 {args.stage1}" if args.stage1 else "")
            + (f" --seed {args.seed}" if args.seed is not None else ""))


def table(recipe: str) -> str:
    """Markdown: per held-out set, Dice / HD95 of the ellipse and the model under each protocol row."""
    lines = ["| held out | n | ellipse J=0 | model J=0 | model J=0, tight boxes | ellipse J=20 | model J=20 "
             "| model one tap | model J=20 + click | train min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for fold in FOLDS:
        path = RESULTS / f"loo-{recipe}-{fold}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        # the JSON keeps the minutes: the run directory with its log is not committed
        minutes = doc.get("train_minutes") or _train_minutes(Path(doc["train_log"]))
        if doc.get("stage1_train_minutes"):
            minutes = f"{doc['stage1_train_minutes']} + {minutes}"
        for name in doc["held_out"]:
            cells = [_cell(doc["rows"][label][row][name]) if row in doc["rows"][label] else "-"
                     for label, row in TABLE_COLUMNS]
            n = doc["rows"]["model"]["box J=20"][name]["n"]
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines)


def _cell(summary: dict) -> str:
    return f"{100 * summary['dice']['mean']:.2f} / {summary['hd95']['mean']:.1f}"


def _train_minutes(out_dir: Path) -> str:
    log = out_dir / "log.json"
    if not log.is_file():
        return "?"
    rows = json.loads(log.read_text())["epochs"]
    seconds = sum((r.get("seconds_train") or 0) + (r.get("seconds_val") or 0) for r in rows)
    return f"{seconds / 60:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/universal-zoom.yaml")
    parser.add_argument("--fold", choices=sorted(FOLDS))
    parser.add_argument("--epochs", type=int, default=None, help="override optim.epochs (same for every fold)")
    parser.add_argument("--stage1", default=None,
                        help="first-stage config of a two-stage recipe (trained per fold, packed, used as model.base)")
    parser.add_argument("--seed", type=int, default=None,
                        help="train with this seed instead of the config's; runs and results are named RECIPE-seedN")
    parser.add_argument("--average", nargs="+", default=None, metavar="RECIPE",
                        help="no training: the fold model is the weight average of these recipes' finished folds")
    parser.add_argument("--name", default=None, help="the averaged recipe's name (with --average)")
    parser.add_argument("--out", default="runs/loo")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--table", action="store_true", help="print the table of finished folds and exit")
    parser.add_argument("--rows", nargs="+", choices=[r[0] for r in PROTOCOL], default=None,
                        help="re-evaluate only these rows of a finished fold (the others are kept from its JSON)")
    args = parser.parse_args()
    if args.average and (len(args.average) < 2 or not args.name):
        parser.error("--average needs two or more recipes and --name")
    if args.table:
        print(table(args.name or recipe_name(args.config, args.seed)))
        return
    if args.fold is None:
        parser.error("give --fold NAME (or --table)")
    run_fold(args)


if __name__ == "__main__":
    main()
