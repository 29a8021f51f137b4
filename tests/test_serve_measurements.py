"""The segmentation endpoint's measurements: spacing from a DICOM upload or from the request."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2, raised on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from test_image_io import write_dicom  # noqa: E402
from uniultra.models.image_model import SAM2ImageModel  # noqa: E402
from uniultra.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client() -> TestClient:
    torch.manual_seed(0)
    app = create_app(SAM2ImageModel.from_preset("mini", 128).eval(), max_upload_mb=4, cache_size=4)
    return TestClient(app, base_url="http://localhost")


def upload_dicom(client, tmp_path, **elements) -> dict:
    image = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)
    path = write_dicom(tmp_path / "scan.dcm", image, **elements)
    response = client.post("/api/images", files={"file": ("scan.dcm", path.read_bytes(), "application/dicom")})
    assert response.status_code == 200, response.text
    return response.json()


def test_dicom_spacing_gives_measurements(client, tmp_path):
    info = upload_dicom(client, tmp_path, PixelSpacing=[0.25, 0.5])
    assert info["pixel_spacing_mm"] == [0.25, 0.5]
    answer = client.post(f"/api/images/{info['id']}/predict", json={"box": [10, 10, 60, 50]}).json()
    assert answer["pixel_spacing_mm"] == [0.25, 0.5]
    if answer["foreground_pixels"]:
        objects = answer["measurements"]
        assert sum(o["pixels"] for o in objects) == answer["foreground_pixels"]
        assert sum(o["area_mm2"] for o in objects) == pytest.approx(answer["foreground_pixels"] * 0.125)
    # The request's spacing wins over the header's.
    answer = client.post(f"/api/images/{info['id']}/predict",
                         json={"box": [10, 10, 60, 50], "spacing": [0.1]}).json()
    assert answer["pixel_spacing_mm"] == [0.1, 0.1]


def test_no_spacing_no_measurements_and_bad_spacing_is_422(client, tmp_path):
    info = upload_dicom(client, tmp_path)
    assert info["pixel_spacing_mm"] is None
    answer = client.post(f"/api/images/{info['id']}/predict", json={"box": [10, 10, 60, 50]}).json()
    assert answer["measurements"] is None and answer["pixel_spacing_mm"] is None
    for bad in ([0, 1], [-1], [1, 2, 3]):
        response = client.post(f"/api/images/{info['id']}/predict", json={"box": [10, 10, 60, 50], "spacing": bad})
        assert response.status_code == 422, bad
