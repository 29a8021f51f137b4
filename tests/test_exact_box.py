"""Exact-box tokens: a box said to touch its object, as two more learned prompt-point types."""

from __future__ import annotations

import base64
import dataclasses
import io
import warnings

import numpy as np
import pytest
import torch

from uniultra.config_io import ConfigError
from uniultra.engine.config import TrainConfig, TrainPromptConfig, ZoomConfig
from uniultra.engine.trainer import build_model
from uniultra.engine.zoom_data import NativeSet, ZoomTrainSet
from uniultra.inference.loading import fresh_predictor
from uniultra.inference.predictor import Predictor
from uniultra.inference.zoom import ZoomPredictor, answer_tight_boxes
from uniultra.models.config import preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.models.prompt_labels import BOX_CORNER_LABELS, EXACT_BOX_CORNER_LABELS

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 120, 160
BOX = np.array([50.0, 40.0, 89.0, 79.0])


def model_config(exact: bool, size: int = 64):
    config = preset("mini", size)
    return dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, exact_box_tokens=exact))


@pytest.fixture(scope="module")
def exact_model() -> SAM2ImageModel:
    torch.manual_seed(0)
    model = SAM2ImageModel(model_config(True))
    with torch.no_grad():  # as if trained: the exact corners no longer equal the plain ones
        for embedding in model.sam_prompt_encoder.point_embeddings[4:]:
            embedding.weight.add_(torch.randn_like(embedding.weight))
    return model


def speckle() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.rayleigh(size=(H, W))
    return (image / image.max() * 255).astype(np.uint8)


def test_tokens_add_two_point_types_and_leave_every_other_weight_as_it_was():
    torch.manual_seed(0)
    plain = SAM2ImageModel(model_config(False)).state_dict()
    torch.manual_seed(0)
    exact = SAM2ImageModel(model_config(True)).state_dict()
    key = "sam_prompt_encoder.point_embeddings.{}.weight"
    assert set(exact) - set(plain) == {key.format(4), key.format(5)}
    assert all(torch.equal(plain[k], exact[k]) for k in plain)
    # they start as the plain corners: an untrained exact box reads as a box
    assert torch.equal(exact[key.format(4)], plain[key.format(2)])
    assert torch.equal(exact[key.format(5)], plain[key.format(3)])


def test_an_exact_box_is_answered_with_its_own_tokens(exact_model):
    predictor = Predictor(exact_model)
    predictor.set_image(speckle())
    plain = predictor.predict(box=BOX, return_logits=True)[0]
    exact = predictor.predict(box=BOX, return_logits=True, exact_box=True)[0]
    assert np.abs(plain - exact).max() > 1e-3
    with pytest.raises(ValueError, match="no box"):
        predictor.predict(points=[[60.0, 50.0]], labels=[1], exact_box=True)


def test_a_model_without_tokens_refuses_an_exact_box():
    torch.manual_seed(0)
    predictor = Predictor(SAM2ImageModel(model_config(False)))
    predictor.set_image(speckle())
    assert not predictor.supports_exact_box
    with pytest.raises(ValueError, match="exact_box_tokens"):
        predictor.predict(box=BOX, exact_box=True)


class Forkable(Predictor):
    """An export-backed predictor's `fork`, which `fresh_predictor` (the web app's cache) calls."""

    def fork(self) -> Forkable:
        return Forkable(self.model)


