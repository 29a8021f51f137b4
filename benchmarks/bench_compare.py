"""Several models on the committed test splits, same prompts for every row: one comparison table.

Every row is `LABEL=SPEC`, where SPEC is anything `uniultra evaluate --model` accepts
(`baseline:ellipse`, `default`, a checkpoint path, `onnx:DIR`). Prompts: seed 0, boxes jittered by
J px at 1024 scale (the same boxes for every row), on busi / ddti / tg3k. Writes
benchmarks/results/<name>.json and prints a markdown table (Dice / IoU / HD95 per dataset, mean).

    python benchmarks/bench_compare.py --name distill-table \
        --row ellipse=baseline:ellipse --row teacher=runs/cpu/universal-teacher/best.pt ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("busi", "ddti", "tg3k")


def parse_row(text: str) -> tuple[str, str]:
    label, sep, spec = text.partition("=")
    if not sep or not label or not spec:
        raise argparse.ArgumentTypeError(f"expected LABEL=SPEC, got {text!r}")
    return label, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", type=parse_row, action="append", required=True, metavar="LABEL=SPEC")
    parser.add_argument("--name", required=True, help="results file name (benchmarks/results/NAME.json)")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--prompt", default="box")
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--size", type=int, default=None, help="model input size (default: each model's own)")
    args = parser.parse_args()

    data = load_datasets([Path(args.data_root) / name for name in DATASETS], "test", None)
    protocol = {"prompt_mode": args.prompt, "jitter": args.jitter, "seed": 0, "progress": False}
    rows = {}
    for label, spec in args.row:
        start = time.perf_counter()
        results = evaluate(make_method(spec, image_size=args.size), data, **protocol)
        rows[label] = {"spec": spec, "seconds": time.perf_counter() - start,
                       "datasets": {r.name: r.summary() for r in results}}
        print(label, {k: round(100 * v["dice"]["mean"], 2) for k, v in rows[label]["datasets"].items()}, flush=True)
    command = "python benchmarks/bench_compare.py " + " ".join(
        [f"--name {args.name}", f"--prompt {args.prompt}", f"--jitter {args.jitter:g}"]
        + [f"--row {label}={spec}" for label, spec in args.row])
    document = {"benchmark": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                "protocol": {**protocol, "split": "test", "datasets": list(DATASETS)}, "command": command,
                "rows": rows}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"{args.name}.json", json.dumps(document, indent=1))
    print(markdown_table(rows))


def markdown_table(rows: dict) -> str:
    header = "| model | " + " | ".join(f"{d} Dice / IoU / HD95" for d in DATASETS) + " | mean Dice |"
    lines = [header, "|---" * (len(DATASETS) + 2) + "|"]
    for label, row in rows.items():
        cells, dices = [], []
        for name in DATASETS:
            s = row["datasets"][name]
            dices.append(100 * s["dice"]["mean"])
            cell = f"{dices[-1]:.2f} / {100 * s['iou']['mean']:.2f} / {s['hd95']['mean']:.1f}"
            if s.get("n_empty_truth"):  # unprompted runs score empty-truth images too: show them apart
                cell += (f" (lesion {100 * s['dice_truth_nonempty']['mean']:.1f}, "
                         f"{s['n_empty_truth']} empty {100 * s['dice_truth_empty']['mean']:.1f})")
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {sum(dices) / len(dices):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
