"""`uniultra serve` JSON API with a random-weight mini model at 128 px: shapes, caching and errors.

The masks are meaningless (random weights); what is tested is the plumbing: one embedding per
image, decoder-only prompts, masks at image size equal to the Python predictor's, every error
mapped to its status code with a clear message, and the server answering after each error.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

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
from uniultra.cli import COMMAND_MODULES  # noqa: E402
from uniultra.commands.serve import exposure_warning, is_local, register  # noqa: E402
from uniultra.data.phantom import make_phantom  # noqa: E402
from uniultra.inference.predictor import Predictor  # noqa: E402
from uniultra.models.image_model import SAM2ImageModel  # noqa: E402
from uniultra.serve.app import STATIC_DIR, create_app  # noqa: E402

H, W = 120, 160
BOX = [20, 15, 110, 95]
MAX_UPLOAD_MB = 0.25


@pytest.fixture(scope="module")
def model() -> SAM2ImageModel:
    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset("mini", 128).eval()
    encode = model.encode_image
    model.encode_calls = 0

    def counting_encode(x):
        model.encode_calls += 1
        return encode(x)

    model.encode_image = counting_encode
    return model


@pytest.fixture(scope="module")
def client(model) -> TestClient:
    return local_client(create_app(model, max_upload_mb=MAX_UPLOAD_MB, cache_size=64))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_phantom(5, (H, W)).image


def local_client(app) -> TestClient:
    """A client that names an allowed host (TestClient's default Host, testserver, is refused)."""
    return TestClient(app, base_url="http://localhost")


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def upload(client, data: bytes, name: str = "scan.png", ctype: str = "image/png"):
    return client.post("/api/images", files={"file": (name, data, ctype)})


@pytest.fixture(scope="module")
def image_id(client, image) -> str:
    response = upload(client, encode(image))
    assert response.status_code == 200, response.text
    return response.json()["id"]


def decode_mask(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def assert_still_serving(client, image_id) -> None:
    assert client.get("/api/health").json()["status"] == "ok"
    response = client.post(f"/api/images/{image_id}/predict", json={"box": BOX})
    assert response.status_code == 200, response.text


# --- the happy path ----------------------------------------------------------------------------

def test_upload_returns_id_and_size(client, image):
    response = upload(client, encode(image))
    assert response.status_code == 200
    info = response.json()
    assert info["width"] == W and info["height"] == H and info["format"] == "png" and info["id"]
    shown = client.get(info["image_url"])
    assert shown.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(shown.content))), image)


def test_box_gives_binary_mask_of_image_size_equal_to_the_predictor(client, model, image, image_id):
    response = client.post(f"/api/images/{image_id}/predict", json={"box": BOX})
    assert response.status_code == 200, response.text
    result = response.json()
    mask = decode_mask(result["mask_png_base64"])
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert result["foreground_pixels"] == int((mask > 0).sum())
    assert len(result["scores"]) == 1 and result["score"] == result["scores"][0]
    assert result["box"] == BOX
    predictor = Predictor(model)
    predictor.set_image(image)
    expected = predictor.predict(box=np.asarray(BOX, float))[0][0]
    np.testing.assert_array_equal(mask > 0, expected)
    download = client.get(result["mask_url"])
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    assert "attachment" in download.headers["content-disposition"]
    assert download.content == base64.b64decode(result["mask_png_base64"])


def test_points_box_and_multimask(client, image_id):
    for body, n_scores in [
        ({"points": [[60, 50], [5, 5]], "labels": [1, 0]}, 1),
        ({"box": BOX, "points": [[60, 50]], "labels": [1]}, 1),
        ({"points": [[60, 50]], "labels": [1], "multimask": True}, 3),
    ]:
        result = client.post(f"/api/images/{image_id}/predict", json=body).json()
        assert decode_mask(result["mask_png_base64"]).shape == (H, W)
        assert len(result["scores"]) == n_scores and result["score"] == max(result["scores"])


def test_embedding_is_computed_once_per_image(client, model, image):
    before = model.encode_calls
    image_id = upload(client, encode(image)).json()["id"]
    assert model.encode_calls == before + 1
    for body in ({"box": BOX}, {"points": [[10, 10]], "labels": [1]}, {"box": BOX, "multimask": True}):
        assert client.post(f"/api/images/{image_id}/predict", json=body).status_code == 200
    client.get(f"/api/images/{image_id}/mask.png")
    assert model.encode_calls == before + 1
    upload(client, encode(image[::-1].copy()))
    assert model.encode_calls == before + 2


