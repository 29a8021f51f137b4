"""Propagation through cine loops vs a true box on every frame, on tg3k's contiguous frame runs.

tg3k's stems are frames of videos; a run is a maximal sequence of consecutive stem numbers (see
../shared/data/README.md). For every run of at least `--min-run` frames:
- propagate: the true box (bounding box of the truth mask) on the FIRST frame only, then every
  next frame prompted with the previous frame's mask box, enlarged (uniultra.inference.propagation);
- per-frame box: the true box on every frame (an upper bound that needs a prompt per frame).
Each frame is encoded once and both prompts are decoded on it. Writes
benchmarks/results/cine-propagate.json.

    python benchmarks/bench_cine_propagate.py --model default
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.data.image_io import read_image, read_mask
from uniultra.evaluation.metrics import dice_score
from uniultra.evaluation.report import machine_info
from uniultra.inference.loading import load_predictor
from uniultra.inference.propagation import DEFAULT_MARGIN, mask_edges, propagate

ROOT = Path(__file__).resolve().parent.parent


def contiguous_runs(images: Path, min_run: int) -> list[list[str]]:
    stems = sorted(p.stem for p in images.glob("*.png"))
    runs: list[list[str]] = []
    for stem in stems:
        if runs and int(stem) == int(runs[-1][-1]) + 1:
            runs[-1].append(stem)
        else:
            runs.append([stem])
    return [run for run in runs if len(run) >= min_run]


def run_loop(predictor, root: Path, run: list[str]) -> dict:
    frames = [read_image(root / "images" / f"{s}.png") for s in run]
    truths = [read_mask(root / "masks" / f"{s}.png") > 0 for s in run]
    per_frame: dict[int, np.ndarray] = {}

    def true_box_mask(i: int) -> None:  # the predictor holds frame i right now: decode only
        box = mask_edges(truths[i])
        per_frame[i] = np.zeros_like(truths[i]) if box is None else predictor.predict(box=np.asarray(box))[0][0]

    result = propagate(predictor, frames, 0, box=mask_edges(truths[0]), on_frame=true_box_mask)
    return {"stems": run,
            "propagate": [float(dice_score(m, t)) for m, t in zip(result.masks, truths, strict=True)],
            "per_frame_box": [float(dice_score(per_frame[i], t)) for i, t in enumerate(truths)]}


def summary(loops: list[dict], skip_first: bool) -> dict:
    first = 1 if skip_first else 0
    return {key: round(100 * float(np.mean([d for loop in loops for d in loop[key][first:]])), 2)
            for key in ("propagate", "per_frame_box")} | {
        "frames": sum(len(loop["stems"]) - first for loop in loops)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tg3k"))
    parser.add_argument("--min-run", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cine-propagate.json"))
    args = parser.parse_args()
    root = Path(args.data)
    if not (root / "images").is_dir():
        raise SystemExit(f"no tg3k data at {root}: nothing to measure")
    predictor = load_predictor(args.model)
    runs = contiguous_runs(root / "images", args.min_run)
    start = time.perf_counter()
    loops = [run_loop(predictor, root, run) for run in runs]
    report = {
        "what": "mean Dice (%) on tg3k contiguous stem runs: propagation from the true box on the first frame "
                "vs the true box on every frame",
        "model": args.model, "margin": DEFAULT_MARGIN, "min_run": args.min_run, "runs": len(loops),
        "all_frames": summary(loops, skip_first=False),
        "frames_after_the_first": summary(loops, skip_first=True),
        "runs_of_3_or_more_after_the_first": summary([lp for lp in loops if len(lp["stems"]) >= 3], True),
        "seconds": round(time.perf_counter() - start, 1), "machine": machine_info(), "loops": loops,
    }
    atomic_write_text(Path(args.out), json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("runs", "all_frames", "frames_after_the_first",
                                             "runs_of_3_or_more_after_the_first", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
