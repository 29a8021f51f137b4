"""Where do the unsupervised regions put an object's boundary, against the outline a person drew?

    python benchmarks/probe_region_offset.py --offsets 0 1 1.5 2 2.5 --images 200

For labelled images of a split (a seeded random subset of `--images` per set), the region of any level
of the image's cached label maps (uniultra.data.regions, as `targets: regions` training reads them)
with the best IoU with the labelled object (IoU >= 0.5 at map size, else the image is skipped), then
the Dice of the label with that region grown by each offset (pixels of the 256 px label map, negative
shrinks; the same growth as `zoom.region_grow`). A best offset above 0 means the regions sit inside
the human outlines, and a model that learns boundaries from them draws masks too small. The `best
pooled` entries give the offset of the highest Dice summed over all sets but one, the choice a
leave-one-dataset-out fold of that set may make without looking at it.
Writes benchmarks/results/probe-region-offset-<split>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.data.image_io import resize_mask
from uniultra.data.regions import grow_region, load_dataset_regions
from uniultra.evaluation.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
# Each labelled set and the region cache its `targets: regions` entry trains on (the usgra sets share images).
REGION_KEYS = {"busi": "busi_regions-busi", "ddti": "ddti_regions-ddti", "tg3k": "tg3k_regions-tg3k",
               "carotid": "carotid_regions-carotid", "usgra_nerve": "usgra_regions-usgra_nerve",
               "usgra_vessel": "usgra_regions-usgra_nerve"}
MIN_IOU = 0.5


def best_region(maps: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The region of any level with the highest IoU with `mask` (both at map size), if IoU >= MIN_IOU."""
    best, best_iou = None, MIN_IOU
    for level in maps:
        for label in np.unique(level[mask]):
            region = level == label
            if label == 0:
                continue
            iou = (region & mask).sum() / (region | mask).sum()
            if iou >= best_iou:
                best, best_iou = region, iou
    return best


def offset_dice(maps: np.ndarray, mask: np.ndarray, offsets: list[float]) -> list[float] | None:
    """Dice of `mask` (native size) with its best region grown by each offset (map pixels)."""
    region = best_region(maps, resize_mask(mask, maps.shape[1:]))
    if region is None:
        return None
    region = resize_mask(region, mask.shape)
    scale = max(mask.shape) / max(maps.shape[1:])
    dice = []
    for offset in offsets:
        grown = grow_region(region, offset * scale)
        dice.append(2 * (grown & mask).sum() / (grown.sum() + mask.sum()))
    return dice


def probe_set(data_root: Path, name: str, cache_dir: Path, split: str, images: int, offsets: list[float]) -> dict:
    dataset = SegmentationDataset(data_root / name, split=None if split == "all" else split)
    cache = load_dataset_regions(cache_dir, REGION_KEYS[name])
    rng = np.random.default_rng(0)
    picked = rng.choice(len(dataset.samples), size=min(images, len(dataset.samples)), replace=False)
    rows = []
    for index in picked:
        sample = dataset.samples[index]
        mask = load_sample(sample)["mask"]
        if mask.any() and sample.stem in cache:
            row = offset_dice(cache[sample.stem], mask, offsets)
            if row is not None:
                rows.append(row)
    dice = 100 * np.array(rows).mean(axis=0)
    return {"images": len(rows), "dice": {f"{o:g}": round(float(d), 2) for o, d in zip(offsets, dice, strict=True)},
            "best_offset": offsets[int(np.argmax(dice))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(REGION_KEYS))
    parser.add_argument("--split", default="train", help="a split name, or all")
    parser.add_argument("--images", type=int, default=200, help="labelled images per set (seeded subset)")
    parser.add_argument("--offsets", type=float, nargs="+", default=[-1.0, 0.0, 1.0, 1.5, 2.0, 2.5])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--cache-dir", default="runs/cache/regions", help="zoom.regions_dir of the recipe")
    args = parser.parse_args()
    sets = {}
    for name in args.datasets:
        sets[name] = probe_set(Path(args.data_root), name, Path(args.cache_dir), args.split, args.images, args.offsets)
        print(name, sets[name], flush=True)
    pooled = {}
    for left_out in [None, *sets]:
        totals = [sum(s["dice"][f"{o:g}"] for n, s in sets.items() if n != left_out) for o in args.offsets]
        pooled["all sets" if left_out is None else f"without {left_out}"] = args.offsets[int(np.argmax(totals))]
    print("best pooled offset:", pooled)
    document = {"benchmark": f"probe-region-offset-{args.split}", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(), "split": args.split, "min_iou": MIN_IOU, "sets": sets,
                "best_pooled": pooled}
    atomic_write_text(ROOT / "benchmarks" / "results" / f"probe-region-offset-{args.split}.json",
                      json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
