"""What a folder run of `uniultra predict` will do, checked before any image is segmented.

Everything that can be known from the file listing, the masks, the boxes file and the image
headers is checked here, before the model is even loaded: a bad file never stops the batch
half-way. Each bad file becomes a `Failure` (listed at the end, non-zero exit), each good one a
`Job`; images with nothing to segment (an empty mask, no entry in the boxes file) are `skipped`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from uniultra.data.dataset import list_folder, natural_sorted, require_dataset_dir
from uniultra.data.image_io import IMAGE_EXTENSIONS, ImageReadError, read_mask
from uniultra.data.prompts import Prompt, make_prompt
from uniultra.inference.objects import widen_degenerate_boxes
from uniultra.inference.prompts import PromptSet


@dataclass(frozen=True)
class Failure:
    """One input that cannot be segmented: `name` is the file (relative to the input folder) or
    the boxes-file entry, `problem` what is wrong with it."""

    name: str
    problem: str

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}"


@dataclass(frozen=True)
class Job:
    stem: str
    image_path: Path
    prompt: Prompt
    truth: np.ndarray | None  # None when there is no ground truth to score against
    size: tuple[int, int]  # (height, width) from the image's header


@dataclass
class FolderPlan:
    jobs: list[Job] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    skipped: list[Failure] = field(default_factory=list)  # nothing to segment: not an error


def plan_folder(input_dir: str | Path, boxes_file: str | Path | None = None, jitter: float = 0.0,
                seed: int = 0, prompt_mode: str = "box") -> FolderPlan:
    """Jobs for every image of `input_dir` that can be segmented, failures for the others.

    Raises only for a problem with the whole run (no such folder, no masks/ and no boxes file,
    an unreadable boxes file, no image at all in automatic mode).
    """
    input_dir = Path(input_dir)
    if prompt_mode == "none":
        return _plan_unprompted(input_dir)
    if boxes_file is not None:
        return _plan_from_boxes(input_dir, Path(boxes_file))
    if not (input_dir / "masks").is_dir():
        raise ValueError(f"{input_dir}: no masks/ folder to take boxes from; pass --boxes FILE.json "
                         '({"<stem>": [[x0, y0, x1, y1], ...]})')
    return _plan_from_masks(input_dir, jitter, seed)


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding its pixels (cheap, so a whole
    folder is checked before the first image is segmented)."""
    try:
        if path.suffix.lower() == ".dcm":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as img:
            return img.height, img.width
    except Exception as exc:  # noqa: BLE001 - Pillow and pydicom raise many types for bad files
        raise ImageReadError(path, f"cannot read the image ({type(exc).__name__}: {exc})") from exc


