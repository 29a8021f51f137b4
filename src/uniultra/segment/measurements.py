"""Measurements of `uniultra predict`'s masks in mm: the spacing given by the user, else the DICOM's.

One record per image (JSON-ready): the spacing used and where it came from, and per object the
area, the two diameters and the perimeter (uniultra.inference.measurements). Without a spacing
the record says so and lists no objects: a pixel count is not a measurement.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from uniultra.data.image_io import read_mask
from uniultra.data.spacing import Spacing, dicom_pixel_spacing
from uniultra.inference.measurements import measurements_table


def image_spacing(image_path: str | Path, given: Spacing | None) -> tuple[Spacing | None, str | None]:
    """(spacing, source): the user's spacing wins over the file's (one spacing for a whole batch)."""
    if given is not None:
        return given, "user"
    spacing = dicom_pixel_spacing(image_path)
    return spacing, ("dicom" if spacing is not None else None)


def measurement_record(image_path: str | Path, mask: np.ndarray, given: Spacing | None) -> dict:
    spacing, source = image_spacing(image_path, given)
    return {
        "image": str(image_path),
        "foreground_pixels": int(np.count_nonzero(mask)),
        "pixel_spacing_mm": list(spacing) if spacing else None,
        "spacing_source": source,
        "objects": measurements_table(mask, spacing) if spacing else None,
    }


def folder_records(done: Iterable[tuple[Path, Path]], given: Spacing | None) -> list[dict]:
    """Records for (image path, written mask path) pairs of a folder run."""
    return [{**measurement_record(image, read_mask(mask), given), "mask": str(mask)} for image, mask in done]


def describe(record: dict) -> str:
    """Lines for the terminal: one per object, or why there are none."""
    if record["objects"] is None:
        return "  no pixel spacing (give --spacing ROW_MM COL_MM, or a DICOM with PixelSpacing): no measurements"
    row_mm, col_mm = record["pixel_spacing_mm"]
    lines = [f"  pixel spacing {row_mm:g} x {col_mm:g} mm ({record['spacing_source']})"]
    lines += [f"  object {o['index']}: area {o['area_mm2']:.2f} mm^2, diameters {o['longest_diameter_mm']:.2f} x "
              f"{o['orthogonal_diameter_mm']:.2f} mm, perimeter {o['perimeter_mm']:.2f} mm" for o in record["objects"]]
    return "\n".join(lines)
