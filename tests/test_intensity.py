"""Acceptance: a picture saved as 8-bit and as 12-bit data in a 16-bit PNG segments the same way
with the bundled model (the one intensity mapping, uniultra.data.image_io.normalize_intensity)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dataset_factory import shared_dataset
from uniultra.data.image_io import read_image, read_mask
from uniultra.data.phantom import make_phantom
from uniultra.evaluation.metrics import dice_score


@pytest.fixture(scope="module")
def predictor():
    from uniultra.inference.loading import load_predictor

    return load_predictor("default")


def twelve_bit_copies(gray8: np.ndarray) -> dict[str, np.ndarray]:
    return {"x16": gray8.astype(np.uint16) * 16, "0..4095": np.rint(gray8 * (4095 / 255)).astype(np.uint16)}


def assert_same_masks(predictor, gray8: np.ndarray, box: np.ndarray, tmp_path) -> None:
    masks = {}
    for name, array in {"8-bit": gray8, **twelve_bit_copies(gray8)}.items():
        path = tmp_path / f"{name}.png"
        Image.fromarray(array).save(path)
        image = read_image(path)
        assert image.dtype == array.dtype  # really saved as 16-bit
        predictor.set_image(image)
        masks[name] = predictor.predict(box=box)[0][0]
    assert masks["8-bit"].any()
    for name in twelve_bit_copies(gray8):
        assert dice_score(masks["8-bit"], masks[name]) >= 0.98, name


@pytest.mark.parametrize("seed", [7, 23])
def test_phantom_8_bit_and_12_bit_give_the_same_mask(predictor, tmp_path, seed):
    phantom = make_phantom(seed, 256)
    assert_same_masks(predictor, phantom.image, phantom.boxes[0].astype(np.float64), tmp_path)


@pytest.mark.realdata
def test_busi_8_bit_and_12_bit_give_the_same_mask(predictor, tmp_path):
    root = shared_dataset("busi")
    image = np.asarray(Image.open(root / "images" / "benign_1.png").convert("L"))
    mask = read_mask(root / "masks" / "benign_1.png")
    rows, cols = np.nonzero(mask)
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=np.float64)
    assert_same_masks(predictor, image, box, tmp_path)