def test_jpeg_and_16bit_dicom_uploads(client, image, tmp_path):
    jpeg = upload(client, encode(image, "JPEG"), "scan.jpg", "image/jpeg").json()
    assert (jpeg["format"], jpeg["width"], jpeg["height"]) == ("jpeg", W, H)
    path = write_dicom(tmp_path / "scan.dcm", image.astype(np.uint16) * 16, bits_stored=12)
    # Browsers often send DICOM as application/octet-stream: the bytes decide.
    dicom = upload(client, path.read_bytes(), "scan.dcm", "application/octet-stream").json()
    assert (dicom["format"], dicom["width"], dicom["height"]) == ("dicom", W, H)
    shown = np.asarray(Image.open(io.BytesIO(client.get(dicom["image_url"]).content)))
    # 12-bit stored values are rescaled to the full range, so the display matches the 8-bit source.
    assert shown.dtype == np.uint8 and shown.shape == (H, W)
    assert np.abs(shown.astype(int) - image).max() <= 1


def test_multiframe_dicom_is_a_cine_loop_or_one_chosen_frame(client, image, tmp_path, image_id):
    path = write_dicom(tmp_path / "cine.dcm", np.stack([image, image[::-1]]))
    loop = upload(client, path.read_bytes(), "cine.dcm", "application/dicom")
    assert loop.status_code == 200 and loop.json()["frames"] == 2  # tests/test_serve_cine_seg.py: the rest
    chosen = client.post("/api/images?frame=1", files={"file": ("cine.dcm", path.read_bytes(), "application/dicom")})
    assert chosen.status_code == 200 and chosen.json()["height"] == H
    assert_still_serving(client, image_id)


# --- errors ------------------------------------------------------------------------------------

def _truncated_png() -> bytes:
    return encode(make_phantom(5, (H, W)).image)[:300]


def _gif() -> bytes:
    return encode(np.zeros((8, 8), np.uint8), "GIF")


@pytest.mark.parametrize(
    ("name", "data", "ctype", "status", "message"),
    [
        ("scan.png", b"this is not an image at all", "image/png", 400, "cannot decode the upload as PNG"),
        ("scan.png", "truncated", "image/png", 400, "truncated"),
        ("blob", b"\x00\x01\x02 random bytes", "application/octet-stream", 400, "not a PNG, JPEG or DICOM"),
        ("scan.png", b"", "image/png", 400, "empty"),
        ("notes.txt", b"hello", "text/plain", 415, "unsupported file type"),
        ("scan.gif", "gif", "image/gif", 415, "GIF"),
        ("report.pdf", b"%PDF-1.4 ...", "application/octet-stream", 415, "PDF"),
        ("big.png", "oversized", "image/png", 413, "exceeds the limit"),
    ],
    ids=["garbage", "truncated", "unknown-bytes", "empty", "text", "gif", "pdf", "oversized"],
)
def test_upload_errors(client, image_id, name, data, ctype, status, message):
    data = {"truncated": _truncated_png(), "gif": _gif(),
            "oversized": b"\x89PNG\r\n\x1a\n" + bytes(int(MAX_UPLOAD_MB * 2**20) + 1)}.get(data, data)
    response = upload(client, data, name, ctype)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert message in detail
    assert "/tmp" not in detail  # no server paths in messages
    assert_still_serving(client, image_id)


def test_file_just_over_the_limit_is_413_even_with_small_framing(model, image):
    client = local_client(create_app(model, max_upload_mb=0.01))
    big = encode(np.random.default_rng(0).integers(0, 255, (H, W), dtype=np.uint8))
    assert len(big) > 0.01 * 2**20
    response = upload(client, big)
    assert response.status_code == 413 and "exceeds the limit" in response.json()["detail"]
    assert upload(client, encode(image[:40, :40].copy())).status_code == 200


def test_chunked_oversized_upload_is_cut_off(client, image_id):
    def body():
        for _ in range(40):
            yield b"x" * 16384  # no Content-Length: counted as it arrives

    response = client.post("/api/images", content=body(),
                           headers={"Content-Type": "multipart/form-data; boundary=zz"})
    assert response.status_code == 413
    assert_still_serving(client, image_id)