def relative_name(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _problem(exc: Exception) -> str:
    """The message without the path (the failure names the file already)."""
    return exc.problem if isinstance(exc, ImageReadError) else str(exc)


# --- dataset layout: boxes from the masks -------------------------------------------------------

def _plan_from_masks(input_dir: Path, jitter: float, seed: int) -> FolderPlan:
    listing = list_folder(require_dataset_dir(input_dir))
    plan = FolderPlan()
    for stem in natural_sorted(set(listing.images) | set(listing.masks)):
        images, masks = listing.images.get(stem, []), listing.masks.get(stem, [])
        problem = _pairing_problem(input_dir, stem, images, masks)
        if problem is not None:
            plan.failures.append(problem)
            continue
        job = _masked_job(input_dir, stem, images[0], masks[0], plan)
        if job is not None:
            prompt = make_prompt(job.truth, "box", stem=stem, seed=seed, jitter=jitter)
            if prompt is None:
                plan.skipped.append(Failure(relative_name(images[0], input_dir), "empty mask: no object to prompt"))
            else:
                plan.jobs.append(Job(stem, job.image_path, prompt, job.truth, job.size))
    return plan


def _pairing_problem(root: Path, stem: str, images: list[Path], masks: list[Path]) -> Failure | None:
    if len(images) > 1:
        names = ", ".join(p.name for p in images)
        return Failure(relative_name(images[0], root), f"several images share the stem {stem!r} ({names}); keep one")
    if not masks:
        return Failure(relative_name(images[0], root), f"no mask: expected masks/{stem}.png")
    if not images:
        return Failure(relative_name(masks[0], root), f"mask without an image: no images/{stem}.*")
    return None


def _masked_job(root: Path, stem: str, image_path: Path, mask_path: Path, plan: FolderPlan) -> Job | None:
    """A job with the truth mask read and its size checked against the image (prompt still to
    make), or None with the problem recorded in `plan.failures`."""
    try:
        size = header_size(image_path)
    except ImageReadError as exc:
        plan.failures.append(Failure(relative_name(image_path, root), exc.problem))
        return None
    try:
        truth = read_mask(mask_path)
    except (ImageReadError, FileNotFoundError) as exc:
        plan.failures.append(Failure(relative_name(mask_path, root), _problem(exc)))
        return None
    if truth.shape != size:
        plan.failures.append(Failure(relative_name(mask_path, root), (
            f"mask is {truth.shape[1]} x {truth.shape[0]} pixels but {image_path.name} is {size[1]} x {size[0]}")))
        return None
    return Job(stem, image_path, Prompt("none"), truth, size)


# --- automatic mode: every image, scored when its mask exists ---------------------------------

def _plan_unprompted(input_dir: Path) -> FolderPlan:
    image_dir, by_stem = _images_by_stem(input_dir)
    if not by_stem:
        raise ValueError(f"{input_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) to segment")
    plan = FolderPlan()
    mask_dir = input_dir / "masks"
    for stem, image_path in by_stem.items():
        mask_path = mask_dir / f"{stem}.png"
        if mask_path.is_file():
            job = _masked_job(input_dir, stem, image_path, mask_path, plan)
        else:
            job = _unscored_job(input_dir, stem, image_path, Prompt("none"), plan)
        if job is not None:
            plan.jobs.append(job)
    return plan


def _unscored_job(root: Path, stem: str, image_path: Path, prompt: Prompt, plan: FolderPlan) -> Job | None:
    try:
        return Job(stem, image_path, prompt, None, header_size(image_path))
    except ImageReadError as exc:
        plan.failures.append(Failure(relative_name(image_path, root), exc.problem))
        return None


def _images_by_stem(input_dir: Path) -> tuple[Path, dict[str, Path]]:
    """(the folder holding the images: DIR/images or DIR itself, {stem: image path})."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    image_dir = input_dir / "images" if (input_dir / "images").is_dir() else input_dir
    paths = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
             and not p.name.startswith(".")}
    return image_dir, {stem: paths[stem] for stem in natural_sorted(paths)}


# --- plain images with a boxes file -------------------------------------------------------------

def _plan_from_boxes(input_dir: Path, boxes_file: Path) -> FolderPlan:
    table = _read_boxes_file(boxes_file)
    image_dir, by_stem = _images_by_stem(input_dir)
    plan = FolderPlan()
    for stem, boxes in table.items():
        if stem not in by_stem:
            plan.failures.append(Failure(f"{boxes_file.name} entry {stem!r}", f"no image {stem}.* in {image_dir}"))
            continue
        job = _unscored_job(input_dir, stem, by_stem[stem], Prompt("none"), plan)
        if job is None:
            continue
        try:
            arr = _checked_boxes(boxes, job.size)
        except ValueError as exc:
            plan.failures.append(Failure(relative_name(job.image_path, input_dir), f"{boxes_file.name}: {exc}"))
            continue
        plan.jobs.append(Job(stem, job.image_path, Prompt("box", boxes=arr), None, job.size))
    plan.skipped += [Failure(relative_name(path, input_dir), f"no entry in {boxes_file.name}")
                     for stem, path in by_stem.items() if stem not in table]
    return plan


def _read_boxes_file(boxes_file: Path) -> dict:
    try:
        table = json.loads(boxes_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{boxes_file}: cannot read boxes JSON ({exc})") from exc
    if not isinstance(table, dict):
        raise ValueError(f'{boxes_file}: expected a JSON object {{"<stem>": [[x0, y0, x1, y1], ...]}}, '
                         f"got {type(table).__name__}")
    return table


def _checked_boxes(boxes, size: tuple[int, int]) -> np.ndarray:
    """(N, 4) boxes, validated against the image size as the predictor will (same messages)."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"boxes must be numbers [[x0, y0, x1, y1], ...] ({exc})") from exc
    if arr.size == 0 or arr.size % 4:
        raise ValueError(f"boxes must be [[x0, y0, x1, y1], ...], got shape {arr.shape}")
    arr = arr.reshape(-1, 4)
    PromptSet.from_user(widen_degenerate_boxes(arr), None, None, size)
    return arr
