"""What `uniultra evaluate` shows and writes: the table, results.json and overlay images."""

from __future__ import annotations

import datetime as dt
import io
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_bytes
from uniultra.data.prompts import Prompt
from uniultra.evaluation.evaluate import DatasetResult

# Dice and IoU are stored as fractions in JSON and shown as percentages in the table.
_TABLE_COLUMNS = ("dataset", "n", "skipped", "empty_pred", "Dice%", "+-95%CI", "IoU%", "HD", "HD95")


def format_table(results: Sequence[DatasetResult], unit: str = "px") -> str:
    rows = [_table_row(result.name, result.summary()) for result in results]
    header = [*_TABLE_COLUMNS[:-2], f"HD {unit}", f"HD95 {unit}"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join(_aligned(cells, widths) for cells in [header, *rows])


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    # Name column left-aligned, numbers right-aligned.
    first, *rest = zip(cells, widths, strict=True)
    return "  ".join([first[0].ljust(first[1]), *(cell.rjust(width) for cell, width in rest)])


def _table_row(name: str, summary: dict) -> list[str]:
    def mean(metric: str, scale: float = 1.0) -> str:
        value = summary[metric]["mean"]
        return "-" if value is None else f"{value * scale:.2f}"

    ci = summary["dice"]["ci95"]
    ci_text = "-" if ci is None else f"{(ci[1] - ci[0]) / 2 * 100:.2f}"
    return [name, str(summary["n"]), str(summary["n_skipped"]), str(summary["n_empty_pred"]),
            mean("dice", 100), ci_text, mean("iou", 100), mean("hd"), mean("hd95")]


def results_document(results: Sequence[DatasetResult], *, command: str, config: dict, seconds: float) -> dict:
    """Everything needed to trust and reproduce the numbers: command, config, per-image rows."""
    from uniultra import __version__

    return {
        "command": command,
        "config": config,
        "uniultra_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "seconds": seconds,
        "definitions": {
            "dice_iou": "fractions in [0, 1], per image then averaged per dataset",
            "hd_hd95": "pixels of the native image grid, MONAI definitions (surface pixels, euclidean)",
            "empty_prediction": "Dice 0, HD = HD95 = image diagonal; counted in n_empty_pred",
            "both_empty": "Dice 1, IoU 1, HD 0",
            "skipped": "images whose mask is empty have no box/point prompt (prompted modes only)",
        },
        "datasets": {r.name: {"root": r.root, "split": r.split, **r.summary()} for r in results},
        "images": {r.name: r.rows for r in results},
        "skipped": {r.name: r.skipped for r in results},
    }


def machine_info() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count()}


# --- overlays ------------------------------------------------------------------------------

_TRUTH_COLOUR = np.array([0, 255, 0], dtype=np.float32)
_PREDICTION_COLOUR = np.array([255, 40, 40], dtype=np.float32)
_PROMPT_COLOUR = (255, 220, 0)


def overlay_image(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, prompt: Prompt | None = None):
    """RGB uint8 picture: prediction tinted red with a red outline, truth outlined green, prompts yellow."""
    from PIL import Image, ImageDraw

    from uniultra.data.image_io import to_rgb_float
    from uniultra.evaluation.metrics import surface

    canvas = to_rgb_float(image) * 255.0
    canvas[prediction] = 0.65 * canvas[prediction] + 0.35 * _PREDICTION_COLOUR
    canvas[surface(prediction)] = _PREDICTION_COLOUR
    canvas[surface(truth)] = _TRUTH_COLOUR
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    if prompt is not None:
        _draw_prompt(ImageDraw.Draw(picture), prompt)
    return picture


def _draw_prompt(draw, prompt: Prompt) -> None:
    for x0, y0, x1, y1 in [] if prompt.boxes is None else prompt.boxes:
        draw.rectangle((x0, y0, x1, y1), outline=_PROMPT_COLOUR)
    for x, y in [] if prompt.points is None else prompt.points.reshape(-1, 2):
        draw.line((x - 4, y, x + 4, y), fill=_PROMPT_COLOUR)
        draw.line((x, y - 4, x, y + 4), fill=_PROMPT_COLOUR)


def write_overlay(path: Path, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, prompt: Prompt):
    buffer = io.BytesIO()
    overlay_image(image, truth, prediction, prompt).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
