"""Where does a model lose to the inscribed ellipse? Per object size, and the worst images drawn.

    python benchmarks/probe_where_ellipse_wins.py --model runs/loo/universal-zoom-long/ddti/best.pt \\
        --data ../shared/data/ddti --jitter 20 --picture docs/images/ddti-held-out-worst.png

Both answer the same boxes (seed 0) on every image of the set (or --split); the per-image Dice difference
(model - ellipse) is summarised by quartile of the object's share of the image, and the --worst images
are drawn side by side (ellipse left, model right; truth green, answer red, box yellow). Writes
benchmarks/results/where-ellipse-wins-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from uniultra.atomic import atomic_write, atomic_write_text
from uniultra.evaluation.evaluate import evaluate, load_datasets, make_method
from uniultra.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"truth": (0, 255, 0), "answer": (255, 0, 0), "box": (255, 255, 0)}


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=2)


def drawing(item: dict, boxes: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    image = item["image"] if item["image"].ndim == 3 else np.repeat(item["image"][..., None], 3, axis=-1)
    out = image.astype(np.uint8).copy()
    out[outline(item["mask"] > 0)] = COLOURS["truth"]
    out[outline(prediction.astype(bool))] = COLOURS["answer"]
    for x0, y0, x1, y1 in boxes.astype(int):
        out[y0:y1 + 1, [x0, x1]] = COLOURS["box"]
        out[[y0, y1], x0:x1 + 1] = COLOURS["box"]
    return out


def run(spec: str, datasets, jitter: float, keep: set[str] | None) -> tuple[dict, dict, dict]:
    """Per image: Dice, object share of the image, and (for `keep` stems) the drawing."""
    dice, share, drawn = {}, {}, {}

    def record(item, prompt, prediction):
        share[item["stem"]] = float((item["mask"] > 0).mean())
        if keep is not None and item["stem"] in keep:
            drawn[item["stem"]] = drawing(item, prompt.boxes, prediction)

    (result,) = evaluate(make_method(spec), datasets, prompt_mode="box", jitter=jitter, seed=0, progress=False,
                         on_image=record)
    dice = {row["stem"]: row["dice"] for row in result.rows}
    return dice, share, drawn


def by_object_share(model: np.ndarray, difference: np.ndarray, shares: np.ndarray) -> list[dict]:
    """Mean model Dice and model - ellipse per quartile of the object's share of the image."""
    quartile = np.digitize(shares, np.quantile(shares, [0.25, 0.5, 0.75]))
    rows = []
    for q in range(4):
        inside = quartile == q
        rows.append({"quartile": q + 1, "n": int(inside.sum()),
                     "object_share": [round(float(shares[inside].min()), 4), round(float(shares[inside].max()), 4)],
                     "model": round(100 * float(model[inside].mean()), 2),
                     "model_minus_ellipse": round(100 * float(difference[inside].mean()), 2)})
    return rows


def picture(worst: list[str], ellipse: dict, model: dict) -> np.ndarray:
    rows = [np.concatenate([ellipse[stem], model[stem]], axis=1) for stem in worst]
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default=None, help="default: every image of the set")
    parser.add_argument("--jitter", type=float, default=20.0)
    parser.add_argument("--worst", type=int, default=4)
    parser.add_argument("--picture", type=Path, default=None, help="PNG of the worst images")
    parser.add_argument("--name", default=None, help="result name (default: the set's folder name)")
    args = parser.parse_args()
    datasets = load_datasets([args.data], args.split, None)
    model, share, _ = run(args.model, datasets, args.jitter, None)
    ellipse, _, _ = run("baseline:ellipse", datasets, args.jitter, None)
    stems = sorted(model)
    difference = np.array([model[s] - ellipse[s] for s in stems])
    by_size = by_object_share(np.array([model[s] for s in stems]), difference, np.array([share[s] for s in stems]))
    worst = [stems[i] for i in np.argsort(difference)[:args.worst]]
    for row in by_size:
        print(row)
    print("worst:", ", ".join(f"{s} ({100 * (model[s] - ellipse[s]):+.1f})" for s in worst))
    if args.picture:
        _, _, model_drawn = run(args.model, datasets, args.jitter, set(worst))
        _, _, ellipse_drawn = run("baseline:ellipse", datasets, args.jitter, set(worst))
        drawn = Image.fromarray(picture(worst, ellipse_drawn, model_drawn))
        atomic_write(args.picture, lambda tmp: drawn.save(tmp, format="PNG"))
    name = args.name or args.data.name
    document = {"benchmark": f"where-ellipse-wins-{name}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "model": args.model, "data": str(args.data), "split": args.split,
                "jitter": args.jitter, "n": len(stems), "model_minus_ellipse": round(100 * float(difference.mean()), 2),
                "by_object_share": by_size, "worst": {s: [model[s], ellipse[s]] for s in worst}}
    out = ROOT / "benchmarks" / "results" / f"where-ellipse-wins-{name}.json"
    atomic_write_text(out, json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
