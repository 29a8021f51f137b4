"""TinyUSFM-style coreset selection: the K most diverse training images for distillation.

Methods (see docs/data.md, "Coreset selection"):
- `kcenter`: greedy k-center (farthest-point) on teacher image features: the global average- and
  max-pooled image embedding (optionally also the stride-8 features), each block L2-normalised,
  the concatenation L2-normalised again.
- `gradient`: greedy k-center on per-image gradient embeddings (BADGE): the gradient of the
  segmentation loss (uniultra.engine.losses) for the exact box prompt of every object of the mask
  with respect to the last layer (weight and bias) of the single-mask token's hypernetwork MLP.
  The embeddings are NOT normalised: their norm is how wrong the teacher is, which is the point.
  Images with an empty mask are decoded without any prompt against an empty target, so they live
  in the same gradient space (a teacher that hallucinates a lesion gets a large gradient).
- `random`: a seeded uniform sample, the baseline.

With stratification (the default) K is split across the datasets in proportion to their sizes
(largest remainder, ties to the dataset given first) and each dataset is selected on its own.
The seed picks the first centre (per dataset), so the selection is deterministic.

The subset file: '#' comment lines (method, k, seed, teacher and its sha256, split, date, ...),
then one `<dataset_label>/<stem>` per line, per dataset in selection order. Its format lives in
uniultra.data.subset (a training config points at it with `subset:` on a data entry).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.data.subset import METHODS

FEATURE_CACHE_VERSION = 1


# --- selection (pure functions) -----------------------------------------------------------------

def kcenter_greedy(features: np.ndarray, k: int, first: int) -> list[int]:
    """Greedy k-center: start at `first`, then repeatedly take the point farthest (Euclidean) from
    every chosen centre. Ties go to the lowest index; a chosen point is never taken twice, even
    when the rest are duplicates of it."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} points")
    if k == 0:
        return []
    chosen = [int(first)]
    distance = np.linalg.norm(features - features[first], axis=1)
    distance[first] = -np.inf
    while len(chosen) < k:
        nxt = int(np.argmax(distance))
        chosen.append(nxt)
        distance = np.minimum(distance, np.linalg.norm(features - features[nxt], axis=1))
        distance[chosen] = -np.inf
    return chosen


def allocate_quota(sizes: Sequence[int], k: int) -> list[int]:
    """Split `k` across datasets of `sizes` in proportion (largest remainder method, ties to the
    earlier dataset); the quotas sum to `k` and never exceed a dataset's size."""
    total = sum(sizes)
    if not 1 <= k <= total:
        raise ValueError(f"k must be between 1 and the number of images ({total}), got {k}")
    exact = [k * n / total for n in sizes]
    quotas = [int(np.floor(x)) for x in exact]
    # Sorting is stable: equal remainders keep the datasets' order.
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - quotas[i], reverse=True)
    for i in by_remainder[: k - sum(quotas)]:
        quotas[i] += 1
    return quotas


def select_indices(
    method: str,
    sizes: Sequence[int],
    k: int,
    seed: int,
    *,
    stratify: bool = True,
    features: Sequence[np.ndarray] | None = None,
) -> list[list[int]]:
    """Per dataset, the chosen indices in selection order. `features` (one (N_i, D) array per
    dataset) is needed by every method but `random`."""
    if method not in METHODS:
        raise ValueError(f"unknown coreset method {method!r}; choose from {', '.join(METHODS)}")
    if method != "random" and (features is None or len(features) != len(sizes)):
        raise ValueError(f"method {method} needs one feature array per dataset")
    if stratify:
        quotas = allocate_quota(sizes, k)
        return [_select_one(method, n, q, [seed, i], features[i] if features is not None else None)
                for i, (n, q) in enumerate(zip(sizes, quotas, strict=True))]
    allocate_quota(sizes, k)  # the same range check on k
    # An empty split has a (0, 0) feature array, which would not concatenate with the others.
    pooled = np.concatenate([f for f in features if len(f)]) if features is not None else None
    chosen = _select_one(method, sum(sizes), k, [seed, 0], pooled)
    offsets = np.cumsum([0, *sizes])
    return [[int(j - offsets[i]) for j in chosen if offsets[i] <= j < offsets[i + 1]] for i in range(len(sizes))]


def _select_one(method: str, n: int, k: int, key: list[int], features: np.ndarray | None) -> list[int]:
    if k == 0:
        return []
    rng = np.random.default_rng(key)
    if method == "random":
        return [int(i) for i in rng.choice(n, size=k, replace=False)]
    return kcenter_greedy(features, k, first=int(rng.integers(n)))


# --- teacher features ---------------------------------------------------------------------------

def _encoded_batches(model, dataset: SegmentationDataset, batch_size: int, desc: str,
                     progress: bool) -> Iterator[tuple[list[dict], object]]:
    """(loaded samples, ImageFeatures) per batch, preprocessed exactly as the Predictor does."""
    import torch

    from uniultra.inference.predictor import Predictor

    predictor = Predictor(model)
    samples = dataset.samples
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc=desc, unit="img", leave=False)
    for start in range(0, len(samples), batch_size):
        items = [load_sample(s) for s in samples[start:start + batch_size]]
        # Leave no_grad before yielding: grad mode is global and the consumer may need gradients.
        with torch.no_grad():
            features = model.encode_image(torch.cat([predictor.preprocess(it["image"]) for it in items]))
        yield items, features
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()