def test_tight_boxes_use_the_tokens_instead_of_padding(exact_model):
    image = speckle()
    by_hand = ZoomPredictor(Predictor(exact_model), margin=1.5)
    by_hand.exact_boxes = by_hand.clip_to_boxes = True
    by_hand.set_image(image)
    tight = ZoomPredictor(Forkable(exact_model), margin=1.5)
    answer_tight_boxes(tight, "test")
    assert tight.exact_boxes and tight.clip_to_boxes and tight.box_padding == 0
    tight.tap_regions = False
    twin = fresh_predictor(tight)
    assert twin.predictor is not tight.predictor and not twin.tap_regions and twin.clip_to_boxes
    plain = ZoomPredictor(Predictor(exact_model), margin=1.5)
    for predictor in (tight, twin, plain):
        predictor.set_image(image)
    expected = by_hand.predict(box=BOX, return_logits=True)[0]
    np.testing.assert_allclose(tight.predict(box=BOX, return_logits=True)[0], expected, atol=1e-6)
    np.testing.assert_allclose(twin.predict(box=BOX, return_logits=True)[0], expected, atol=1e-6)
    assert np.abs(plain.predict(box=BOX, return_logits=True)[0] - expected).max() > 1e-3


def _native_set() -> NativeSet:
    mask = np.zeros((H, W), bool)
    mask[30:50, 20:60] = True
    return NativeSet("s", ["a"], [speckle()], [mask], None, 16.0)


@pytest.mark.parametrize("exact_box", [0.0, 0.5, 1.0])
def test_training_samples_give_exact_boxes_with_their_tokens(exact_box):
    prompts = TrainPromptConfig(modes={"box": 1.0}, jitter=(30.0,), exact_box=exact_box)
    data = ZoomTrainSet([_native_set()], prompts, ZoomConfig(margin=(1.5, 1.5), intensity=0.0), 64, seed=0,
                        hflip=0.0)
    items = [data[(0, i)] for i in range(len(data))]
    exact = [item for item in items if tuple(item["labels"].tolist()) == EXACT_BOX_CORNER_LABELS]
    plain = [item for item in items if tuple(item["labels"].tolist()) == BOX_CORNER_LABELS]
    assert len(exact) + len(plain) == len(items) == 16
    assert (len(exact) == 0) == (exact_box == 0.0) and (len(plain) == 0) == (exact_box == 1.0)
    def outward(item) -> np.ndarray:
        """How far each side of the prompt box lies outside the target's own box (crop pixels)."""
        ys, xs = np.nonzero(item["target"].numpy())
        (x0, y0), (x1, y1) = item["coords"].numpy()
        return np.array([xs.min() - x0, ys.min() - y0, x1 - xs.max(), y1 - ys.max()])

    for item in exact:
        assert np.abs(outward(item)).max() <= 1.5
    if plain:  # J = 30 on a 160 px image pushes sides out by up to 4.7 native px, 2.5 on average
        assert np.mean([outward(item) for item in plain]) > 1.0


def test_exact_boxes_in_training_need_the_tokens():
    with pytest.raises(ValueError, match="exact_box"):
        TrainPromptConfig(exact_box=1.5)
    config = TrainConfig.from_dict({"model": {"preset": "mini", "image_size": 64},
                                    "data": [{"path": "unused"}],
                                    "prompts": {"train": {"exact_box": 0.25}}}, "e.yaml")
    with pytest.raises(ConfigError, match="e.yaml: prompts.train.exact_box needs a model with exact-box tokens"):
        build_model(config, "e.yaml")
    with_tokens = config.replace(model=dataclasses.replace(config.model,
                                                           config={"decoder": {"exact_box_tokens": True}}))
    model, _ = build_model(with_tokens, "e.yaml")
    assert model.sam_prompt_encoder.num_point_embeddings == 6


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _mask(response) -> np.ndarray:
    from PIL import Image

    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["mask_png_base64"])))) > 0


