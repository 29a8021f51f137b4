"""Small holes filled at the decoder's resolution (uniultra.inference.holes), in the function and in
the masks a predictor returns; larger holes, background at the border and gaps between the parts of
an object stay."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from uniultra.inference.holes import DEFAULT_MAX_HOLE_SHARE, fill_small_holes
from uniultra.inference.predictor import Predictor
from uniultra.inference.zoom import ZoomPredictor
from uniultra.models.image_model import SAM2ImageModel


def _disc_logits(size: int = 64, radius: float = 20.0) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    inside = np.hypot(x - size / 2, y - size / 2) <= radius
    return np.where(inside, 4.0, -4.0).astype(np.float32)


def test_a_pin_hole_is_filled_and_a_large_hole_is_kept():
    logits = _disc_logits()
    logits[30:32, 31] = -2.0  # 2 cells of a ~1250-cell object
    filled = fill_small_holes(logits, 0.0, DEFAULT_MAX_HOLE_SHARE)
    assert (filled[30:32, 31] > 0).all() and filled[30, 31] == pytest.approx(1.0)
    np.testing.assert_array_equal(np.delete(filled.ravel(), [30 * 64 + 31, 31 * 64 + 31]),
                                  np.delete(logits.ravel(), [30 * 64 + 31, 31 * 64 + 31]))
    ring = _disc_logits()
    ring[22:42, 22:42] = -4.0  # a 400-cell hole: a ring-shaped object keeps its lumen
    np.testing.assert_array_equal(fill_small_holes(ring, 0.0, DEFAULT_MAX_HOLE_SHARE), ring)
    assert (fill_small_holes(ring, 0.0, 0.5)[22:42, 22:42] > 0).all()


def test_border_background_and_gaps_between_parts_stay_and_nothing_is_copied_in_vain():
    two_parts = np.full((32, 32), -4.0, np.float32)
    two_parts[4:28, 4:14] = 4.0
    two_parts[4:28, 16:28] = 4.0  # the gap between two lobes reaches the background: not a hole
    assert fill_small_holes(two_parts, 0.0, 0.5) is two_parts
    edge = np.full((16, 16), 4.0, np.float32)
    edge[0, 5] = -4.0  # a notch at the border
    assert fill_small_holes(edge, 0.0, 0.5) is edge
    logits = _disc_logits()
    logits[32, 32] = -1.0
    assert fill_small_holes(logits, 0.0, 0.0) is logits
    assert fill_small_holes(logits, -2.0, DEFAULT_MAX_HOLE_SHARE) is logits  # above this threshold: no hole
    batch = np.stack([logits, _disc_logits()])[:, None]  # (N, C, h, w): each mask on its own
    filled = fill_small_holes(batch, 0.0, DEFAULT_MAX_HOLE_SHARE)
    assert filled.shape == batch.shape and filled[0, 0, 32, 32] > 0
    np.testing.assert_array_equal(filled[1], batch[1])


@pytest.fixture(scope="module")
def holed_predictor():
    """A random mini whose decoder always answers a disc with a pin-hole."""
    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset("mini", image_size=128)
    logits = _disc_logits(32, 10.0)
    logits[15:17, 16] = -3.0
    decode = model.decode

    def holed(*args, **kwargs):
        out = decode(*args, **kwargs)
        shape = out.low_res_logits.shape
        return dataclasses.replace(out, low_res_logits=torch.from_numpy(logits).expand(shape).clone())

    model.decode = holed
    return Predictor(model)


def test_predictor_masks_have_no_pin_hole_unless_asked(holed_predictor):
    image = np.random.default_rng(0).integers(0, 255, (96, 96), dtype=np.uint8)
    holed_predictor.set_image(image)
    from scipy import ndimage

    mask = holed_predictor.predict(box=[20, 20, 70, 70])[0][0]
    assert mask.any() and not (ndimage.binary_fill_holes(mask) & ~mask).any()
    low = holed_predictor.predict(box=[20, 20, 70, 70])[2][0]
    assert low[15, 16] < 0  # the low-res logits (a next round's mask input) are the decoder's own
    zoomed = ZoomPredictor(holed_predictor)
    zoomed.max_hole_share = 0.0  # reaches the predictor that answers each crop
    try:
        assert holed_predictor.max_hole_share == 0.0
        kept = holed_predictor.predict(box=[20, 20, 70, 70])[0][0]
        assert (ndimage.binary_fill_holes(kept) & ~kept).any()
    finally:
        holed_predictor.max_hole_share = DEFAULT_MAX_HOLE_SHARE
