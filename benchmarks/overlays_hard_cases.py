"""Before / after overlays of hard cases: where two models differ most under the same boxes.

For each dataset, the test images where `--after` gains most over `--before` (leaks, holes,
misses) and the one where it loses most (shown honestly), box J = 20, seed 0. Each row: image
name, Dice before and after, then the two overlays (prediction red, truth green, box yellow).

    python benchmarks/overlays_hard_cases.py --before default --after runs/cpu/universal-zoom/best.pt \\
        --out docs/images/hard-cases.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from uniultra.data.dataset import load_sample
from uniultra.data.prompts import make_prompt
from uniultra.evaluation.evaluate import load_datasets, make_method
from uniultra.evaluation.metrics import dice_score
from uniultra.evaluation.report import overlay_image

ROOT = Path(__file__).resolve().parent.parent
TILE = 320


def scored(methods, dataset, jitter: float) -> list[dict]:
    rows = []
    for sample in dataset.samples:
        item = load_sample(sample)
        prompt = make_prompt(item["mask"], "box", stem=sample.stem, seed=0, jitter=jitter)
        if prompt is None:
            continue
        masks = [m.predict(item["image"], prompt) for m in methods]
        rows.append({"item": item, "prompt": prompt, "masks": masks,
                     "dice": [dice_score(mask, item["mask"]) for mask in masks]})
    return rows


def pick(rows: list[dict], gains: int) -> list[dict]:
    order = sorted(rows, key=lambda r: r["dice"][1] - r["dice"][0])
    return order[::-1][:gains] + order[:1]


def tile(row: dict, k: int) -> Image.Image:
    picture = overlay_image(row["item"]["image"], row["item"]["mask"], row["masks"][k], row["prompt"])
    picture.thumbnail((TILE, TILE))
    canvas = Image.new("RGB", (TILE, TILE))
    canvas.paste(picture, ((TILE - picture.width) // 2, (TILE - picture.height) // 2))
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="default")
    parser.add_argument("--after", required=True)
    parser.add_argument("--datasets", nargs="+", default=["carotid", "busi", "usgra_nerve", "tg3k"])
    parser.add_argument("--gains", type=int, default=2, help="images with the largest gain per dataset")
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default="docs/images/hard-cases.png")
    args = parser.parse_args()
    methods = [make_method(args.before), make_method(args.after)]
    chosen = []
    for dataset in load_datasets([Path(args.data_root) / d for d in args.datasets], "test", None):
        chosen += pick(scored(methods, dataset, 20.0), args.gains)
    label_width = 260
    sheet = Image.new("RGB", (label_width + 2 * TILE, TILE * len(chosen)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(chosen):
        item = row["item"]
        draw.text((8, i * TILE + 8), f"{item['dataset']}/{item['stem']}\nDice before {100 * row['dice'][0]:.1f}\n"
                                     f"Dice after  {100 * row['dice'][1]:.1f}", fill="black")
        for k in (0, 1):
            sheet.paste(tile(row, k), (label_width + k * TILE, i * TILE))
    draw.text((label_width + 8, 4), f"before: {args.before}", fill="yellow")
    draw.text((label_width + TILE + 8, 4), f"after: {args.after}", fill="yellow")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}: {len(chosen)} cases")


if __name__ == "__main__":
    main()
