"""Grid-locked lattice ("pin-holes") in a model's box-prompted low-resolution logits.

    python benchmarks/probe_lattice.py --model default --data ../shared/data --n 40

Images: the test split of each dataset (`--datasets`, default busi and carotid), those with a
non-empty mask, evenly spaced, `--n` in all; one box per image, the bounding box of the largest
8-connected component of the truth (no jitter unless `--jitter`). The model's predictor gives the
(S/4 x S/4) low-res logits; the mask is those logits bilinearly resized to the image, > 0.

Metrics of the low-res logits, per dataset and over all images:
- R2, R4: spectral peak ratio at lattice periods 2 and 4 cells: power in the 3x3 bins around every
  frequency whose lattice period is exactly 2 (or 4) cells, over 9x the median power of the ring
  2-4 bins around it (mean removed, 2-D Hann window; geometric mean over bins and images).
  About 1 without a lattice; >> 1 with one.
- rms2, rms4: RMS in logit units of the exact period-2 / period-4 Fourier components (no window):
  how far the lattice moves a logit, to compare with the 0 threshold.
- holes1: single-pixel holes of the low-res mask (background cells whose 4 neighbours are all
  foreground) per image; specks1: the same for isolated foreground cells; holesN: enclosed
  background components of the native-size mask per image.
- Dice of the native-size mask with the full truth mask.

Stages (`--no-stages` to skip): the same peak ratios, at each tensor's own resolution and averaged
over its channels (each channel's spectrum normalised), of the decoder's intermediate tensors,
caught by forward hooks: image embedding, first ConvTranspose output (period 2 there = 4 logit
cells), high-res features conv_s1 / conv_s0, second ConvTranspose output, the upscaled embedding
the hypernetwork dot product reads, and the logits. A stage whose R jumps is where the lattice
enters.

`--blur deconv2|both` adds a fixed [1, 2, 1]/4 separable blur (replicate padding) to the output
of the second (or both) ConvTranspose2d through forward hooks, before the skip features are
added: the parameter-free fix, measured on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PERIODS = (2, 4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="default, a checkpoint path or preset:NAME")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder of the datasets")
    parser.add_argument("--datasets", default="busi,carotid", help="comma-separated dataset folder names")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=40, help="images in all, shared evenly between datasets")
    parser.add_argument("--jitter", type=float, default=0.0, help="box jitter J (px at 1024 scale), seed 0")
    parser.add_argument("--blur", choices=("none", "deconv2", "both"), default="none")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    return parser.parse_args()


# --- metrics ------------------------------------------------------------------------------------

def lattice_bins(n: int, period: int) -> list[tuple[int, int]]:
    """Bins (ky, kx) of an n x n spectrum whose lattice period is exactly `period` cells: the
    smallest p with ky and kx both multiples of n / p (period 2: the three Nyquist bins)."""

    def period_of(k: int) -> int | None:
        p = 1
        while p <= n:
            if n % p == 0 and k % (n // p) == 0:
                return p
            p *= 2
        return None

    bins = []
    for ky in range(n):
        for kx in range(n):
            a, b = period_of(ky), period_of(kx)
            if (ky, kx) != (0, 0) and a is not None and b is not None and max(a, b) == period:
                bins.append((ky, kx))
    return bins


def power_spectrum(maps: np.ndarray) -> np.ndarray:
    """(..., n, n) -> (n, n) mean of the per-map normalised power spectra (mean removed, Hann window)."""
    x = np.asarray(maps, dtype=np.float64).reshape(-1, *np.shape(maps)[-2:])
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    window = np.outer(np.hanning(x.shape[-2]), np.hanning(x.shape[-1]))
    power = np.abs(np.fft.fft2(x * window)) ** 2
    power /= np.maximum(power.sum(axis=(-2, -1), keepdims=True), 1e-30)
    return power.mean(axis=0)


def peak_ratio(power: np.ndarray, bins: list[tuple[int, int]]) -> float:
    """Geometric mean over `bins` of (3x3 power around the bin) / (9 x median of the ring 2-4 bins away)."""
    n = power.shape[0]
    ratios = []
    for ky, kx in bins:
        near = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
        peak = sum(power[(ky + dy) % n, (kx + dx) % n] for dy, dx in near if max(abs(dy), abs(dx)) <= 1)
        ring = [power[(ky + dy) % n, (kx + dx) % n] for dy, dx in near if max(abs(dy), abs(dx)) >= 2]
        ratios.append(peak / (9 * np.median(ring) + 1e-30))
    return float(np.exp(np.mean(np.log(ratios))))


def peak_ratios(maps: np.ndarray) -> dict[str, float]:
    power = power_spectrum(maps)
    n = power.shape[0]
    return {f"R{p}": peak_ratio(power, lattice_bins(n, p)) for p in PERIODS if n % p == 0 and n >= 2 * p}


def lattice_rms(logits: np.ndarray) -> dict[str, float]:
    """RMS (logit units) of the exact period-2 and period-4 Fourier components."""
    n = logits.shape[-1]
    f = np.fft.fft2(logits - logits.mean())
    return {f"rms{p}": float(np.sqrt(sum(abs(f[b]) ** 2 for b in lattice_bins(n, p))) / n**2) for p in PERIODS}


def isolated_cells(fg: np.ndarray) -> tuple[int, int]:
    """(background cells with 4 foreground neighbours, foreground cells with 4 background neighbours)."""
    pad = np.pad(fg, 1, mode="edge")
    neighbours = [pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
    all_fg = np.logical_and.reduce(neighbours)
    all_bg = ~np.logical_or.reduce(neighbours)
    return int((~fg & all_fg).sum()), int((fg & all_bg).sum())


def enclosed_holes(fg: np.ndarray) -> int:
    from scipy import ndimage

    holes = ndimage.binary_fill_holes(fg) & ~fg
    return int(ndimage.label(holes)[1])


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2.0 * (pred & truth).sum() / total)


# --- data ---------------------------------------------------------------------------------------

def pick_images(data_root: Path, datasets: list[str], split: str, n: int, jitter: float) -> list[dict]:
    """Evenly spaced images with an object from each dataset's split, each with its box."""
    from scipy import ndimage

    from uniultra.data.dataset import SegmentationDataset, load_sample
    from uniultra.data.prompts import jitter_boxes, label_components, prompt_rng

    per_set = [n // len(datasets) + (i < n % len(datasets)) for i in range(len(datasets))]
    picked = []
    for name, count in zip(datasets, per_set, strict=True):
        dataset = SegmentationDataset(data_root / name, split=split)
        samples = [load_sample(s) for s in dataset.samples]
        samples = [s for s in samples if s["mask"].any()]
        if not samples:
            raise SystemExit(f"{data_root / name} ({split}): no image with an object")
        chosen = np.linspace(0, len(samples) - 1, num=min(count, len(samples))).round().astype(int)
        for index in dict.fromkeys(chosen.tolist()):
            sample = samples[index]
            mask = sample["mask"]
            labels, count_objects = label_components(mask)
            sizes = ndimage.sum(mask, labels, index=range(1, count_objects + 1))
            rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
            box = np.array([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=np.float64)
            if jitter > 0:
                box = jitter_boxes(box, mask.shape, jitter, prompt_rng(0, sample["stem"], "box"))
            picked.append({"dataset": name, "stem": sample["stem"], "image": sample["image"], "mask": mask,
                           "box": box[0]})
    return picked


# --- the probe ----------------------------------------------------------------------------------

def add_blur(model, which: str) -> list:
    """Forward hooks that blur ConvTranspose outputs with a fixed [1, 2, 1]/4 kernel."""
    import torch
    import torch.nn.functional as F

    def blur(_module, _args, out):
        c = out.shape[1]
        k = torch.tensor([1.0, 2.0, 1.0], dtype=out.dtype, device=out.device) / 4
        x = F.pad(out, (1, 1, 1, 1), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c)
        return F.conv2d(x, k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c)

    up = model.sam_mask_decoder.output_upscaling
    targets = {"none": [], "deconv2": [up[3]], "both": [up[0], up[3]]}[which]
    return [m.register_forward_hook(blur) for m in targets]


def stage_hooks(model, store: dict) -> list:
    dec = model.sam_mask_decoder
    up = dec.output_upscaling
    named = [("deconv1 out (2x embed grid)", up[0]), ("deconv2 out", up[3]), ("upscaled embedding (dot input)", up[4])]
    if dec.use_high_res_features:
        named += [("feat_s1 = conv_s1 (2x grid)", dec.conv_s1), ("feat_s0 = conv_s0", dec.conv_s0)]

    def hook(name):
        def record(_module, _args, out):
            store[name] = out.detach().float().cpu().numpy()[0]
        return record

    return [m.register_forward_hook(hook(name)) for name, m in named]


def _model_api():
    """(load_model, Predictor) from `uniultra.inference` or, in older trees, their previous homes."""
    import importlib

    homes = (("uniultra.inference.loading", "uniultra.inference.predictor"),
             ("uniultra.models.checkpoint", "uniultra.predictor"))
    for loading, predictor in homes:
        try:
            return importlib.import_module(loading).load_model, importlib.import_module(predictor).Predictor
        except (ImportError, AttributeError):
            continue
    raise SystemExit("cannot find uniultra's load_model / Predictor")


def probe_image(model, predictor, item: dict, stages: dict[str, list[dict[str, float]]] | None) -> dict:
    """One image's row of metrics; with `stages`, the peak ratios of each decoder stage are added there."""
    import torch

    store: dict[str, np.ndarray] = {}
    hooks = [] if stages is None else stage_hooks(model, store)
    predictor.set_image(item["image"])
    _, _, low = predictor.predict(box=item["box"], return_logits=True)
    for h in hooks:
        h.remove()
    logits = low[0].astype(np.float64)
    if stages is not None:
        store = {"image embedding (stride 16)": predictor._features.image_embed[0].float().numpy(), **store,
                 "logits": logits}
        for name, tensor in store.items():
            stages.setdefault(f"{name} [{tensor.shape[-1]}x{tensor.shape[-2]}]", []).append(peak_ratios(tensor))
    native = torch.nn.functional.interpolate(torch.from_numpy(logits)[None, None].float(),
                                             size=item["mask"].shape, mode="bilinear", align_corners=False)
    pred = native[0, 0].numpy() > 0
    holes1, specks1 = isolated_cells(logits > 0)
    return {"dataset": item["dataset"], "stem": item["stem"], **peak_ratios(logits), **lattice_rms(logits),
            "holes1": holes1, "specks1": specks1, "holesN": enclosed_holes(pred), "dice": dice(pred, item["mask"])}


def summary(selected: list[dict]) -> dict[str, float]:
    out = {"n": len(selected)}
    for key in ("R2", "R4"):
        out[key] = float(np.exp(np.mean(np.log([r[key] for r in selected]))))
    for key in ("rms2", "rms4", "holes1", "specks1", "holesN", "dice"):
        out[key] = float(np.mean([r[key] for r in selected]))
    return out


def print_table(table: dict[str, dict[str, float]]) -> None:
    print(f"{'set':10s}{'n':>4s}{'R2':>8s}{'R4':>8s}{'rms2':>8s}{'rms4':>8s}{'holes1':>8s}{'specks1':>8s}"
          f"{'holesN':>8s}{'Dice':>8s}")
    for name, s in table.items():
        print(f"{name:10s}{s['n']:4d}{s['R2']:8.2f}{s['R4']:8.2f}{s['rms2']:8.3f}{s['rms4']:8.3f}{s['holes1']:8.2f}"
              f"{s['specks1']:8.2f}{s['holesN']:8.2f}{100 * s['dice']:8.2f}")


def stage_summary(stages: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each stage's peak ratios, geometric mean over the images."""
    return {name: {k: float(np.exp(np.mean(np.log([v[k] for v in values if k in v])))) for k in values[0]}
            for name, values in stages.items()}


def print_stages(stage_table: dict[str, dict[str, float]]) -> None:
    if not stage_table:
        return
    print("\nstage (own grid; period-2 on the 2x grid = period 4 in logit cells)      R2      R4")
    for name, ratios in stage_table.items():
        print(f"  {name:68s}" + "".join(f"{ratios.get(k, float('nan')):8.2f}" for k in ("R2", "R4")))


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    load_model, Predictor = _model_api()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    handles = add_blur(model, args.blur)
    predictor = Predictor(model, autocast=False)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    items = pick_images(Path(args.data), datasets, args.split, args.n, args.jitter)

    stages: dict[str, list[dict[str, float]]] = {}
    rows = [probe_image(model, predictor, item, None if args.no_stages else stages) for item in items]
    for h in handles:
        h.remove()

    groups = {d: [r for r in rows if r["dataset"] == d] for d in datasets}
    groups["all"] = rows
    table = {name: summary(sel) for name, sel in groups.items() if sel}
    print(f"model {args.model}, blur {args.blur}, split {args.split}, box = largest component"
          + (f" (jitter {args.jitter:g})" if args.jitter else "") + f", {len(rows)} images")
    print_table(table)
    stage_table = stage_summary(stages)
    print_stages(stage_table)
    print(f"\n{time.perf_counter() - start:.1f} s")
    if args.json:
        document = {"model": args.model, "blur": args.blur, "split": args.split, "jitter": args.jitter,
                    "summary": table, "stages": stage_table, "images": rows}
        Path(args.json).write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main()
