"""Accuracy of a model on the committed test splits against the inscribed-ellipse baseline.

Same jittered boxes for every row (seed 0, J = 20 px at 1024 scale), all three shared datasets.
Rows: baseline:ellipse, the model, the model with --postprocess, and its ONNX export (fp32 and
INT8 encoder). Writes benchmarks/results/<name>.json.

    python benchmarks/bench_default_model.py --model default --name default-model
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import ModelMethod, evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("busi", "ddti", "tg3k")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--name", default="default-model")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()

    data = load_datasets([Path(args.data_root) / name for name in DATASETS], "test", None)
    protocol = {"prompt_mode": "box", "jitter": args.jitter, "seed": 0, "progress": False}
    rows = {}
    methods = {"baseline:ellipse": make_method("baseline:ellipse"), args.model: make_method(args.model)}
    methods[f"{args.model} +postprocess"] = ModelMethod(args.model, methods[args.model].predictor, postprocess=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_onnx:
            methods.update(_onnx_methods(args.model, Path(tmp)))
        for label, method in methods.items():
            start = time.perf_counter()
            results = evaluate(method, data, **protocol)
            rows[label] = {r.name: r.summary() for r in results}
            rows[label]["seconds"] = time.perf_counter() - start
            print(label, {k: round(100 * v["dice"]["mean"], 2) for k, v in rows[label].items() if k != "seconds"})
    document = {"benchmark": args.name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
                "protocol": {**protocol, "split": "test", "datasets": list(DATASETS)}, "model": args.model,
                "command": f"python benchmarks/bench_default_model.py --model {args.model} --name {args.name}",
                "rows": rows}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"{args.name}.json", json.dumps(document, indent=1))


def _onnx_methods(model: str, out: Path) -> dict:
    from uniultra.cli import main as cli

    if cli(["export", "onnx", "--model", model, "--out", str(out), "--int8"]) != 0:
        raise SystemExit("ONNX export failed")
    return {"onnx fp32": make_method(f"onnx:{out}"), "onnx int8 encoder": make_method(f"onnx-int8:{out}")}


if __name__ == "__main__":
    main()
