"""Segment one image or a whole folder with box / point prompts, never touching the inputs.

Folder mode takes either a dataset folder (`images/` + `masks/`: boxes come from the masks and Dice
is reported) or a plain folder of images with a JSON file of boxes per stem. In prompt mode `none`
(automatic mode) every image is segmented without prompts, and scored when masks/ exists.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from uniultra.atomic import atomic_write_bytes
from uniultra.data.dataset import SegmentationDataset
from uniultra.data.image_io import IMAGE_EXTENSIONS, read_image, read_mask
from uniultra.data.prompts import Prompt, make_prompt
from uniultra.evaluation.baselines import fill_ellipses
from uniultra.evaluation.metrics import dice_score
from uniultra.evaluation.report import overlay_image
from uniultra.inference.objects import segment_objects
from uniultra.inference.predictor import Predictor


@dataclass
class SegmentedImage:
    stem: str
    mask_path: Path
    overlay_path: Path
    n_objects: int
    dice: float | None  # None when no ground truth was given
    ellipse_dice: float | None  # the inscribed-ellipse baseline under the same boxes (None without boxes)


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
) -> list[SegmentedImage]:
    """Write `<output>/masks/<stem>.png` and `<output>/overlays/<stem>.png` for every image.

    prompt_mode: `box` (from the masks or `boxes_file`) or `none` (the predictor's answer without prompts).
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    jobs = _unprompted_jobs(input_dir) if prompt_mode == "none" else _folder_jobs(input_dir, boxes_file, jitter, seed)
    outputs = [output_dir / sub / f"{stem}.png" for stem, *_ in jobs for sub in ("masks", "overlays")]
    refuse_overwriting_inputs([path for _, path, _, _ in jobs], outputs)
    results = []
    from tqdm import tqdm

    for stem, image_path, prompt, truth in tqdm(jobs, desc="segment", unit="img", disable=not progress):
        image = read_image(image_path)
        mask = segment_image(predictor, image, prompt, postprocess)
        truth_for_overlay = truth if truth is not None else np.zeros_like(mask)
        mask_path = atomic_write_bytes(output_dir / "masks" / f"{stem}.png", mask_png_bytes(mask))
        overlay = overlay_image(image, truth_for_overlay, mask, prompt)
        overlay_path = atomic_write_bytes(output_dir / "overlays" / f"{stem}.png", image_png_bytes(overlay))
        dice = ellipse = None
        if truth is not None:
            dice = dice_score(mask, truth)
        if truth is not None and prompt.boxes is not None:
            ellipse = dice_score(fill_ellipses(prompt.boxes, truth.shape), truth)
        results.append(SegmentedImage(stem, mask_path, overlay_path, prompt.n_objects, dice, ellipse))
    return results


def _folder_jobs(input_dir: Path, boxes_file, jitter: float, seed: int) -> list[tuple]:
    """(stem, image path, prompt, truth mask or None) for every image that has a prompt."""
    if boxes_file is not None:
        return _jobs_from_boxes(input_dir, Path(boxes_file))
    if not (input_dir / "masks").is_dir():
        raise ValueError(f"{input_dir}: no masks/ folder to take boxes from; pass --boxes FILE.json "
                         '({"<stem>": [[x0, y0, x1, y1], ...]})')
    jobs = []
    for sample in SegmentationDataset(input_dir).samples:
        truth = read_mask(sample.mask_path)
        prompt = make_prompt(truth, "box", stem=sample.stem, seed=seed, jitter=jitter)
        if prompt is not None:  # an empty mask has no object to prompt
            jobs.append((sample.stem, sample.image_path, prompt, truth))
    return jobs


def _unprompted_jobs(input_dir: Path) -> list[tuple]:
    """Every image, with its truth when the folder has the dataset layout (empty masks included)."""
    if (input_dir / "masks").is_dir():
        return [(s.stem, s.image_path, Prompt("none"), read_mask(s.mask_path))
                for s in SegmentationDataset(input_dir).samples]
    _, by_stem = _images_by_stem(input_dir)
    if not by_stem:
        raise ValueError(f"{input_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) to segment")
    return [(stem, path, Prompt("none"), None) for stem, path in by_stem.items()]


def _images_by_stem(input_dir: Path) -> tuple[Path, dict[str, Path]]:
    """(the folder holding the images: DIR/images or DIR itself, {stem: image path})."""
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input folder {input_dir} does not exist")
    image_dir = input_dir / "images" if (input_dir / "images").is_dir() else input_dir
    return image_dir, {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def _jobs_from_boxes(input_dir: Path, boxes_file: Path) -> list[tuple]:
    try:
        table = json.loads(boxes_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{boxes_file}: cannot read boxes JSON ({exc})") from exc
    image_dir, by_stem = _images_by_stem(input_dir)
    jobs = []
    for stem, boxes in table.items():
        if stem not in by_stem:
            raise ValueError(f"{boxes_file}: no image '{stem}' in {image_dir}")
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        jobs.append((stem, by_stem[stem], Prompt("box", boxes=arr), None))
    return jobs