def embedding_features(model, dataset: SegmentationDataset, *, stride8: bool = False, batch_size: int = 8,
                       progress: bool = False) -> np.ndarray:
    """(N, D) L2-normalised pooled teacher features of every image of `dataset`."""
    import torch
    import torch.nn.functional as F

    if stride8 and not model.sam_mask_decoder.use_high_res_features:
        raise ValueError("--stride8: this teacher has no stride-8 (high-resolution) features")
    rows = []
    for _, features in _encoded_batches(model, dataset, batch_size, f"features {dataset.name}", progress):
        maps = [features.image_embed] + ([features.high_res_feats[1]] if stride8 else [])
        blocks = [F.normalize(pool(m), dim=1) for m in maps for pool in (_avg_pool, _max_pool)]
        rows.append(F.normalize(torch.cat(blocks, dim=1), dim=1).float().cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def _avg_pool(x):
    return x.mean(dim=(2, 3))


def _max_pool(x):
    return x.amax(dim=(2, 3))


def gradient_features(model, dataset: SegmentationDataset, *, seed: int = 0, batch_size: int = 8,
                      progress: bool = False) -> np.ndarray:
    """(N, D) gradient embeddings (BADGE): d loss / d (last hypernetwork layer of mask token 0)."""
    from uniultra.engine.config import LossConfig

    layer = model.sam_mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    model.requires_grad_(False)
    layer.requires_grad_(True)  # the only parameters autograd has to reach
    rows = []
    with _single_mask_token(model):
        for items, features in _encoded_batches(model, dataset, batch_size, f"gradients {dataset.name}", progress):
            rows += [_image_gradient(model, layer, features.select(i), item, seed, LossConfig())
                     for i, item in enumerate(items)]
    return np.stack(rows) if rows else np.zeros((0, 0), dtype=np.float32)


@contextlib.contextmanager
def _single_mask_token(model):
    """Keep the decoder on mask token 0: in eval mode SAM2.1 may swap in a multimask output,
    whose gradient with respect to token 0's hypernetwork would be zero."""
    decoder = model.sam_mask_decoder
    before = decoder.dynamic_multimask_via_stability
    decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        decoder.dynamic_multimask_via_stability = before


def _image_gradient(model, layer, features, item: dict, seed: int, loss_cfg) -> np.ndarray:
    import torch

    from uniultra.engine.losses import segmentation_loss

    boxes, targets = _box_prompts_and_targets(item, model.image_size, seed)
    with torch.enable_grad():
        out = model.decode(features, boxes=boxes)
        loss, _ = segmentation_loss(out.low_res_logits, out.iou_scores, targets, loss_cfg)
        grads = torch.autograd.grad(loss.mean(), [layer.weight, layer.bias])
    return torch.cat([g.flatten() for g in grads]).float().cpu().numpy()


def _box_prompts_and_targets(item: dict, size: int, seed: int):
    """Exact box of every object (model pixels, as the Predictor maps them) and its resized mask;
    an empty mask gives no prompt and one empty target."""
    import torch

    from uniultra.data.image_io import resize_mask
    from uniultra.data.prompts import label_components, make_prompt
    from uniultra.inference.objects import widen_degenerate_boxes

    mask = item["mask"]
    prompt = make_prompt(mask, "box", stem=item["stem"], seed=seed, jitter=0.0)
    if prompt is None:
        return None, torch.zeros(1, size, size)
    h, w = mask.shape
    boxes = widen_degenerate_boxes(prompt.boxes) / np.array([w, h, w, h]) * size
    labels, count = label_components(mask)
    targets = np.stack([resize_mask(labels == i + 1, (size, size)) for i in range(count)])
    return torch.as_tensor(boxes, dtype=torch.float32), torch.from_numpy(targets).float()


def dataset_features(model, dataset: SegmentationDataset, method: str, *, seed: int = 0, stride8: bool = False,
                     batch_size: int = 8, cache_dir: str | Path | None = None, teacher_sha256: str = "",
                     progress: bool = False) -> np.ndarray:
    """Features of `method` for every image of `dataset`, read from / written to `cache_dir` when
    given (keyed by the teacher's sha256, the input size and the files' names, sizes and times)."""
    kind = "gradient" if method == "gradient" else ("embed+s8" if stride8 else "embed")
    path = None
    if cache_dir is not None:
        from uniultra.engine.data import cache_key

        key = hashlib.sha256(json.dumps([FEATURE_CACHE_VERSION, kind, teacher_sha256, model.image_size,
                                         cache_key(dataset, model.image_size)]).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"{dataset.name}-{dataset.split or 'all'}-{kind}-{key}.npy"
        if path.is_file():
            return np.load(path)
    if kind == "gradient":
        features = gradient_features(model, dataset, seed=seed, batch_size=batch_size, progress=progress)
    else:
        features = embedding_features(model, dataset, stride8=stride8, batch_size=batch_size, progress=progress)
    if path is not None:
        from uniultra.engine.data import save_npy

        save_npy(path, features)
    return features
