"""The automatic head's presence gate: what each gate costs in missed objects and gains in empty normals.

    python benchmarks/probe_presence_gate.py --model default --split test --datasets busi ddti usgra_vessel

Every image of the split is answered once with no gate (`--presence-gate off`); for each gate the
answers whose presence probability lies below it become empty masks (what `uniultra predict --prompt
none --presence-gate G` does). Per set and gate: normal scans answered empty (specificity), objects
still answered (sensitivity), Dice over the object images (an emptied one scores 0) and over all
images (an empty normal scores 1). `calibrated` is the checkpoint's own gate (chosen on val for
the best mean Dice, `uniultra auto calibrate`).
Writes benchmarks/results/probe-presence-gate-<name>.json and prints the markdown table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from box_rows import save_result
from tqdm import tqdm

from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.evaluation.metrics import dice_score
from uniultra.inference.auto_predictor import automatic_head
from uniultra.inference.loading import load_predictor
from uniultra.inference.presence_gate import NO_GATE, set_presence_gate

ROOT = Path(__file__).resolve().parent.parent
GATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def ungated_rows(predictor, dataset: SegmentationDataset) -> list[dict]:
    predictor.modality = dataset.name
    rows = []
    for sample in tqdm(dataset.samples, desc=dataset.name, unit="img", leave=False):
        item = load_sample(sample)
        predictor.set_image(item["image"])
        mask, presence, _ = predictor.predict_without_prompt()
        rows.append({"stem": sample.stem, "truth_empty": not item["mask"].any(), "presence": float(presence),
                     "dice": float(dice_score(np.asarray(mask, dtype=bool), item["mask"]))})
    return rows


def operating_point(rows: list[dict], gate: float) -> dict:
    objects = [r for r in rows if not r["truth_empty"]]
    normals = [r for r in rows if r["truth_empty"]]
    answered = [r["presence"] >= gate for r in objects]
    dice_objects = [r["dice"] if keep else 0.0 for r, keep in zip(objects, answered, strict=True)]
    dice_normals = [1.0 if r["presence"] < gate else r["dice"] for r in normals]
    return {"gate": gate, "normals_empty": sum(r["presence"] < gate for r in normals), "n_normals": len(normals),
            "objects_answered": sum(answered), "n_objects": len(objects),
            "dice_objects": float(np.mean(dice_objects)) if objects else None,
            "dice_all": float(np.mean(dice_objects + dice_normals))}


def table(points: dict[str, list[dict]], calibrated: float | None, split: str) -> str:
    lines = ["| set (split) | gate | normals answered empty | objects answered | Dice objects | Dice all |",
             "|---|---|---|---|---|---|"]
    for name, rows in points.items():
        for p in rows:
            label = f"{p['gate']:.3f} (calibrated)" if p["gate"] == calibrated else f"{p['gate']:g}"
            lines.append(f"| {name} ({split}) | {label} | {p['normals_empty']} of {p['n_normals']} | "
                         f"{p['objects_answered']} of {p['n_objects']} | {100 * p['dice_objects']:.2f} | "
                         f"{100 * p['dice_all']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--split", default="test")
    parser.add_argument("--datasets", nargs="+", default=["busi", "ddti", "usgra_vessel"])
    parser.add_argument("--gates", nargs="+", type=float, default=list(GATES))
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--name", default=None, help="results file stem suffix (default: the split)")
    args = parser.parse_args()
    predictor = load_predictor(args.model)
    auto = automatic_head(predictor)
    if auto is None:
        raise SystemExit(f"{args.model}: has no automatic head")
    calibrated = auto.config.presence_threshold
    set_presence_gate(predictor, NO_GATE)
    gates = sorted({0.0, *args.gates, *([calibrated] if calibrated is not None else [])})
    start = time.perf_counter()
    images, points = {}, {}
    for name in args.datasets:
        images[name] = ungated_rows(predictor, SegmentationDataset(Path(args.data_root) / name, split=args.split))
        points[name] = [operating_point(images[name], g) for g in gates]
    out = save_result(f"probe-presence-gate-{args.name or args.split}", {
        "command": f"python benchmarks/probe_presence_gate.py --model {args.model} --split {args.split} "
                   f"--datasets {' '.join(args.datasets)}",
        "model": args.model, "split": args.split, "calibrated_gate": calibrated,
        "seconds": time.perf_counter() - start, "operating_points": points, "images": images})
    print(table(points, calibrated, args.split))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
