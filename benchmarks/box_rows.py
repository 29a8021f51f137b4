"""One row of a box-prompt probe: Dice and HD95 per set at one jitter, printed and returned; and the
probe's result file.

Shared by the probes that compare inference variants of a zoomed model under the same boxes
(probe_flip_tta.py, probe_ensemble.py, probe_box_fit.py, probe_zoom_margin.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.evaluation.evaluate import evaluate
from uniultra.evaluation.report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def box_row(method, datasets: list, jitter: float, label: str) -> dict:
    """Evaluate `method` on box prompts (seed 0) loosened by up to `jitter` px at 1024 scale."""
    start = time.perf_counter()
    results = evaluate(method, datasets, prompt_mode="box", jitter=jitter, seed=0, progress=False)
    dice = {r.name: 100 * r.summary()["dice"]["mean"] for r in results}
    hd95 = {r.name: r.summary()["hd95"]["mean"] for r in results}
    mean = float(np.mean(list(dice.values())))
    print(f"{label}: " + ", ".join(f"{k} {v:.2f} / {hd95[k]:.1f}" for k, v in dice.items()) + f"; mean {mean:.2f}",
          flush=True)
    return {"dice": dice, "hd95": hd95, "mean_dice": mean, "seconds": time.perf_counter() - start}


def save_result(stem: str, document: dict) -> Path:
    """Write benchmarks/results/<stem>.json: the probe's name, date and machine, then `document`."""
    out = RESULTS / f"{stem}.json"
    header = {"benchmark": stem, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info()}
    atomic_write_text(out, json.dumps({**header, **document}, indent=1))
    return out
