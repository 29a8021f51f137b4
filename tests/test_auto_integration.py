"""The automatic (no-prompt) mode as users reach it: AutoPredictor, `evaluate --prompt none`,
`predict --prompt none` (one image, folder) and the web app's auto endpoint.

A random-weight mini model at 128 px gets a two-channel head (busi, ddti). The ddti channel's
hypernetwork is zeroed, so its logits are exactly 0 and its masks exactly empty: that makes the
empty-truth scoring (a correct empty mask = Dice 1) testable without a trained model.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dataset_factory import blob_mask, write_pair
from uniultra.cli import main
from uniultra.data.phantom import make_phantom
from uniultra.inference.auto_predictor import AutoPredictor, choose_modality
from uniultra.inference.loading import load_auto_model, load_predictor
from uniultra.inference.predictor import Predictor
from uniultra.inference.presence_gate import answers_empty, gate_in_force
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.auto_segmenter import ABSENT_LOGIT, AutoHeadConfig, AutoSegmenter
from uniultra.models.checkpoint import save_model
from uniultra.models.image_model import SAM2ImageModel

H, W = 120, 160
SIZE = 128


def _auto_model() -> AutoSegmenter:
    torch.manual_seed(0)
    model = AutoSegmenter(SAM2ImageModel.from_preset("mini", image_size=SIZE), AutoHeadConfig(("busi", "ddti")))
    with torch.no_grad():
        for parameter in model.modality_decoder.hypernetworks[1].layers[-1].parameters():
            parameter.zero_()  # ddti: mask weights 0 -> logits 0 -> nothing above the 0 threshold
    return model.eval()


@pytest.fixture(scope="module")
def auto_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "auto.pt"
    save_auto_model(_auto_model(), path)
    return str(path)


@pytest.fixture(scope="module")
def plain_path(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_model(SAM2ImageModel.from_preset("mini", SIZE), tmp_path_factory.mktemp("plain") / "mini.pt"))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_phantom(3, (H, W)).image


def _write_set(root):
    """One lesion image and one normal image (empty mask)."""
    write_pair(root, "lesion", blob_mask())
    write_pair(root, "normal", np.zeros((48, 64), bool))
    return root


@pytest.fixture(scope="module")
def ddti(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("sets") / "ddti")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    return _write_set(tmp_path_factory.mktemp("sets") / "other")


# --- AutoPredictor --------------------------------------------------------------------------------

def test_auto_predictor_shapes_threshold_and_channels(auto_path, image):
    predictor = load_predictor(auto_path)
    assert isinstance(predictor, AutoPredictor) and predictor.modality_choices == ("busi", "ddti")
    predictor.set_image(image)
    mask, score, low_res = predictor.predict_auto("busi")
    assert mask.shape == (H, W) and mask.dtype == bool and mask.any()
    assert 0.0 <= score <= 1.0 and low_res.shape == (SIZE // 4, SIZE // 4)
    logits, _, _ = predictor.predict_auto("busi", return_logits=True)
    assert logits.shape == (H, W) and logits.dtype == np.float32
    np.testing.assert_array_equal(mask, logits > 0.0)
    assert not predictor.predict_auto("ddti")[0].any()
    predictor.mask_threshold = float(logits.max())
    assert not predictor.predict_auto("busi")[0].any()


def test_auto_predictor_modality_errors_name_the_choices(auto_path, image):
    predictor = load_predictor(auto_path)
    predictor.set_image(image)
    with pytest.raises(ValueError, match=r"unknown modality 'xyz'.*busi.*ddti"):
        predictor.predict_auto("xyz")
    with pytest.raises(ValueError, match="name one of"):
        predictor.predict_auto(None)  # two channels: the caller must choose
    with pytest.raises(ValueError, match="unknown modality"):
        predictor.modality = "xyz"
    predictor.modality = "ddti"
    assert not predictor.predict_without_prompt()[0].any()


def test_auto_predictor_shares_preprocessing_encoding_and_box_prompts(auto_path, image):
    auto = load_auto_model(auto_path)
    predictor, plain = AutoPredictor(auto), Predictor(auto.base)
    encodes = []
    encode = auto.encode_image
    auto.encode_image = lambda x: encodes.append(1) or encode(x)
    predictor.set_image(image)
    plain.set_image(image)
    torch.testing.assert_close(predictor._features.image_embed, plain._features.image_embed, rtol=0, atol=0)
    predictor.predict_auto("busi")
    predictor.predict_auto("ddti")
    assert len(encodes) == 1  # one embedding serves every decode
    box = [20, 15, 110, 95]
    np.testing.assert_array_equal(predictor.predict(box=box)[0], plain.predict(box=box)[0])
    unprompted, iou, low_res = plain.predict_without_prompt()  # the plain decoder's no-prompt baseline
    assert unprompted.shape == (H, W) and unprompted.dtype == bool and isinstance(iou, float)
    assert low_res.shape == (SIZE // 4, SIZE // 4)


def test_modality_choice_follows_request_then_dataset_then_single_channel(auto_path):
    predictor = load_predictor(auto_path)
    assert choose_modality(predictor, None, "busi") == "busi"
    assert choose_modality(predictor, "ddti", "busi") == "ddti"
    with pytest.raises(ValueError, match="--modality NAME"):
        choose_modality(predictor, None, "other")
    single = AutoPredictor(AutoSegmenter(SAM2ImageModel.from_preset("mini", image_size=SIZE), AutoHeadConfig()))
    assert choose_modality(single, None, "other") == "any"


def test_auto_checkpoint_refuses_another_size(auto_path):
    with pytest.raises(ValueError, match="trained at"):
        load_predictor(auto_path, image_size=256)


# --- evaluate --prompt none -----------------------------------------------------------------------

def _evaluate(tmp_path, model, data, *extra):
    out = tmp_path / "results.json"
    code = main(["evaluate", "--model", model, "--data", str(data), "--prompt", "none", "--out", str(out),
                 "--no-progress", *extra])
    return code, json.loads(out.read_text()) if code == 0 else None


def test_evaluate_none_scores_empty_truth_images(auto_path, ddti, tmp_path, capsys):
    code, document = _evaluate(tmp_path, auto_path, ddti)
    assert code == 0
    summary = document["datasets"]["ddti"]
    assert summary["modality"] == "ddti"  # the folder's name picks the channel
    assert summary["n"] == 2 and summary["n_skipped"] == 0 and summary["n_empty_truth"] == 1
    # ddti predicts nothing: right on the normal image (Dice 1), wrong on the lesion (Dice 0).
    assert summary["dice_truth_empty"]["mean"] == 1.0 and summary["dice_truth_empty"]["n"] == 1
    assert summary["dice_truth_nonempty"]["mean"] == 0.0 and summary["n_empty_pred"] == 1
    assert summary["dice"]["mean"] == 0.5
    table = capsys.readouterr().out
    assert "empty_truth" in table and "Dice% empty" in table and "ddti" in table


def test_evaluate_modality_override_and_errors(auto_path, ddti, other, tmp_path, capsys):
    code, document = _evaluate(tmp_path, auto_path, ddti, "--modality", "busi")
    assert code == 0 and document["datasets"]["ddti"]["modality"] == "busi"
    assert "--modality busi" in document["command"]
    assert _evaluate(tmp_path, auto_path, ddti, "--modality", "xyz")[0] == 2
    assert "unknown modality 'xyz'" in capsys.readouterr().err
    assert _evaluate(tmp_path, auto_path, other)[0] == 2  # 'other' is no channel of this model
    err = capsys.readouterr().err
    assert auto_path in err and "--modality NAME" in err


def test_evaluate_none_with_a_plain_model_runs_the_unprompted_decoder(plain_path, ddti, tmp_path, capsys):
    code, document = _evaluate(tmp_path, plain_path, ddti)
    assert code == 0
    summary = document["datasets"]["ddti"]
    assert summary["n"] == 2 and summary["n_empty_truth"] == 1 and summary["modality"] is None
    assert _evaluate(tmp_path, plain_path, ddti, "--modality", "busi")[0] == 2
    assert "no automatic head" in capsys.readouterr().err


def test_evaluate_prompted_modes_still_skip_empty_masks(auto_path, ddti, capsys):
    # An auto checkpoint answers box prompts through its base model.
    assert main(["evaluate", "--model", auto_path, "--data", str(ddti), "--prompt", "box", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "empty_truth" not in table and "modality" not in table
    assert main(["evaluate", "--model", auto_path, "--data", str(ddti), "--prompt", "box",
                 "--modality", "busi", "--no-progress"]) == 2
    assert "with --prompt none" in capsys.readouterr().err


# --- predict --prompt none ------------------------------------------------------------------------

def test_predict_one_image_without_prompt(auto_path, plain_path, image, tmp_path, capsys):
    source = tmp_path / "scan.png"
    Image.fromarray(image).save(source)
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    assert main(["predict", "--model", auto_path, "--image", str(source), "--prompt", "none", "--modality", "busi",
                 "--out", str(out), "--overlay", str(overlay)]) == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 255} and mask.any()
    assert Image.open(overlay).size == (W, H)
    capsys.readouterr()
    assert main(["predict", "--model", auto_path, "--image", str(source), "--prompt", "none",
                 "--out", str(out)]) == 2  # two channels and no --modality
    assert "--modality NAME" in capsys.readouterr().err
    assert main(["predict", "--model", plain_path, "--image", str(source), "--prompt", "none",
                 "--out", str(out)]) == 2
    assert "no automatic head" in capsys.readouterr().err
    assert main(["predict", "--model", plain_path, "--image", str(source), "--out", str(out)]) == 2
    assert "--prompt none" in capsys.readouterr().err
    assert main(["predict", "--model", auto_path, "--image", str(source), "--prompt", "none",
                 "--box", "1", "2", "30", "40", "--out", str(out)]) == 2
    assert "takes no prompts" in capsys.readouterr().err


def test_predict_folder_without_prompt_includes_empty_masks(auto_path, ddti, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["predict", "--model", auto_path, "--input", str(ddti), "--output", str(output),
                 "--prompt", "none", "--no-progress"]) == 0
    assert sorted(p.name for p in (output / "masks").iterdir()) == ["lesion.png", "normal.png"]
    assert not np.asarray(Image.open(output / "masks" / "normal.png")).any()  # the ddti channel is silent
    assert "mean Dice 50.00" in capsys.readouterr().out
    plain = tmp_path / "plain"
    write_pair(plain, "x", blob_mask())
    (plain / "masks" / "x.png").unlink()
    (plain / "masks").rmdir()
    assert main(["predict", "--model", auto_path, "--input", str(plain / "images"), "--output", str(tmp_path / "o2"),
                 "--prompt", "none", "--modality", "busi", "--no-progress"]) == 0
    assert (tmp_path / "o2" / "masks" / "x.png").is_file()


# --- the web app ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def serve_client():
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
    pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx")
    with warnings.catch_warnings():  # starlette's notice about httpx, raised on import
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from uniultra.serve.app import create_app

    # The app answers only to local host names (its Host allow-list); TestClient says "testserver".
    return lambda model: TestClient(create_app(model, cache_size=4), base_url="http://localhost")


def _upload(client, image) -> str:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    response = client.post("/api/images", files={"file": ("scan.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_serve_auto_endpoint_reuses_the_embedding(serve_client, auto_path, image):
    import base64
    import io

    model = load_auto_model(auto_path)
    client = serve_client(model)
    health = client.get("/api/health").json()
    assert health["auto"] is True and health["modalities"] == ["busi", "ddti"]
    image_id = _upload(client, image)
    encodes = []
    encode = model.encode_image
    model.encode_image = lambda x: encodes.append(1) or encode(x)
    response = client.post(f"/api/images/{image_id}/auto", json={"modality": "busi"})
    assert response.status_code == 200, response.text
    body = response.json()
    boxed = client.post(f"/api/images/{image_id}/predict", json={"box": [20, 15, 110, 95]})
    assert boxed.status_code == 200 and set(body) == set(boxed.json())  # one response shape
    assert encodes == []  # decoder only: the upload's embedding is reused
    expected = AutoPredictor(model)
    expected.set_image(image)
    mask, score, _ = expected.predict_auto("busi")
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png_base64"])))) > 127
    np.testing.assert_array_equal(served, mask)
    assert body["score"] == pytest.approx(score) and body["box"] is None and body["points"] == []
    assert client.post(f"/api/images/{image_id}/auto", json={"modality": "ddti"}).json()["foreground_pixels"] == 0


def test_serve_auto_errors_are_clear_and_the_server_goes_on(serve_client, auto_path, plain_path, image):
    from uniultra.inference.loading import load_model

    client = serve_client(load_auto_model(auto_path))
    image_id = _upload(client, image)
    for body, needle in (({"modality": "xyz"}, "unknown modality 'xyz'"), ({}, "name one of")):
        response = client.post(f"/api/images/{image_id}/auto", json=body)
        assert response.status_code == 422 and needle in response.json()["detail"]
    assert client.post("/api/images/nope/auto", json={}).status_code == 404
    assert client.post(f"/api/images/{image_id}/auto", json={"modality": "ddti"}).status_code == 200

    assert client.get("/api/health").json()["locates_taps"] is False  # a head, but not zoomed
    plain = serve_client(load_model(plain_path))
    assert plain.get("/api/health").json()["auto"] is False
    response = plain.post(f"/api/images/{_upload(plain, image)}/auto", json={"modality": None})
    assert response.status_code == 409 and "no automatic head" in response.json()["detail"]
    page = plain.get("/").text
    assert 'aria-label="Automatic segmentation"' in page and 'id="modality"' in page
    assert "/api/images/{image_id}/auto" in plain.get("/openapi.json").json()["paths"]


def test_any_checkpoint_file_is_read_once(auto_path, plain_path, monkeypatch):
    import uniultra.models.checkpoint as checkpoint
    from uniultra.inference.loading import load_any_model

    reads = []
    original = checkpoint.read_checkpoint

    def counting(path):
        reads.append(str(path))
        return original(path)

    monkeypatch.setattr(checkpoint, "read_checkpoint", counting)
    monkeypatch.setattr("uniultra.inference.loading.read_checkpoint", counting)
    monkeypatch.setattr("uniultra.models.auto_checkpoint.read_checkpoint", counting)
    assert isinstance(load_any_model(auto_path), AutoSegmenter)
    assert type(load_any_model(plain_path)) is SAM2ImageModel
    assert reads == [str(auto_path), str(plain_path)]


def test_serve_tap_is_located_through_the_chosen_channel_and_the_choice_is_per_request(serve_client, image):
    import base64
    import io

    from uniultra.inference.zoom import ZoomPredictor

    model = _auto_model()
    model.base.inference = {"zoom": {"margin": 1.4}}  # a zoomed model with a head, as the bundled default
    client = serve_client(model)
    assert client.get("/api/health").json()["locates_taps"] is True  # the page then sends its modality with taps
    image_id = _upload(client, image)
    heads = []
    decode_auto = model.decode_auto
    model.decode_auto = lambda *a, **k: heads.append(1) or decode_auto(*a, **k)
    tap = {"points": [[80, 60]], "labels": [1]}

    def served(body) -> np.ndarray:
        response = client.post(f"/api/images/{image_id}/predict", json=body)
        assert response.status_code == 200, response.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["mask_png_base64"])))) > 127

    located = served({**tap, "modality": "busi"})
    assert len(heads) == 1  # the head was read for the tap
    local = ZoomPredictor(AutoPredictor(model), 1.4)
    local.set_image(image)
    local.modality = "busi"
    np.testing.assert_array_equal(located, local.predict(points=[[80, 60]], labels=[1])[0][0])
    heads.clear()
    served(tap)
    assert heads == []  # no modality in the next request: the shared predictor did not keep it
    for body, needle in (({**tap, "modality": "xyz"}, "unknown modality"),
                         ({"box": [20, 15, 110, 95], "modality": "busi"}, "points only")):
        response = client.post(f"/api/images/{image_id}/predict", json=body)
        assert response.status_code == 422 and needle in response.json()["detail"], response.text


# --- --presence-gate --------------------------------------------------------------------------------

def test_predict_presence_gate_overrides_the_checkpoint(auto_path, plain_path, image, tmp_path, capsys):
    source, out = tmp_path / "scan.png", tmp_path / "mask.png"
    Image.fromarray(image).save(source)
    command = ["predict", "--model", auto_path, "--image", str(source), "--prompt", "none", "--modality", "busi",
               "--out", str(out)]
    assert main([*command, "--presence-gate", "off"]) == 0
    assert np.asarray(Image.open(out)).any() and "(no gate: the head always answers)" in capsys.readouterr().out
    assert main([*command, "--presence-gate", "1"]) == 0  # a probability below 1 is gated: nothing here
    assert not np.asarray(Image.open(out)).any()
    printed = capsys.readouterr().out
    assert "gate 1.000 (below it: answered empty)" in printed and "0 foreground pixels" in printed
    assert main([*command, "--presence-gate", "0"]) == 0
    assert np.asarray(Image.open(out)).any() and "gate 0.000 (at or above it: answered)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*command, "--presence-gate", "1.5"])
    assert "a probability in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["predict", "--model", plain_path, "--image", str(source), "--box", "10", "10", "60", "60",
                 "--out", str(out), "--presence-gate", "0.5"]) == 2
    assert "--presence-gate applies to a model with an automatic head" in capsys.readouterr().err


def test_evaluate_presence_gate(auto_path, ddti, tmp_path):
    code, document = _evaluate(tmp_path, auto_path, ddti, "--modality", "busi", "--presence-gate", "1")
    summary = document["datasets"]["ddti"]
    # every answer emptied: the normal scan right (Dice 1), the lesion missed (counted in n_empty_pred)
    assert code == 0 and summary["n_empty_pred"] == 1
    assert summary["dice_truth_empty"]["mean"] == 1.0 and summary["dice_truth_nonempty"]["mean"] == 0.0
    assert "--presence-gate 1.0" in document["command"]
    code, document = _evaluate(tmp_path, auto_path, ddti, "--modality", "busi", "--presence-gate", "off")
    assert code == 0 and document["datasets"]["ddti"]["dice_truth_empty"]["mean"] == 0.0  # busi answers both


def test_presence_gate_words_and_numbers():
    assert gate_in_force("calibrated", 0.4) == 0.4 and gate_in_force("calibrated", None) is None
    assert gate_in_force("off", 0.4) is None and gate_in_force(0, 0.4) == 0.0 and gate_in_force(1, None) == 1.0
    for bad in (1.5, -0.1, float("nan"), "0.5", "on", True, None):
        with pytest.raises(ValueError, match="a presence gate is 'calibrated', 'off' or a probability"):
            gate_in_force(bad, 0.4)
    assert answers_empty(0.3, 0.4) and not answers_empty(0.4, 0.4) and not answers_empty(0.0, None)


def test_a_call_chooses_its_gate_and_leaves_the_checkpoints(auto_path, image):
    predictor = load_predictor(auto_path)
    predictor.set_presence_gate(0.5)  # as if calibrated to 0.5
    predictor.set_image(image)
    free, score, _ = predictor.predict_auto("busi", presence_gate="off")
    assert free.any() and 0.0 < score < 1.0
    below, above = max(0.0, score - 1e-3), min(1.0, score + 1e-3)
    np.testing.assert_array_equal(predictor.predict_auto("busi", presence_gate=below)[0], free)
    emptied, same_score, _ = predictor.predict_auto("busi", presence_gate=above)
    assert not emptied.any() and same_score == pytest.approx(score)
    logits = predictor.predict_auto("busi", return_logits=True, presence_gate=above)[0]
    assert float(logits.max()) == ABSENT_LOGIT
    assert predictor.resolve_presence_gate() == 0.5 and predictor.auto.config.presence_threshold == 0.5
    expected = free if score >= 0.5 else np.zeros_like(free)
    np.testing.assert_array_equal(predictor.predict_auto("busi")[0], expected)  # the checkpoint's gate
    with pytest.raises(ValueError, match="probability in"):
        predictor.predict_auto("busi", presence_gate=2.0)


def test_serve_auto_takes_a_presence_gate_per_request(serve_client, auto_path, image):
    model = load_auto_model(auto_path)
    model.config = dataclasses.replace(model.config, presence_threshold=0.25)
    client = serve_client(model)
    assert client.get("/api/health").json()["presence_gate"] == 0.25
    image_id = _upload(client, image)
    url = f"/api/images/{image_id}/auto"
    free = client.post(url, json={"modality": "busi", "presence_gate": "off"}).json()
    assert free["foreground_pixels"] > 0 and free["presence_gate"] is None
    gated = client.post(url, json={"modality": "busi", "presence_gate": 1}).json()
    assert gated["foreground_pixels"] == 0 and gated["presence_gate"] == 1.0
    assert gated["score"] == pytest.approx(free["score"])
    default = client.post(url, json={"modality": "busi"}).json()
    assert default["presence_gate"] == 0.25 and model.config.presence_threshold == 0.25  # nothing was kept
    for bad in (1.5, "on", -1):
        response = client.post(url, json={"modality": "busi", "presence_gate": bad})
        assert response.status_code == 422, response.text
    boxed = client.post(f"/api/images/{image_id}/predict", json={"box": [20, 15, 110, 95]}).json()
    assert boxed["presence_gate"] is None
