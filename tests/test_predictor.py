from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uniultra.data.image_io import ImageReadError
from uniultra.inference.predictor import Predictor
from uniultra.models.image_model import SAM2ImageModel

H, W = 150, 210


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    return Predictor(SAM2ImageModel.from_preset("mini", 256))


def speckle(dtype=np.uint8, channels: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.rayleigh(size=(H, W))
    img = img / img.max() * np.iinfo(dtype).max if dtype != np.float32 else img / img.max()
    img = img.astype(dtype)
    return img if channels is None else np.repeat(img[..., None], channels, axis=2)


@pytest.mark.parametrize(
    "image",
    [speckle(), speckle(np.uint16), speckle(channels=3), speckle(channels=4), speckle(np.float32),
     speckle(channels=1)],
    ids=["gray8", "gray16", "rgb", "rgba", "float", "gray-hw1"],
)
def test_masks_come_back_at_image_size(predictor, image):
    predictor.set_image(image)
    masks, scores, low = predictor.predict(box=[20, 30, 120, 110])
    assert masks.shape == (1, H, W) and masks.dtype == bool
    assert scores.shape == (1,)
    assert low.shape == (1, 64, 64)
    multi, scores3, _ = predictor.predict(points=[[60, 70]], labels=[1], multimask=True)
    assert multi.shape == (3, H, W) and scores3.shape == (3,)


def test_gray_and_replicated_rgb_agree(predictor):
    predictor.set_image(speckle())
    a = predictor.predict(box=[20, 30, 120, 110], return_logits=True)[0]
    predictor.set_image(speckle(channels=3))
    b = predictor.predict(box=[20, 30, 120, 110], return_logits=True)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_batched_prompts_keep_their_axis(predictor):
    predictor.set_image(speckle())
    masks, scores, _ = predictor.predict(box=[[20, 30, 120, 110]])
    assert masks.shape == (1, 1, H, W) and scores.shape == (1, 1)
    masks, _, _ = predictor.predict(box=[[20, 30, 120, 110], [0, 0, 50, 40]],
                                    points=[[[60, 70]], [[10, 10]]], labels=[[1], [1]])
    assert masks.shape == (2, 1, H, W)


def test_image_is_encoded_once_per_set_image(predictor, monkeypatch):
    predictor.set_image(speckle())
    calls = []
    monkeypatch.setattr(predictor.model, "encode_image", lambda x: calls.append(x))
    for box in ([20, 30, 120, 110], [5, 5, 60, 60]):
        predictor.predict(box=box)
    assert calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(box=[300, 10, 400, 100]), "outside the image"),
        (dict(box=[-5, 10, 100, 100]), "outside the image"),
        (dict(box=[50, 50, 50, 100]), "degenerate box"),
        (dict(box=[80, 50, 40, 100]), "degenerate box"),
        (dict(box=[1, 2, 3]), "shape"),
        (dict(points=[[10, 10]]), "need labels"),
        (dict(points=[[10, 10]], labels=[1, 1]), "does not match"),
        (dict(points=[[10, 500]], labels=[1]), "outside the image"),
        (dict(points=[[10, 10]], labels=[7]), "labels must be"),
        ({}, "give a box or points"),
        (dict(box=[[0, 0, 50, 50]] * 2, points=[[[5, 5]]] * 3, labels=[[1]] * 3), "one point set per box"),
    ],
)
def test_bad_prompts_get_clear_errors(predictor, kwargs, message):
    predictor.set_image(speckle())
    with pytest.raises(ValueError, match=message):
        predictor.predict(**kwargs)


@pytest.mark.parametrize("shape", [(H,), (2, H, W, 3), (H, W, 2), (H, W, 5), (0, W)])
def test_wrong_shaped_array_is_refused(predictor, shape):
    with pytest.raises(ValueError):
        predictor.set_image(np.zeros(shape, dtype=np.uint8))


def test_predict_before_set_image_fails():
    p = Predictor(SAM2ImageModel.from_preset("mini", 256))
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(box=[0, 0, 10, 10])


def test_image_paths_and_corrupt_files(predictor, tmp_path):
    good = tmp_path / "scan.png"
    Image.fromarray(speckle()).save(good)
    predictor.set_image(good)
    assert predictor.orig_hw == (H, W)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="broken.png"):
        predictor.set_image(bad)
