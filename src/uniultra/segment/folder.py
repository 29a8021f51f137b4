"""Segment one image or a whole folder with box / point prompts, never touching the inputs.

Folder mode takes either a dataset folder (`images/` + `masks/`: boxes come from the masks and Dice
is reported) or a plain folder of images with a JSON file of boxes per stem. In prompt mode `none`
(automatic mode) every image is segmented without prompts, and scored when masks/ exists.
A bad file never stops a folder run: it is reported as a `Failure` and the others go on.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uniultra.atomic import atomic_write_bytes
from uniultra.data.image_io import ImageReadError, read_image, read_mask
from uniultra.data.prompts import Prompt
from uniultra.evaluation.baselines import fill_ellipses
from uniultra.evaluation.metrics import dice_score
from uniultra.evaluation.report import overlay_image
from uniultra.inference.objects import segment_objects
from uniultra.inference.predictor import Predictor
from uniultra.segment.plan import Failure, Job, header_size, plan_folder, relative_name


@dataclass
class SegmentedImage:
    stem: str
    mask_path: Path
    overlay_path: Path
    n_objects: int
    dice: float | None  # None when no ground truth was given
    ellipse_dice: float | None  # the inscribed-ellipse baseline under the same boxes (None without boxes)
    resumed: bool = False  # True when --resume found its outputs from an earlier run


@dataclass
class FolderRun:
    """What a folder run did: the segmented images, the files that failed (with the reason) and
    the images with nothing to segment."""

    results: list[SegmentedImage] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[Failure] = field(default_factory=list)

    def add(self, outcome: SegmentedImage | Failure) -> None:
        (self.failures if isinstance(outcome, Failure) else self.results).append(outcome)


def segment_image(predictor: Predictor, image: np.ndarray, prompt: Prompt, postprocess: bool = False) -> np.ndarray:
    """Union of the per-object masks for the prompt's objects (boxes and/or points)."""
    return segment_objects(predictor, image, prompt, postprocess)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def image_png_bytes(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def refuse_overwriting_inputs(inputs: list[Path], outputs: list[Path]) -> None:
    protected = {p.resolve() for p in inputs}
    clash = [str(p) for p in outputs if p.resolve() in protected]
    if clash:
        raise ValueError(f"refusing to overwrite input files: {clash[:3]}; choose another --output")


def segment_folder(
    predictor: Predictor,
    input_dir: str | Path,
    output_dir: str | Path,
    boxes_file: str | Path | None = None,
    jitter: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    postprocess: bool = False,
    prompt_mode: str = "box",
    resume: bool = False,
) -> FolderRun:
    """Write `<output>/masks/<stem>.png` and `<output>/overlays/<stem>.png` for every image that
    can be segmented; the others are in the run's `failures` (see `uniultra.segment.plan`).

    prompt_mode: `box` (from the masks or `boxes_file`) or `none` (the predictor's answer without prompts).
    """
    plan = plan_folder(input_dir, boxes_file, jitter, seed, prompt_mode)
    run = FolderRun(failures=list(plan.failures), skipped=list(plan.skipped))
    for outcome in run_jobs(predictor, plan.jobs, input_dir, output_dir, postprocess, resume, progress):
        run.add(outcome)
    return run


def output_paths(output_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """(mask, overlay) of one image: named like DATASET/masks/<stem>.png, so the output folder
    pairs with the input images as a dataset."""
    output_dir = Path(output_dir)
    return output_dir / "masks" / f"{stem}.png", output_dir / "overlays" / f"{stem}.png"


def run_jobs(predictor: Predictor, jobs: list[Job], input_dir: str | Path, output_dir: str | Path,
             postprocess: bool = False, resume: bool = False,
             progress: bool = True) -> Iterator[SegmentedImage | Failure]:
    """Segment the jobs one by one, yielding each result or `Failure`: a bad file never stops the
    batch. A Ctrl-C (KeyboardInterrupt) propagates, leaving only complete outputs behind."""
    from tqdm import tqdm

    refuse_overwriting_inputs([job.image_path for job in jobs],
                              [path for job in jobs for path in output_paths(output_dir, job.stem)])
    for job in tqdm(jobs, desc="segment", unit="img", disable=not progress):
        try:
            done = _finished(job, output_dir) if resume else None
            outcome = done if done is not None else segment_job(predictor, job, output_dir, postprocess)
        except Exception as exc:  # noqa: BLE001 - one bad file must not end the batch; it is reported
            outcome = Failure(relative_name(job.image_path, Path(input_dir)), _describe(exc))
        yield outcome


def segment_job(predictor: Predictor, job: Job, output_dir: str | Path, postprocess: bool) -> SegmentedImage:
    """Segment one image and write its mask and overlay (each atomically; on any error or Ctrl-C
    the pair is removed, so an image has both outputs or none)."""
    image = read_image(job.image_path)
    if image.shape[:2] != job.size:
        raise ValueError(f"decoded size {image.shape[1]} x {image.shape[0]} differs from the header's "
                         f"{job.size[1]} x {job.size[0]}")
    mask = segment_image(predictor, image, job.prompt, postprocess)
    truth_for_overlay = job.truth if job.truth is not None else np.zeros_like(mask)
    overlay = image_png_bytes(overlay_image(image, truth_for_overlay, mask, job.prompt))
    mask_path, overlay_path = output_paths(output_dir, job.stem)
    _write_pair([(overlay_path, overlay), (mask_path, mask_png_bytes(mask))])
    return _scored(job, mask, mask_path, overlay_path)


def _write_pair(files: list[tuple[Path, bytes]]) -> None:
    written: list[Path] = []
    try:
        for path, data in files:
            written.append(atomic_write_bytes(path, data))
    except BaseException:  # Ctrl-C included: never one output of an image without the other
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _scored(job: Job, mask: np.ndarray, mask_path: Path, overlay_path: Path, resumed: bool = False) -> SegmentedImage:
    dice = ellipse = None
    if job.truth is not None:
        dice = dice_score(mask, job.truth)
    if job.truth is not None and job.prompt.boxes is not None:
        ellipse = dice_score(fill_ellipses(job.prompt.boxes, job.truth.shape), job.truth)
    return SegmentedImage(job.stem, mask_path, overlay_path, job.prompt.n_objects, dice, ellipse, resumed)


def _finished(job: Job, output_dir: str | Path) -> SegmentedImage | None:
    """The image's result from an earlier run when both its outputs exist at the image's size
    (outputs are written atomically, so an existing file is a whole file), else None."""
    mask_path, overlay_path = output_paths(output_dir, job.stem)
    if not (mask_path.is_file() and overlay_path.is_file()):
        return None
    try:
        if header_size(overlay_path) != job.size:
            return None
        mask = read_mask(mask_path)
    except ValueError:  # not a mask we wrote: segment again
        return None
    if mask.shape != job.size:
        return None
    return _scored(job, mask, mask_path, overlay_path, resumed=True)


def _describe(exc: Exception) -> str:
    if isinstance(exc, ImageReadError):
        return exc.problem
    if isinstance(exc, (ValueError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