def test_image_over_the_pixel_limit_is_413(model, image):
    client = local_client(create_app(model, max_pixels=10_000))
    response = upload(client, encode(image))
    assert response.status_code == 413 and f"{W} x {H}" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"box": [100, 10, 200, 90]}, "outside the image"),
        ({"box": [-3, 10, 50, 90]}, "outside the image"),
        ({"box": [50, 10, 50, 90]}, "degenerate box"),
        ({"box": [60, 10, 40, 90]}, "degenerate box"),
        ({"points": [[W + 5, 10]], "labels": [1]}, "outside the image"),
        ({"points": [[10, 10]]}, "need labels"),
        ({"points": [[10, 10]], "labels": [1, 0]}, "does not match"),
        ({"points": [[10, 10]], "labels": [2]}, "labels must be 1"),
        ({"box": BOX, "labels": [1]}, "labels but no points"),
        ({}, "give a box or points"),
        ({"box": [1, 2, 3]}, "at least 4"),
        ({"box": "wide"}, "valid list"),
    ],
)
def test_bad_prompts_are_422_with_the_predictors_message(client, image_id, body, message):
    response = client.post(f"/api/images/{image_id}/predict", json=body)
    assert response.status_code == 422
    assert message in str(response.json()["detail"])
    assert "np.float" not in str(response.json()["detail"])
    assert_still_serving(client, image_id)


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/api/images/nope/predict"), ("get", "/api/images/nope/mask.png"),
     ("get", "/api/images/nope/image.png"), ("delete", "/api/images/nope")],
)
def test_unknown_id_is_404(client, image_id, method, path):
    kwargs = {"json": {"box": BOX}} if method == "post" else {}
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == 404 and "unknown image id" in response.json()["detail"]
    assert_still_serving(client, image_id)


def test_mask_before_any_prompt_is_404(client, image):
    image_id = upload(client, encode(image)).json()["id"]
    response = client.get(f"/api/images/{image_id}/mask.png")
    assert response.status_code == 404 and "no mask yet" in response.json()["detail"]


def test_cache_is_lru_and_bounded(model, image):
    client = local_client(create_app(model, cache_size=2))
    a, b = (upload(client, encode(image)).json()["id"] for _ in range(2))
    assert client.post(f"/api/images/{a}/predict", json={"box": BOX}).status_code == 200  # a is now recent
    c = upload(client, encode(image)).json()["id"]
    assert client.post(f"/api/images/{b}/predict", json={"box": BOX}).status_code == 404
    for kept in (a, c):
        assert client.post(f"/api/images/{kept}/predict", json={"box": BOX}).status_code == 200
    assert client.get("/api/health").json()["cached_images"] == 2
    assert client.delete(f"/api/images/{a}").status_code == 204
    assert client.get(f"/api/images/{a}/image.png").status_code == 404


def test_model_calls_are_serialised():
    """Concurrent requests never run two predictor calls at once (the predictor is not re-entrant)."""
    state = {"active": 0, "max_active": 0, "calls": 0}
    guard = threading.Lock()

    class SlowPredictor:
        def _enter(self):
            with guard:
                state["active"] += 1
                state["calls"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
            time.sleep(0.03)
            with guard:
                state["active"] -= 1

        def set_image(self, image):
            self.hw = image.shape[:2]
            self._enter()

        def predict(self, box=None, points=None, labels=None, multimask=False):
            self._enter()
            return np.zeros((1, *self.hw), bool), np.array([0.5], np.float32), None

    client = local_client(create_app(SlowPredictor, serve_static=False))
    png = encode(np.zeros((40, 50), np.uint8))
    ids = [upload(client, png).json()["id"] for _ in range(2)]
    state["max_active"] = 0

    def call(i):
        if i % 3 == 0:
            return upload(client, png).status_code
        return client.post(f"/api/images/{ids[i % 2]}/predict", json={"box": [0, 0, 10, 10]}).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(call, range(18)))
    assert codes == [200] * 18
    assert state["max_active"] == 1


# --- documentation, page, command line ---------------------------------------------------------

