"""Evaluate a segmentation method on one or more dataset folders with a fixed prompt protocol.

Every method sees the same prompts: they come from the ground truth, the seed and the image
stem only (see uniultra.data.prompts). Predictions are compared with the truth at the image's
native resolution; `size` is only the model's input size.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from uniultra.data.dataset import SegmentationDataset, load_sample
from uniultra.data.prompts import Prompt, make_prompt
from uniultra.evaluation.metrics import ImageMetrics, image_metrics, summarize, summarize_images
from uniultra.segment.objects import segment_objects, union_of_object_masks, widen_degenerate_boxes

__all__ = ["ModelMethod", "evaluate", "make_method", "union_of_object_masks", "widen_degenerate_boxes"]

BASELINE_PREFIX = "baseline:"
# An exported model directory (`uniultra export onnx`), run on onnxruntime, fp32 or INT8 encoder.
ONNX_PREFIX, ONNX_INT8_PREFIX = "onnx:", "onnx-int8:"
BOX_MODES = ("box", "box+point")


class Method(Protocol):
    """Anything that turns (image, prompt) into one HxW bool mask at the image's resolution."""

    name: str

    def predict(self, image: np.ndarray, prompt: Prompt) -> np.ndarray: ...


@dataclass
class BaselineMethod:
    """`baseline:box` fills each prompt box, `baseline:ellipse` fills the inscribed ellipse."""

    kind: str

    @property
    def name(self) -> str:
        return f"{BASELINE_PREFIX}{self.kind}"

    def predict(self, image: np.ndarray, prompt: Prompt) -> np.ndarray:
        from uniultra.evaluation.baselines import baseline_predict

        return baseline_predict(self.kind, prompt.boxes, image.shape[:2])


@dataclass
class ModelMethod:
    """A SAM2-style model behind `uniultra.predictor.Predictor` (set_image once, then predict)."""

    spec: str
    predictor: object
    postprocess: bool = False  # per object: clip to its box + margin, largest component, holes filled

    @property
    def name(self) -> str:
        return f"{self.spec} +pp" if self.postprocess else self.spec

    def predict(self, image: np.ndarray, prompt: Prompt) -> np.ndarray:
        return segment_objects(self.predictor, image, prompt, self.postprocess)


def make_method(spec: str, image_size: int | None = None, device: str = "cpu", postprocess: bool = False) -> Method:
    """`baseline:box`, `baseline:ellipse`, `default`, a checkpoint path, `onnx:DIR` or `onnx-int8:DIR`."""
    if spec.startswith(BASELINE_PREFIX):
        from uniultra.evaluation.baselines import BASELINES

        kind = spec[len(BASELINE_PREFIX):]
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {spec!r}; choose from "
                             + ", ".join(BASELINE_PREFIX + b for b in BASELINES))
        return BaselineMethod(kind)
    for prefix, int8 in ((ONNX_PREFIX, False), (ONNX_INT8_PREFIX, True)):
        if spec.startswith(prefix):
            from uniultra.export.onnx_predictor import OnnxPredictor

            return ModelMethod(spec, OnnxPredictor(spec[len(prefix):], int8=int8), postprocess)
    # Imported here: the model code is heavy and evaluating a baseline must not need it.
    from uniultra.models.checkpoint import load_model
    from uniultra.predictor import Predictor

    return ModelMethod(spec, Predictor(load_model(spec, image_size=image_size, device=device)), postprocess)


def check_method_prompt(method: Method, prompt_mode: str) -> None:
    if isinstance(method, BaselineMethod) and prompt_mode not in BOX_MODES:
        raise ValueError(f"{method.name} needs box prompts (--prompt box or box+point), not {prompt_mode!r}")


# --- the evaluation loop -------------------------------------------------------------------

@dataclass
class DatasetResult:
    name: str
    root: str
    split: str | None
    rows: list[dict] = field(default_factory=list)
    metrics: list[ImageMetrics] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        summary = summarize_images(self.metrics)
        summary["n_skipped"] = len(self.skipped)
        summary["n_objects"] = sum(row["n_objects"] for row in self.rows)
        summary["predict_seconds"] = summarize([row["predict_seconds"] for row in self.rows])
        summary["seconds"] = self.seconds
        return summary


def evaluate_dataset(
    method: Method,
    dataset: SegmentationDataset,
    *,
    prompt_mode: str,
    jitter: float,
    seed: int,
    on_image: Callable[[dict, Prompt, np.ndarray], None] | None = None,
    progress: bool = True,
) -> DatasetResult:
    """Predict and score every image of one dataset; images without an object are skipped
    (and listed) in prompted modes, never silently dropped."""
    result = DatasetResult(dataset.name, str(dataset.root), dataset.split)
    start = time.perf_counter()
    for sample in _progress(dataset.samples, progress, dataset.name):
        item = load_sample(sample)
        prompt = make_prompt(item["mask"], prompt_mode, stem=sample.stem, seed=seed, jitter=jitter)
        if prompt is None:
            result.skipped.append({"stem": sample.stem, "reason": "empty mask: no object to prompt"})
            continue
        predict_start = time.perf_counter()
        prediction = method.predict(item["image"], prompt)
        predict_seconds = time.perf_counter() - predict_start
        metrics = _score(item, prediction)
        result.metrics.append(metrics)
        height, width = prediction.shape
        result.rows.append({"stem": sample.stem, "height": height, "width": width,
                            "n_objects": prompt.n_objects, **metrics.as_dict(),
                            "predict_seconds": predict_seconds})
        if on_image is not None:
            on_image(item, prompt, prediction)
    result.seconds = time.perf_counter() - start
    return result


def evaluate(
    method: Method,
    datasets: Sequence[SegmentationDataset],
    *,
    prompt_mode: str,
    jitter: float,
    seed: int,
    on_image: Callable[[dict, Prompt, np.ndarray], None] | None = None,
    progress: bool = True,
) -> list[DatasetResult]:
    check_method_prompt(method, prompt_mode)
    return [
        evaluate_dataset(method, dataset, prompt_mode=prompt_mode, jitter=jitter, seed=seed,
                         on_image=on_image, progress=progress)
        for dataset in datasets
    ]


def _score(item: dict, prediction: np.ndarray) -> ImageMetrics:
    if prediction.shape != item["mask"].shape:
        raise ValueError(f"{item['dataset']}/{item['stem']}: prediction {prediction.shape} "
                         f"does not match the truth {item['mask'].shape}")
    return image_metrics(prediction, item["mask"])


def _progress(samples: list, enabled: bool, name: str):
    if not enabled:
        return samples
    from tqdm import tqdm

    return tqdm(samples, desc=f"evaluate {name}", unit="img", leave=False)


def load_datasets(dirs: Sequence[str | Path], split: str | None, splits_files: Sequence[str] | None) -> list:
    """One SegmentationDataset per folder; `--splits` files pair with `--data` folders in order."""
    files = list(splits_files or [])
    if files and len(files) != len(dirs):
        raise ValueError(f"give one --splits file per --data folder ({len(dirs)} folders, {len(files)} files")
    per_dir = files or [None] * len(dirs)
    return [SegmentationDataset(d, split=split, splits_file=f) for d, f in zip(dirs, per_dir, strict=True)]
