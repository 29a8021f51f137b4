"""Physical measurements: objects of known size and spacing, spacing from DICOM, mm in predict and evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from test_image_io import write_dicom
from uniultra.cli import main
from uniultra.data.phantom import make_phantom, write_phantom_dataset
from uniultra.data.spacing import check_spacing, dicom_pixel_spacing
from uniultra.inference.measurements import measure_objects

SPACING = (0.1, 0.2)  # row_mm, col_mm: anisotropic on purpose


def ellipse(shape, centre_rc, semi_axes_rc) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    (r0, c0), (a, b) = centre_rc, semi_axes_rc
    return ((rows - r0) / a) ** 2 + ((cols - c0) / b) ** 2 <= 1


def ramanujan_perimeter(a: float, b: float) -> float:
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


@pytest.mark.parametrize("semi_axes", [(40.0, 25.0), (15.0, 60.0), (12.0, 12.0)])
def test_ellipse_of_known_size(semi_axes):
    a, b = semi_axes  # rows, cols in pixels; the centre between pixels makes the extent exactly 2a x 2b
    (only,) = measure_objects(ellipse((200, 300), (100.5, 150.5), semi_axes), SPACING)
    row_mm, col_mm = SPACING
    assert only.area_mm2 == pytest.approx(math.pi * a * b * row_mm * col_mm, rel=0.02)
    long_mm, short_mm = sorted([2 * a * row_mm, 2 * b * col_mm], reverse=True)
    pixel = max(SPACING)
    assert abs(only.longest_diameter_mm - long_mm) <= pixel
    assert abs(only.orthogonal_diameter_mm - short_mm) <= pixel
    assert only.perimeter_mm == pytest.approx(ramanujan_perimeter(a * row_mm, b * col_mm), rel=0.03)
    assert only.centroid_xy == pytest.approx((150.5, 100.5), abs=0.01)


def test_rotated_rectangle_and_several_objects():
    mask = np.zeros((120, 120), bool)
    rows, cols = np.mgrid[:120, :120]
    u, v = (cols - 60 + rows - 60) / math.sqrt(2), (cols - 60 - (rows - 60)) / math.sqrt(2)
    mask |= (np.abs(u) <= 30) & (np.abs(v) <= 10)  # 60 x 20 px, rotated 45 degrees
    mask[5:8, 100:110] = True  # a second, separate object
    objects = measure_objects(mask, 0.5)
    assert [o.index for o in objects] == [1, 2] and objects[0].pixels == 30
    big = objects[1]
    assert big.longest_diameter_mm == pytest.approx(math.hypot(60, 20) * 0.5, abs=1.0)  # corner to corner
    assert big.area_mm2 == pytest.approx(60 * 20 * 0.25, rel=0.03)
    assert objects[0].longest_diameter_mm == pytest.approx(math.hypot(10, 3) * 0.5, abs=0.5)


def test_empty_and_single_pixel_masks():
    assert measure_objects(np.zeros((5, 5), bool), SPACING) == []
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    (dot,) = measure_objects(mask, SPACING)
    assert dot.area_mm2 == pytest.approx(0.02) and dot.perimeter_mm > 0 and dot.longest_diameter_mm > 0


def test_spacing_values_are_checked():
    assert check_spacing([0.3]) == (0.3, 0.3) and check_spacing((0.1, 0.2)) == (0.1, 0.2)
    for bad in ([0, 1], [-0.1], [1, 2, 3], [float("nan")], []):
        with pytest.raises(ValueError, match="spacing"):
            check_spacing(bad)


def test_spacing_from_dicom_pixel_spacing_and_ultrasound_regions(tmp_path):
    from pydicom.dataset import Dataset

    image = np.zeros((8, 8), np.uint8)
    assert dicom_pixel_spacing(write_dicom(tmp_path / "ps.dcm", image, PixelSpacing=[0.12, 0.34])) == (0.12, 0.34)
    doppler, bmode = Dataset(), Dataset()
    doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = 4, 7  # seconds, cm/s: not a distance
    doppler.PhysicalDeltaX, doppler.PhysicalDeltaY = 0.01, 0.5
    bmode.PhysicalUnitsXDirection = bmode.PhysicalUnitsYDirection = 3  # cm
    bmode.PhysicalDeltaX, bmode.PhysicalDeltaY = 0.02, 0.015
    path = write_dicom(tmp_path / "us.dcm", image, SequenceOfUltrasoundRegions=[doppler, bmode])
    assert dicom_pixel_spacing(path) == pytest.approx((0.15, 0.2))  # cm -> mm, rows first
    assert dicom_pixel_spacing(write_dicom(tmp_path / "none.dcm", image)) is None
    assert dicom_pixel_spacing(tmp_path / "scan.png") is None


def test_evaluate_with_spacing_reports_hd_in_mm(tmp_path, capsys):
    data = write_phantom_dataset(tmp_path / "phantoms", 3, seed=5, size=(96, 128))
    documents = []
    for extra in ([], ["--spacing", "0.25"]):
        out = tmp_path / f"r{len(documents)}.json"
        assert main(["evaluate", "--model", "baseline:ellipse", "--data", str(data), "--jitter", "10",
                     "--out", str(out), "--no-progress", *extra]) == 0
        documents.append(json.loads(out.read_text()))
    table = capsys.readouterr().out
    assert "HD95 px" in table and "HD95 mm" in table
    px, mm = (d["images"]["phantoms"] for d in documents)
    assert any(row["hd95"] > 0 for row in px)
    for row_px, row_mm in zip(px, mm, strict=True):
        assert row_mm["hd95"] == pytest.approx(row_px["hd95"] * 0.25)
        assert row_mm["hd"] == pytest.approx(row_px["hd"] * 0.25)
    assert documents[0]["datasets"]["phantoms"]["hd_unit"] == "px"
    assert documents[1]["datasets"]["phantoms"]["hd_unit"] == "mm"
    assert documents[1]["datasets"]["phantoms"]["pixel_spacing_mm"] == [0.25, 0.25]
    assert "--spacing 0.25" in documents[1]["command"]


def test_predict_with_spacing_writes_measurements(tmp_path, capsys):
    phantom = make_phantom(3, (120, 160))
    image = write_dicom(tmp_path / "scan.dcm", phantom.image, PixelSpacing=[0.2, 0.2])
    x0, y0, x1, y1 = (int(v) for v in phantom.boxes[0])
    box = [str(v) for v in (x0, y0, x1 + 1, y1 + 1)]
    out, report = tmp_path / "mask.png", tmp_path / "m.json"
    assert main(["predict", "--image", str(image), "--box", *box, "--out", str(out), "--json", str(report)]) == 0
    record = json.loads(report.read_text())
    assert record["pixel_spacing_mm"] == [0.2, 0.2] and record["spacing_source"] == "dicom"
    assert record["objects"] and record["objects"][0]["area_mm2"] == pytest.approx(
        sum(o["pixels"] for o in record["objects"][:1]) * 0.04)
    assert "area" in capsys.readouterr().out
    # The user's spacing wins over the header's.
    assert main(["predict", "--image", str(image), "--box", *box, "--out", str(out), "--json", str(report),
                 "--spacing", "0.1", "0.3"]) == 0
    assert json.loads(report.read_text())["pixel_spacing_mm"] == [0.1, 0.3]
    assert main(["predict", "--image", str(image), "--box", *box, "--out", str(out), "--spacing", "0"]) == 2
    assert "spacing" in capsys.readouterr().err


def test_predict_folder_with_spacing_writes_measurements_json(tmp_path):
    data = write_phantom_dataset(tmp_path / "phantoms", 2, seed=7, size=(96, 128))
    assert main(["predict", "--input", str(data), "--output", str(tmp_path / "out"), "--spacing", "0.3",
                 "--no-progress"]) == 0
    records = json.loads((tmp_path / "out" / "measurements.json").read_text())["images"]
    assert [r["pixel_spacing_mm"] for r in records] == [[0.3, 0.3]] * 2
    assert all(r["mask"].endswith(".png") and r["objects"] is not None for r in records)