def test_the_web_api_answers_a_tight_box_per_request(exact_model):
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
    with warnings.catch_warnings():  # starlette's notice about httpx vs httpx2, raised on import
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    from uniultra.serve.app import create_app

    image = speckle()
    client = TestClient(create_app(lambda: ZoomPredictor(Predictor(exact_model), margin=1.5)),
                        base_url="http://localhost")
    image_id = client.post("/api/images", files={"file": ("s.png", _png(image), "image/png")}).json()["id"]
    url = f"/api/images/{image_id}/predict"
    tight = _mask(client.post(url, json={"box": BOX.tolist(), "tight_box": True}))
    loose = _mask(client.post(url, json={"box": BOX.tolist()}))  # the shared predictor is loose again
    reference = ZoomPredictor(Predictor(exact_model), margin=1.5)
    reference.set_image(image)
    np.testing.assert_array_equal(loose, reference.predict(box=BOX)[0][0])
    reference.exact_boxes = reference.clip_to_boxes = True
    np.testing.assert_array_equal(tight, reference.predict(box=BOX)[0][0])
    assert (tight != loose).any()
    plain_client = TestClient(create_app(SAM2ImageModel(model_config(False))), base_url="http://localhost")
    other = plain_client.post("/api/images", files={"file": ("s.png", _png(image), "image/png")}).json()["id"]
    refused = plain_client.post(f"/api/images/{other}/predict", json={"box": BOX.tolist(), "tight_box": True})
    assert refused.status_code == 422 and "zoomed models" in refused.json()["detail"]
    refused = client.post(f"/api/images/{image_id}/propagate", json={"box": BOX.tolist(), "tight_box": True})
    assert refused.status_code == 422 and "one frame" in refused.json()["detail"]


def test_tokens_added_to_a_trained_model_change_nothing_else(tmp_path):
    from uniultra.models.checkpoint import save_model

    torch.manual_seed(0)
    model = SAM2ImageModel(model_config(False))
    predictor = Predictor(model)
    predictor.set_image(speckle())
    before = predictor.predict(box=BOX, return_logits=True)[0]
    model.add_exact_box_tokens()
    assert model.config.decoder.exact_box_tokens and predictor.supports_exact_box
    # an untrained exact box reads as the plain box; plain prompts are answered as before
    np.testing.assert_array_equal(predictor.predict(box=BOX, return_logits=True)[0], before)
    np.testing.assert_array_equal(predictor.predict(box=BOX, return_logits=True, exact_box=True)[0], before)
    with pytest.raises(ValueError, match="already has exact-box tokens"):
        model.add_exact_box_tokens()
    # a training config that asks for the tokens on a base checkpoint without them gets them added
    torch.manual_seed(0)
    base = tmp_path / "base.pt"
    save_model(SAM2ImageModel(model_config(False)), base)
    config = TrainConfig.from_dict({"model": {"preset": "mini", "image_size": 64, "base": str(base),
                                              "config": {"decoder": {"exact_box_tokens": True}}},
                                    "data": [{"path": "unused"}], "prompts": {"train": {"exact_box": 0.25}}}, "f.yaml")
    tuned, identity = build_model(config, "f.yaml")
    assert tuned.sam_prompt_encoder.num_point_embeddings == 6 and "exact-box tokens" in identity["added"]


def test_a_model_fine_tuned_for_exact_boxes_on_a_base_without_them_loads(tmp_path, phantoms_and_small_base):
    """The documented path (configs/cpu/default-exact-tokens.yaml): a decoder-only run on a base without
    the tokens writes an adapter-only checkpoint; loading it adds the tokens to the base first."""
    from uniultra.engine.trainer import train
    from uniultra.inference.loading import load_predictor

    root, base, small = phantoms_and_small_base
    tuned = {**small, "decoder": {**small["decoder"], "exact_box_tokens": True}}
    config = TrainConfig.from_dict({
        "model": {"preset": "mini", "image_size": 64, "config": tuned, "base": str(base)},
        "peft": {"method": "decoder_only", "train_no_mem_embed": False}, "data": [{"path": str(root)}],
        "zoom": {}, "prompts": {"train": {"modes": {"box": 1.0}, "exact_box": 0.5}},
        "optim": {"lr": 1e-2, "epochs": 1, "batch_size": 2, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"), "progress": False, "threads": 1}, "t")
    train(config)
    predictor = load_predictor(tmp_path / "run" / "best.pt")
    assert predictor.supports_exact_box
    embeddings = predictor.model.sam_prompt_encoder.point_embeddings
    assert not torch.equal(embeddings[4].weight, embeddings[2].weight)  # trained apart from the plain corner
