"""Pixel spacing (row_mm, col_mm): the physical size of one pixel, from a DICOM header or the user.

Rows come first, as in DICOM's PixelSpacing and numpy's (row, col) indexing: `row_mm` is the
height of a pixel (along y), `col_mm` its width (along x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

Spacing = tuple[float, float]

# PhysicalUnitsXDirection / YDirection code for centimetres (DICOM PS3.3 C.8.5.5.1.15).
_CENTIMETRES = 3


def check_spacing(values: float | Sequence[float]) -> Spacing:
    """One value (square pixels) or two (row_mm, col_mm) -> (row_mm, col_mm), both positive and finite."""
    numbers = [values] if isinstance(values, int | float) else list(values)
    if len(numbers) not in (1, 2):
        raise ValueError(f"pixel spacing takes 1 value (square pixels) or 2 (ROW_MM COL_MM), got {len(numbers)}")
    try:
        floats = [float(v) for v in numbers]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pixel spacing must be numbers in mm, got {numbers}") from exc
    if not all(math.isfinite(v) and v > 0 for v in floats):
        raise ValueError(f"pixel spacing must be positive millimetres, got {floats}")
    return (floats[0], floats[-1])


def dicom_pixel_spacing(path: str | Path) -> Spacing | None:
    """(row_mm, col_mm) of a DICOM file, or None for other files and DICOMs that do not say.

    PixelSpacing first; else the first ultrasound region (SequenceOfUltrasoundRegions) measured
    in centimetres in both directions (PhysicalDeltaY, PhysicalDeltaX, converted to mm).
    """
    path = Path(path)
    if path.suffix.lower() != ".dcm":
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None  # reading the image reports what is wrong with the file
    return spacing_from_dataset(ds)


def spacing_from_dataset(ds) -> Spacing | None:
    """(row_mm, col_mm) from a pydicom Dataset (see `dicom_pixel_spacing`), or None."""
    spacing = _valid(ds.get("PixelSpacing"), scale=1.0)
    if spacing is not None:
        return spacing
    for region in ds.get("SequenceOfUltrasoundRegions") or []:
        units = (region.get("PhysicalUnitsYDirection"), region.get("PhysicalUnitsXDirection"))
        if units == (_CENTIMETRES, _CENTIMETRES):
            spacing = _valid((region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX")), scale=10.0)
            if spacing is not None:
                return spacing
    return None


def _valid(values, scale: float) -> Spacing | None:
    # A header with a missing, zero or malformed spacing is treated as saying nothing.
    if values is None:
        return None
    try:
        return check_spacing([abs(float(v)) * scale for v in values])
    except (TypeError, ValueError):
        return None
