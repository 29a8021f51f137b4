"""How well each encoder's whole-image features tell an empty scan from one with a target, measured on
every image of a set by repeated cross-validation instead of on a test split's few normal scans.

    python benchmarks/probe_presence_cv.py --models default runs/ph9-default.safetensors \
        runs/previous-default.safetensors --name busi-encoders

The presence probe of automatic mode (uniultra.models.presence_probe) is a class-balanced logistic
regression on pooled encoder statistics. BUSI's test split holds 14 normal scans, so its ROC AUC moves by
several points between encoders by chance. Here all images of the set (train + val + test: 133 normal
scans) are encoded once per model, and the probe is fitted and scored in stratified K-fold
cross-validation (the cross-fitting of `uniultra auto calibrate`), repeated with several seeds, at each
regularisation strength: the mean out-of-fold AUC
compares encoders, not splits. Also, as the shipped probe is fitted (train split, strength chosen on val):
its val and test AUC. Writes benchmarks/results/probe-presence-cv-<name>.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from box_rows import save_result

from uniultra.auto.presence_fit import C_GRID, logistic_regression, out_of_fold_logits, roc_auc
from uniultra.data.dataset import SegmentationDataset
from uniultra.engine.data import build_cached_set
from uniultra.inference.loading import load_model
from uniultra.models.presence_probe import pooled_statistics

ROOT = Path(__file__).resolve().parent.parent


SPLITS = ("train", "val", "test")


def set_images(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every image of the set at model resolution (as the automatic head's cache holds them), whether its
    mask has a target, and its split's name."""
    sets = [build_cached_set(root.name, SegmentationDataset(root, split=split), size) for split in SPLITS]
    images = np.concatenate([np.asarray(s.images, np.float32) for s in sets])
    present = np.concatenate([np.asarray(s.masks).reshape(len(s), -1).any(axis=1) for s in sets])
    return images, present, np.concatenate([[split] * len(s) for split, s in zip(SPLITS, sets, strict=True)])


def split_auc(x: torch.Tensor, present: np.ndarray, split: np.ndarray) -> dict[str, float]:
    """As the shipped probe is fitted: on the train split, its strength chosen by val AUC; AUC on val and test."""
    part = {name: torch.from_numpy(split == name) for name in SPLITS}
    train = x[part["train"]]
    centre, scale = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    z = {name: (x[mask] - centre) / scale for name, mask in part.items()}
    y = {name: present[split == name] for name in SPLITS}
    fits = {c: logistic_regression(z["train"], torch.from_numpy(y["train"]).float(), c) for c in C_GRID}
    auc = {c: {name: roc_auc((z[name] @ w + b).numpy(), y[name]) for name in ("val", "test")}
           for c, (w, b) in fits.items()}
    best = max(C_GRID, key=lambda c: auc[c]["val"])
    return {"C": best, **auc[best]}


@torch.no_grad()
def encoder_statistics(spec: str, images: np.ndarray, batch: int = 16) -> torch.Tensor:
    model = load_model(spec)
    model = (model[0] if isinstance(model, tuple) else model).eval()
    rows = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch])
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        features = model.encode_image(model.normalize(x))
        rows.append(pooled_statistics(features.image_embed, features.high_res_feats))
    return torch.cat(rows)


def cross_validated_auc(x: torch.Tensor, present: np.ndarray, c: float, folds: int, repeats: int) -> list[float]:
    """Out-of-fold ROC AUC of the probe at strength `c`, one per repeat (stratified folds, seed = repeat):
    the cross-fitting `uniultra auto calibrate` uses, on statistics standardised over all images."""
    standardised = (x - x.mean(dim=0)) / x.std(dim=0).clamp_min(1e-6)
    labels = torch.from_numpy(present)
    return [roc_auc(out_of_fold_logits(standardised, labels, c, folds, seed=r).numpy(), present)
            for r in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["default"])
    parser.add_argument("--dataset", default="busi", help="a set with empty masks (busi's normal scans)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--name", default=None)
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    torch.manual_seed(0)
    images, present, split = set_images(Path(args.data_root) / args.dataset, args.size)
    print(f"{args.dataset}: {len(present)} images, {int((~present).sum())} without a target", flush=True)
    results = {}
    for spec in args.models:
        x = encoder_statistics(spec, images)
        per_c = {str(c): cross_validated_auc(x, present, c, args.folds, args.repeats) for c in C_GRID}
        best = max(per_c, key=lambda c: np.mean(per_c[c]))
        fitted = split_auc(x, present, split)
        results[spec] = {"auc_mean": {c: float(np.mean(v)) for c, v in per_c.items()},
                         "auc_std": {c: float(np.std(v)) for c, v in per_c.items()}, "best_c": best,
                         "fitted_on_train": fitted}
        print(f"{spec}: " + "  ".join(f"C={c} {np.mean(v):.3f}" for c, v in per_c.items())
              + f"  (best {np.mean(per_c[best]):.3f} +- {np.std(per_c[best]):.3f} over repeats); fitted on train,"
              f" C={fitted['C']} chosen on val: val {fitted['val']:.3f}, test {fitted['test']:.3f}", flush=True)
    out = save_result(f"probe-presence-cv-{args.name or args.dataset}", {
        "dataset": args.dataset, "n_images": int(len(present)), "n_empty": int((~present).sum()),
        "folds": args.folds, "repeats": args.repeats, "results": results})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