def test_openapi_documents_the_endpoints(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/api/images"]) == {"post"}
    assert {"400", "413", "415"} <= set(paths["/api/images"]["post"]["responses"])
    assert {"404", "422"} <= set(paths["/api/images/{image_id}/predict"]["post"]["responses"])
    for path in ("/api/images/{image_id}/mask.png", "/api/images/{image_id}/image.png", "/api/health"):
        assert "get" in paths[path]
    request = schema["components"]["schemas"]["PredictRequest"]["properties"]
    for field in ("box", "points", "labels", "multimask"):
        assert request[field]["description"]
    response = schema["components"]["schemas"]["PredictResponse"]["properties"]
    assert "mask_png_base64" in response and response["score"]["description"]


def test_page_and_its_files_are_served(client):
    # A browser of its own: the page sets a session cookie, which would move the shared client
    # (a cookie-less API client until now) into another session than its uploads.
    client = local_client(client.app)
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for label in ("Open image", "Box mode", "Point mode", "Positive point", "Negative point", "Undo", "Clear",
                  "Download mask"):
        assert f'aria-label="{label}"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert client.get(f"/{name}").status_code == 200
        assert (STATIC_DIR / name).is_file()


def _serve_parser():
    # Only this command's parser: the full CLI also imports every other command module.
    parser = argparse.ArgumentParser(prog="uniultra")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_command_is_registered_and_defaults_to_loopback():
    assert "uniultra.commands.serve" in COMMAND_MODULES
    args = _serve_parser().parse_args(["serve"])
    assert (args.model, args.host, args.port, args.max_upload_mb, args.cache_size) == (
        "default", "127.0.0.1", 8000, 20.0, 8)
    assert is_local("127.0.0.1") and is_local("localhost") and is_local("::1") and is_local("127.0.0.2")
    assert not is_local("0.0.0.0") and not is_local("192.168.1.5") and not is_local("example.org")
    assert "WARNING" in exposure_warning("0.0.0.0", 8000)


def test_serve_command_warns_loudly_off_loopback(monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))

    def serve(*argv):
        args = _serve_parser().parse_args(["serve", "--model", "preset:mini", "--size", "128", *argv])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights
            return args.func(args)

    monkeypatch.delenv("UNIULTRA_TOKEN", raising=False)
    with pytest.raises(ValueError, match="refusing to start without an access token"):
        serve("--host", "0.0.0.0", "--port", "9")
    assert calls == []
    assert serve("--host", "0.0.0.0", "--port", "9", "--token", "s3cret") == 0
    assert calls == [{"host": "0.0.0.0", "port": 9, "log_level": "info"}]
    captured = capsys.readouterr()
    assert "WARNING" in captured.err and "0.0.0.0:9" in captured.err
    assert "no encryption" in captured.err.replace("\n", " ")
    assert "/?token=s3cret" in captured.out
    monkeypatch.setenv("UNIULTRA_TOKEN", "from-env")
    assert serve("--host", "192.168.1.5") == 0 and "/?token=from-env" in capsys.readouterr().out
    monkeypatch.delenv("UNIULTRA_TOKEN")
    assert serve() == 0
    assert calls[-1]["host"] == "127.0.0.1" and "WARNING" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="cache-size"):
        serve("--cache-size", "0")


# --- hardening: body limits, Host allow-list, token, sessions, decodes, offline docs ----------------

@pytest.mark.parametrize(("method", "path"), [
    ("post", "/api/images/{id}/predict"), ("post", "/api/images/{id}/auto"), ("delete", "/api/images/{id}"),
    ("get", "/api/health")])
