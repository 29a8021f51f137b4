"""Training step time in fp32 and in bf16 autocast on this CPU, per encoder width: when `cpu_amp: bf16` pays.

One step = encoder + box-prompted decoder on a batch, the engine's segmentation loss, backward and an
Adam step through `uniultra.engine.optimisation.Optimisation` (so the autocast is the trainer's own).
Random weights and images: the arithmetic, not the values, sets the time. Median of repeated steps
after warm-up; every row of one run shares the machine and its load (recorded).

    python benchmarks/bench_train_precision.py --widths 16 24 32 96 --threads 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from bench_box_latency import time_calls

from uniultra.atomic import atomic_write_text
from uniultra.engine.config import LossConfig, OptimConfig
from uniultra.engine.losses import segmentation_loss
from uniultra.engine.optimisation import Optimisation
from uniultra.evaluation.report import machine_info
from uniultra.inference.cpu import cpu_model, has_bf16_units, isa_report
from uniultra.models.config import preset
from uniultra.models.image_model import SAM2ImageModel

ROOT = Path(__file__).resolve().parent.parent


def build(width: int, image_size: int) -> SAM2ImageModel:
    """The mini layout (stages 1, 2, 7, 2) at `width` channels: 16 is the mini, 96 is SAM2's tiny."""
    config = preset("tiny" if width == 96 else "mini", image_size=image_size)
    trunk = dataclasses.replace(config.trunk, embed_dim=width)
    return SAM2ImageModel(dataclasses.replace(config, name=f"c{width}", trunk=trunk))


def step_seconds(model: SAM2ImageModel, cpu_amp: str, batch: int, warmup: int, repeats: int) -> list[float]:
    size = model.config.image_size
    trained = dict(model.named_parameters())
    optimisation = Optimisation(trained, OptimConfig(), "none", torch.device("cpu"), cpu_amp)
    images = torch.rand(batch, 3, size, size)
    boxes = torch.tensor([[[size * 0.25, size * 0.25], [size * 0.7, size * 0.7]]]).repeat(batch, 1, 1)
    labels = torch.tensor([[2, 3]]).repeat(batch, 1)
    target = torch.zeros(batch, size // 4, size // 4)
    target[:, size // 16: size // 6, size // 16: size // 6] = 1

    def once() -> None:
        with optimisation.autocast():
            out = model.decode(model.encode_image(model.normalize(images)), points=(boxes, labels), multimask=False)
        loss, _ = segmentation_loss(out.low_res_logits.float(), out.iou_scores.float(), target, LossConfig())
        optimisation.step(loss.mean(), 0, 0)

    return time_calls(once, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[16, 24, 32, 96])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--name", default="train-precision")
    args = parser.parse_args()
    if not has_bf16_units():
        warnings.warn("this CPU has no bf16 units: the bf16 rows time PyTorch's emulation", stacklevel=1)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for width in args.widths:
            torch.manual_seed(0)
            model = build(width, args.image_size).train()
            times = {amp: statistics.median(step_seconds(model, amp, args.batch, 2, args.repeats))
                     for amp in ("none", "bf16")}
            row = {"width": width, "threads": threads, "encoder_params_M": round(
                sum(p.numel() for p in model.image_encoder.parameters()) / 1e6, 3),
                "fp32_s_per_step": round(times["none"], 4), "bf16_s_per_step": round(times["bf16"], 4),
                "bf16_speedup": round(times["none"] / times["bf16"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = ROOT / "benchmarks" / "results" / f"{args.name}.json"
    doc = {"machine": {**machine_info(), "cpu": cpu_model(), "isa": isa_report()},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_1min": round(os.getloadavg()[0], 2),
           "image_size": args.image_size,
           "batch": args.batch, "repeats": args.repeats, "rows": rows}
    atomic_write_text(out, json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
