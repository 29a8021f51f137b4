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
from uniultra.inference.objects import segment_objects

BASELINE_PREFIX = "baseline:"
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
    """A SAM2-style model behind `uniultra.inference.predictor.Predictor` (set_image once, then predict).

    With a modality controller each dataset is encoded under the modality of its folder name
    (the shared network when the controller does not know it), unless `modality` fixes one."""

    spec: str
    predictor: object
    postprocess: bool = False  # per object: clip to its box + margin, largest component, holes filled
    modality: str | None = None

    def __post_init__(self) -> None:
        if self.modality is not None:
            self.modality_for("")  # an unknown --modality fails now, before any dataset is read

    @property
    def name(self) -> str:
        return f"{self.spec} +pp" if self.postprocess else self.spec

    def predict(self, image: np.ndarray, prompt: Prompt) -> np.ndarray:
        return segment_objects(self.predictor, image, prompt, self.postprocess)

    def selects_modality(self, prompt_mode: str) -> bool:
        """Whether the modality changes this method's predictions in `prompt_mode`."""
        selects = getattr(self.predictor, "selects_modality", None)
        return selects is not None and selects(prompt_mode == "none", tap=prompt_mode == "point")

    def modality_for(self, dataset: str, required: bool = True) -> str | None:
        """`required` False (taps): a dataset no channel is named after runs without one."""
        from uniultra.inference.auto_predictor import choose_modality

        try:
            return choose_modality(self.predictor, self.modality, dataset, required=required)
        except ValueError as exc:
            raise ValueError(f"{self.spec}: {exc}") from exc


@dataclass
class AutoMethod(ModelMethod):
    """An automatic-mode checkpoint (`uniultra.inference.auto_predictor.AutoPredictor`). With prompt `none`
    each dataset decodes through the channel of its folder name, unless `modality` fixes one;
    prompted modes use the box-promptable base model the checkpoint keeps."""


def make_method(spec: str, image_size: int | None = None, device: str = "cpu", postprocess: bool = False,
                modality: str | None = None) -> Method:
    """`baseline:box`, `baseline:ellipse`, `default`, a checkpoint path (`torch-bf16:PATH`: encoder in bf16),
    or an export run by onnxruntime or OpenVINO: `onnx:DIR`, `openvino:DIR`, ... (loading.EXPORT_PREFIXES).

    `modality` fixes the decoding channel of an automatic-mode checkpoint (see `AutoMethod`), or
    the modality of a model with a modality controller (see `ModelMethod`).
    """
    if spec.startswith(BASELINE_PREFIX):
        from uniultra.evaluation.baselines import BASELINES

        kind = spec[len(BASELINE_PREFIX):]
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {spec!r}; choose from "
                             + ", ".join(BASELINE_PREFIX + b for b in BASELINES))
        return BaselineMethod(kind)
    # Imported here: the model code is heavy and evaluating a baseline must not need it.
    from uniultra.inference.auto_predictor import check_modality_option, has_auto_head
    from uniultra.inference.loading import EXPORT_PREFIXES, load_predictor

    predictor = load_predictor(spec, image_size=image_size, device=device)
    if spec.startswith(EXPORT_PREFIXES):
        return ModelMethod(spec, predictor, postprocess)
    # Whatever the prompt mode: refused only where no mode could use it (check_method_prompt knows the mode).
    check_modality_option(predictor, spec, modality, automatic=True)
    kind = AutoMethod if has_auto_head(predictor) else ModelMethod
    return kind(spec, predictor, postprocess, modality)


def check_method_prompt(method: Method, prompt_mode: str) -> None:
    if isinstance(method, BaselineMethod) and prompt_mode not in BOX_MODES:
        raise ValueError(f"{method.name} needs box prompts (--prompt box or box+point), not {prompt_mode!r}")
    if prompt_mode == "none" and not hasattr(getattr(method, "predictor", None), "predict_without_prompt"):
        raise ValueError(f"{method.name} cannot predict without a prompt (ONNX exports take box / point "
                         "prompts only); evaluate the PyTorch checkpoint with --prompt none instead")
    if isinstance(method, ModelMethod):
        from uniultra.inference.auto_predictor import check_modality_option

        check_modality_option(method.predictor, method.spec, method.modality, prompt_mode == "none",
                              tap=prompt_mode == "point")


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
    modality: str | None = None  # the automatic head's channel or the controller's modality, when one was used
    spacing: tuple[float, float] | None = None  # (row_mm, col_mm): HD and HD95 in mm; None: in pixels

    @property
    def distance_unit(self) -> str:
        return "px" if self.spacing is None else "mm"

    def summary(self) -> dict:
        summary = summarize_images(self.metrics)
        # Without prompts, images with an empty truth are scored too (a correct empty mask = Dice 1):
        # their Dice is shown apart so that easy "nothing here" images cannot hide poor lesion masks.
        summary["dice_truth_nonempty"] = summarize([m.dice for m in self.metrics if not m.empty_truth])
        summary["dice_truth_empty"] = summarize([m.dice for m in self.metrics if m.empty_truth])
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
    spacing: tuple[float, float] | None = None,
) -> DatasetResult:
    """Predict and score every image of one dataset; images without an object are skipped
    (and listed) in prompted modes, never silently dropped, and scored in mode `none`.
    `spacing` (row_mm, col_mm) gives HD and HD95 in mm."""
    result = DatasetResult(dataset.name, str(dataset.root), dataset.split, spacing=spacing)
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
        metrics = _score(item, prediction, spacing)
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
    spacing: tuple[float, float] | None = None,
) -> list[DatasetResult]:
    check_method_prompt(method, prompt_mode)
    modalities = _modalities(method, datasets, prompt_mode)  # all checked before the first prediction
    results = []
    selects = _selects_modality(method, prompt_mode)
    for dataset, modality in zip(datasets, modalities, strict=True):
        if selects:  # None too: a dataset the controller does not know runs the shared network
            method.predictor.modality = modality
        result = evaluate_dataset(method, dataset, prompt_mode=prompt_mode, jitter=jitter, seed=seed,
                                  on_image=on_image, progress=progress, spacing=spacing)
        result.modality = modality
        results.append(result)
    return results


def _modalities(method: Method, datasets: Sequence[SegmentationDataset], prompt_mode: str) -> list[str | None]:
    """The modality per dataset: the automatic head's channel, or the controller's modality (None:
    neither in use, one shared channel, or the controller's shared network)."""
    if _selects_modality(method, prompt_mode):
        return [method.modality_for(dataset.name, required=prompt_mode != "point") for dataset in datasets]
    return [None] * len(datasets)


def _selects_modality(method: Method, prompt_mode: str) -> bool:
    return isinstance(method, ModelMethod) and method.selects_modality(prompt_mode)


def _score(item: dict, prediction: np.ndarray, spacing: tuple[float, float] | None = None) -> ImageMetrics:
    if prediction.shape != item["mask"].shape:
        raise ValueError(f"{item['dataset']}/{item['stem']}: prediction {prediction.shape} "
                         f"does not match the truth {item['mask'].shape}")
    return image_metrics(prediction, item["mask"], spacing)


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
