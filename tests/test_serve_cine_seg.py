"""Cine loops (all frames of a multi-frame DICOM, frame choice, propagation), download names and
DICOM SEG export of `uniultra serve`, with a random-weight mini model: the plumbing, not accuracy."""

from __future__ import annotations

import base64
import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")

with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2, raised on import
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from test_image_io import write_dicom  # noqa: E402
from uniultra.data.phantom import make_phantom  # noqa: E402
from uniultra.inference.predictor import Predictor  # noqa: E402
from uniultra.inference.propagation import enlarge_box, mask_edges, propagate  # noqa: E402
from uniultra.models.image_model import SAM2ImageModel  # noqa: E402
from uniultra.serve.app import create_app  # noqa: E402

H, W = 64, 80
BOX = [10, 8, 50, 40]


@pytest.fixture(scope="module")
def model() -> SAM2ImageModel:
    torch.manual_seed(0)
    return SAM2ImageModel.from_preset("mini", 128).eval()


@pytest.fixture(scope="module")
def client(model) -> TestClient:
    return TestClient(create_app(model, max_upload_mb=2, cache_size=4), base_url="http://localhost")


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return np.stack([make_phantom(seed, (H, W)).image for seed in (1, 2, 3)])


def upload(client, path, name: str, frame: int | None = None) -> dict:
    query = "" if frame is None else f"?frame={frame}"
    response = client.post(f"/api/images{query}", files={"file": (name, path.read_bytes(), "application/dicom")})
    assert response.status_code == 200, response.text
    return response.json()


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_cine_frames_predict_and_propagate_match_the_predictor(client, model, frames, tmp_path):
    info = upload(client, write_dicom(tmp_path / "loop.dcm", frames), "loop.dcm")
    assert info["frames"] == 3 and (info["height"], info["width"]) == (H, W)
    np.testing.assert_array_equal(png(client.get(info["image_url"] + "?frame=2").content), frames[2])
    assert client.get(info["image_url"] + "?frame=3").status_code == 422

    reference = Predictor(model)
    reference.set_image(frames[1])
    answer = client.post(f"/api/images/{info['id']}/predict", json={"box": BOX, "frame": 1}).json()
    served = png(base64.b64decode(answer["mask_png_base64"])) > 0
    np.testing.assert_array_equal(served, reference.predict(box=np.asarray(BOX, float))[0][0])

    loop = client.post(f"/api/images/{info['id']}/propagate", json={"box": BOX, "frame": 1, "spacing": [0.5]})
    assert loop.status_code == 200, loop.text
    result = loop.json()
    expected = propagate(Predictor(model), list(frames), 1, box=np.asarray(BOX, float))
    assert [f["frame"] for f in result["frames"]] == [0, 1, 2] and result["pixel_spacing_mm"] == [0.5, 0.5]
    for got, mask in zip(result["frames"], expected.masks, strict=True):
        np.testing.assert_array_equal(png(base64.b64decode(got["mask_png_base64"])) > 0, mask)
        assert (got["measurements"] is not None) == bool(mask.any())
    # After propagating, a predict on a frame re-encodes that frame: still the predictor's mask.
    again = client.post(f"/api/images/{info['id']}/predict", json={"box": BOX, "frame": 1}).json()
    assert again["mask_png_base64"] == answer["mask_png_base64"]
    assert client.post(f"/api/images/{info['id']}/predict", json={"box": BOX, "frame": 5}).status_code == 422


def test_propagation_boxes_follow_the_previous_mask():
    mask = np.zeros((H, W), bool)
    mask[10:20, 30:50] = True
    assert mask_edges(mask) == [30.0, 10.0, 50.0, 20.0] and mask_edges(~np.ones_like(mask)) is None
    x0, y0, x1, y1 = enlarge_box(mask_edges(mask), (H, W))
    assert (x0, y0, x1, y1) == pytest.approx((26.0, 7.0, 54.0, 23.0))
    assert enlarge_box([0, 0, W, H], (H, W)) == [0.0, 0.0, float(W), float(H)]


def test_download_is_named_after_the_image(client, frames, tmp_path):
    info = upload(client, write_dicom(tmp_path / "neck scan.dcm", frames[0]), "neck scan.dcm")
    client.post(f"/api/images/{info['id']}/predict", json={"box": BOX})
    response = client.get(f"/api/images/{info['id']}/mask.png")
    assert 'filename="neck_scan_mask.png"' in response.headers["content-disposition"]


def _seg_request(client, image_id: str, labelmap: np.ndarray, names: list[str]):
    buffer = io.BytesIO()
    Image.fromarray(labelmap).save(buffer, format="PNG")
    return client.post(f"/api/images/{image_id}/seg.dcm", data={"labels": json.dumps(names)},
                       files={"labelmap": ("labels.png", buffer.getvalue(), "image/png")})


def test_dicom_seg_references_the_source_and_reads_back(client, frames, tmp_path):
    hd = pytest.importorskip("highdicom")
    import pydicom

    path = write_dicom(tmp_path / "thyroid.dcm", frames[0], PixelSpacing=[0.2, 0.2])
    source = pydicom.dcmread(path)
    info = upload(client, path, "thyroid.dcm")
    labelmap = np.zeros((H, W), np.uint8)
    labelmap[5:20, 5:30] = 1
    labelmap[30:50, 40:70] = 2
    response = _seg_request(client, info["id"], labelmap, ["nodule", "gland"])
    assert response.status_code == 200, response.text
    assert 'filename="thyroid_seg.dcm"' in response.headers["content-disposition"]
    seg_path = tmp_path / "seg.dcm"
    seg_path.write_bytes(response.content)

    seg = hd.seg.segread(seg_path)
    assert seg.Modality == "SEG" and seg.number_of_segments == 2
    assert [seg.get_segment_description(i).segment_label for i in (1, 2)] == ["nodule", "gland"]
    assert source.SOPInstanceUID in [uid for _, _, uid in seg.get_source_image_uids()]
    back = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)
    np.testing.assert_array_equal(back[0], labelmap)
    plain = pydicom.dcmread(seg_path)  # plain pydicom reads it too, with the reference to the source
    assert plain.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
        source.SOPInstanceUID


def test_dicom_seg_refusals(client, frames, tmp_path):
    pytest.importorskip("highdicom")
    buffer = io.BytesIO()
    Image.fromarray(frames[0]).save(buffer, format="PNG")
    plain = client.post("/api/images", files={"file": ("a.png", buffer.getvalue(), "image/png")}).json()
    assert _seg_request(client, plain["id"], np.zeros((H, W), np.uint8), ["a"]).status_code == 409
    info = upload(client, write_dicom(tmp_path / "one.dcm", frames[0]), "one.dcm")
    assert _seg_request(client, info["id"], np.zeros((H, W + 1), np.uint8), ["a"]).status_code == 422
    assert _seg_request(client, info["id"], np.full((H, W), 3, np.uint8), ["a", "b"]).status_code == 422
    loop = upload(client, write_dicom(tmp_path / "loop.dcm", frames), "loop.dcm")
    refused = _seg_request(client, loop["id"], np.zeros((H, W), np.uint8), ["a"])
    assert refused.status_code == 422 and "multi-frame" in refused.json()["detail"]
