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
# Shown only when some image with an empty truth was scored (prompt mode `none`).
_EMPTY_TRUTH_COLUMNS = ("empty_truth", "Dice% truth>0", "Dice% empty")


def format_table(results: Sequence[DatasetResult], unit: str | None = None) -> str:
    """The table; HD columns in the results' unit (px, or mm with a spacing) unless `unit` is given."""
    summaries = [result.summary() for result in results]
    unit = unit or _distance_unit(results)
    rows = [_table_row(result.name, summary) for result, summary in zip(results, summaries, strict=True)]
    header = [*_TABLE_COLUMNS[:-2], f"HD {unit}", f"HD95 {unit}"]
    if any(summary["n_empty_truth"] for summary in summaries):
        header += _EMPTY_TRUTH_COLUMNS
        rows = [row + _empty_truth_cells(summary) for row, summary in zip(rows, summaries, strict=True)]
    if any(result.modality for result in results):
        header.append("modality")
        rows = [row + [result.modality or "-"] for row, result in zip(rows, results, strict=True)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    return "\n".join(_aligned(cells, widths) for cells in [header, *rows])


def _distance_unit(results: Sequence[DatasetResult]) -> str:
    units = {result.distance_unit for result in results}
    if len(units) > 1:
        raise ValueError("datasets scored in pixels and in mm cannot share one table")
    return units.pop() if units else "px"


def _aligned(cells: Sequence[str], widths: Sequence[int]) -> str:
    # Name column left-aligned, numbers right-aligned.
    first, *rest = zip(cells, widths, strict=True)
    return "  ".join([first[0].ljust(first[1]), *(cell.rjust(width) for cell, width in rest)])


def _table_row(name: str, summary: dict) -> list[str]:
    ci = summary["dice"]["ci95"]
    ci_text = "-" if ci is None else f"{(ci[1] - ci[0]) / 2 * 100:.2f}"
    return [name, str(summary["n"]), str(summary["n_skipped"]), str(summary["n_empty_pred"]),
            _mean(summary["dice"], 100), ci_text, _mean(summary["iou"], 100), _mean(summary["hd"]),
            _mean(summary["hd95"])]


def _empty_truth_cells(summary: dict) -> list[str]:
    return [str(summary["n_empty_truth"]), _mean(summary["dice_truth_nonempty"], 100),
            _mean(summary["dice_truth_empty"], 100)]


def _mean(metric: dict, scale: float = 1.0) -> str:
    return "-" if metric["mean"] is None else f"{metric['mean'] * scale:.2f}"


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
            "hd_hd95": "MONAI definitions (surface pixels, euclidean) on the native image grid, in the dataset's "
                       "hd_unit: px, or mm with its pixel_spacing_mm (row_mm, col_mm)",
            "empty_prediction": "Dice 0, HD = HD95 = image diagonal; counted in n_empty_pred",
            "both_empty": "Dice 1, IoU 1, HD 0",
            "skipped": "images whose mask is empty have no box/point prompt (prompted modes only)",
            "empty_truth": "prompt none scores images whose mask is empty too (counted in n_empty_truth); "
                           "dice_truth_nonempty / dice_truth_empty summarise the two kinds apart",
            "modality": "the automatic head's decoding channel used for the dataset (prompt none)",
        },
        "datasets": {r.name: {"root": r.root, "split": r.split, "modality": r.modality, "hd_unit": r.distance_unit,
                              "pixel_spacing_mm": list(r.spacing) if r.spacing else None, **r.summary()}
                     for r in results},
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