def test_every_endpoint_limits_its_body(client, image_id, method, path):
    body = b'{"box": [' + b"1, " * 40_000 + b"2]}"  # 120 KB of JSON
    response = client.request(method.upper(), path.format(id=image_id), content=body,
                              headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    assert "exceeds the limit of 64 KB" in response.json()["detail"]
    assert_still_serving(client, image_id)


def test_requests_for_other_host_names_are_refused(model):
    app = create_app(model, serve_static=False, allowed_hosts=["localhost", "127.0.0.1", "::1", "scanner.local"])
    client = TestClient(app)  # Host: testserver
    response = client.get("/api/health")
    assert response.status_code == 400
    assert "host 'testserver' is not allowed" in response.json()["detail"]
    assert "--allow-host testserver" in response.json()["detail"]
    assert client.get("/api/health", headers={"Host": "evil.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "Scanner.Local"):
        assert client.get("/api/health", headers={"Host": host}).status_code == 200, host
    assert TestClient(create_app(model, serve_static=False, allowed_hosts=["*"])).get("/api/health").status_code == 200


def test_token_is_required_on_every_endpoint(model, image):
    client = local_client(create_app(model, token="s3cret"))
    for method, path in [("get", "/api/health"), ("post", "/api/images"), ("get", "/api/images/x/mask.png"),
                         ("post", "/api/images/x/predict"), ("delete", "/api/images/x"), ("get", "/docs"),
                         ("get", "/openapi.json"), ("get", "/"), ("get", "/app.js"), ("get", "/?token=wrong")]:
        response = client.request(method.upper(), path)
        assert response.status_code == 401, (method, path)
        assert "access token" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
    bearer = {"Authorization": "Bearer s3cret"}
    assert client.get("/api/health", headers=bearer).status_code == 200
    assert client.get("/api/health", headers={"Authorization": "Bearer s3cre"}).status_code == 401
    uploaded = client.post("/api/images", files={"file": ("a.png", encode(image), "image/png")}, headers=bearer)
    assert uploaded.status_code == 200
    # The page's login: the token from the printed address moves into an HttpOnly cookie.
    login = client.get("/?token=s3cret", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/"
    assert "httponly" in login.headers["set-cookie"].lower()
    assert client.get("/").status_code == 200 and client.get("/api/health").status_code == 200


def test_each_client_has_its_own_bounded_cache(model, image):
    app = create_app(model, cache_size=2, total_cache_size=3)
    alice, bob = local_client(app), local_client(app)
    for browser in (alice, bob):
        assert browser.get("/").status_code == 200  # the page gives each browser its session cookie
    assert alice.cookies["uniultra_session"] != bob.cookies["uniultra_session"]
    a1 = upload(alice, encode(image)).json()["id"]
    assert bob.post(f"/api/images/{a1}/predict", json={"box": BOX}).status_code == 404
    assert bob.get(f"/api/images/{a1}/image.png").status_code == 404
    assert bob.delete(f"/api/images/{a1}").status_code == 404
    b1, b2 = (upload(bob, encode(image)).json()["id"] for _ in range(2))
    assert alice.post(f"/api/images/{a1}/predict", json={"box": BOX}).status_code == 200  # bob evicted nothing of hers
    health = alice.get("/api/health").json()
    assert (health["cached_images"], health["cached_images_total"], health["total_cache_size"]) == (1, 3, 3)
    a2 = upload(alice, encode(image)).json()["id"]  # 4 > 3 for the server: the least recent image (b1) goes
    assert bob.get(f"/api/images/{b1}/image.png").status_code == 404
    assert bob.get(f"/api/images/{b2}/image.png").status_code == 200
    for kept in (a1, a2):
        assert alice.get(f"/api/images/{kept}/image.png").status_code == 200


def test_concurrent_decodes_are_bounded():
    class SlowPredictor:
        def set_image(self, image):
            time.sleep(0.4)

    app = create_app(SlowPredictor, serve_static=False, max_decodes=1, decode_wait_s=0.05)
    client = local_client(app)
    png = encode(np.zeros((20, 30), np.uint8))
    with ThreadPoolExecutor(max_workers=2) as pool:
        responses = list(pool.map(lambda _: upload(client, png), range(2)))
    assert sorted(r.status_code for r in responses) == [200, 503]
    busy = next(r for r in responses if r.status_code == 503)
    assert "busy" in busy.json()["detail"] and busy.headers["retry-after"]
    assert upload(client, png).status_code == 200  # the slot is free again


def test_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    for text in ("/api/images/{image_id}/predict", "PredictRequest", "mask_png_base64", "413"):
        assert text in html
    assert "http://" not in html and "https://" not in html and "//" not in html.replace("<!doctype", "")
    assert "<script" not in html and "style=" not in html  # nothing the Content-Security-Policy would block
    links = re.findall(r'(?:href|src)="([^"]*)"', html)
    assert links and all(link.startswith(("/", "#")) for link in links)
    style = client.get("/docs.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert client.get("/redoc").status_code == 404


def test_a_users_auto_predictor_without_a_per_call_gate_answers_its_own_gate():
    """A factory's predictor with only `predict_auto(modality)` (no presence-gate API) still serves the
    automatic mode: health says its gate is unknown, 'calibrated' answers, another gate is refused."""

    class OwnAutoPredictor:
        def set_image(self, image):
            self.hw = image.shape[:2]

        def predict(self, box=None, points=None, labels=None, multimask=False):
            return np.zeros((1, *self.hw), bool), np.array([0.5], np.float32), None

        def predict_auto(self, modality=None):
            mask = np.zeros(self.hw, bool)
            mask[5:15, 10:30] = True
            return mask, 0.8, None

    client = local_client(create_app(OwnAutoPredictor, serve_static=False))
    health = client.get("/api/health").json()
    assert health["auto"] is True and health["presence_gate"] is None
    image_id = upload(client, encode(np.zeros((40, 50), np.uint8))).json()["id"]
    answer = client.post(f"/api/images/{image_id}/auto", json={})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["presence_gate"] is None and body["foreground_pixels"] == 200
    assert body["score"] == pytest.approx(0.8)
    refused = client.post(f"/api/images/{image_id}/auto", json={"presence_gate": 0.5})
    assert refused.status_code == 422 and "no per-call presence gate" in refused.json()["detail"]
