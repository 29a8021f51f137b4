"""Metrics: hand-computed cases, the empty-mask conventions, and agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from uniultra.evaluation.metrics import (
    dice_score,
    hausdorff_distances,
    image_metrics,
    iou_score,
    summarize,
    summarize_images,
    surface,
)

monai = pytest.importorskip("monai", reason="MONAI is the reference implementation (test extra)")
torch = pytest.importorskip("torch")


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def random_masks(rng: np.random.Generator):
    """Blobby random masks of random sizes, some touching the image border."""
    height, width = rng.integers(16, 160, size=2)
    pred = ndimage.binary_opening(rng.random((height, width)) < rng.uniform(0.3, 0.7))
    truth = ndimage.binary_dilation(rng.random((height, width)) < rng.uniform(0.01, 0.2), iterations=2)
    return pred, truth


def hand_built_masks():
    shape = (40, 50)
    ring = square(shape, 5, 5, 30) & ~square(shape, 12, 12, 16)
    return [
        (square(shape, 10, 10, 10), square(shape, 10, 13, 10)),  # shifted by 3 columns
        (square(shape, 0, 0, 8), square(shape, 30, 40, 10)),  # disjoint, at the corners
        (ring, square(shape, 8, 8, 24)),  # prediction with a hole
        (square(shape, 5, 5, 1), square(shape, 20, 30, 3)),  # single pixel
        (np.ones(shape, bool), square(shape, 10, 10, 20)),  # whole image
    ]


def monai_reference(pred: np.ndarray, truth: np.ndarray, spacing=None) -> dict:
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(truth)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": DiceMetric(include_background=True, ignore_empty=False)(y_pred, y).item(),
            "iou": MeanIoU(include_background=True, ignore_empty=False)(y_pred, y).item(),
            "hd": compute_hausdorff_distance(y_pred, y, include_background=True, spacing=spacing).item(),
            "hd95": compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                               spacing=spacing).item(),
        }


def monai_hd95_in_float64(pred: np.ndarray, truth: np.ndarray, spacing=None) -> float:
    """MONAI's own surfaces and distances, with the 95th percentile taken in float64."""
    from monai.metrics.utils import get_edge_surface_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, distances, _ = get_edge_surface_distance(torch.from_numpy(pred), torch.from_numpy(truth),
                                                    spacing=spacing, symmetric=True)
    return max(float(np.percentile(d.double().numpy(), 95)) for d in distances)


def assert_matches_monai(pred, truth, spacing=None):
    ours = image_metrics(pred, truth, spacing)
    reference = monai_reference(pred, truth, spacing)
    for name in ("dice", "iou", "hd"):
        assert getattr(ours, name) == pytest.approx(reference[name], rel=1e-6, abs=1e-6), name
    # MONAI takes the percentile with torch.quantile in float32 (index weights rounded), which
    # moves HD95 by up to ~2e-6 relative; against its float32 distances in float64 we agree to 1e-6.
    assert ours.hd95 == pytest.approx(reference["hd95"], rel=3e-6, abs=1e-6)
    assert ours.hd95 == pytest.approx(monai_hd95_in_float64(pred, truth, spacing), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("case", range(5))
def test_hand_built_masks_match_monai(case):
    assert_matches_monai(*hand_built_masks()[case])


@pytest.mark.parametrize("seed", range(12))
def test_random_masks_match_monai(seed):
    pred, truth = random_masks(np.random.default_rng(seed))
    assert_matches_monai(pred, truth)


@pytest.mark.parametrize("spacing", [(0.5, 0.5), (0.3, 1.2)])
def test_spacing_matches_monai(spacing):
    pred, truth = random_masks(np.random.default_rng(100))
    assert_matches_monai(pred, truth, spacing)


def test_hand_computed_shift():
    pred, truth = square((40, 50), 10, 10, 10), square((40, 50), 10, 13, 10)
    assert dice_score(pred, truth) == pytest.approx(2 * 70 / 200)
    assert iou_score(pred, truth) == pytest.approx(70 / 130)
    # Surfaces are the 10x10 squares' outlines; the farthest outline pixels are 3 columns apart.
    assert hausdorff_distances(pred, truth) == pytest.approx((3.0, 3.0))


def test_hand_computed_disjoint_pixels():
    pred, truth = square((20, 20), 0, 0, 1), square((20, 20), 3, 4, 1)
    hd, hd95 = hausdorff_distances(pred, truth)
    assert hd == hd95 == pytest.approx(5.0)
    hd_mm, _ = hausdorff_distances(pred, truth, spacing=(2.0, 0.5))
    assert hd_mm == pytest.approx(math.hypot(3 * 2.0, 4 * 0.5))


def test_surface_is_the_outline():
    mask = square((7, 7), 1, 1, 5)
    assert surface(mask).sum() == 16 and not surface(mask)[3, 3]
    assert surface(np.ones((3, 3), bool)).sum() == 8  # the image border counts as outside


def test_empty_prediction_gets_the_diagonal_and_is_flagged():
    truth = square((30, 40), 5, 5, 4)
    result = image_metrics(np.zeros_like(truth), truth)
    assert (result.dice, result.iou) == (0.0, 0.0)
    assert result.hd == result.hd95 == pytest.approx(50.0)
    assert result.empty_pred and not result.empty_truth
    assert image_metrics(np.zeros_like(truth), truth, spacing=(0.1, 0.1)).hd == pytest.approx(5.0)


def test_both_empty_is_perfect_and_false_positive_on_empty_truth_is_worst():
    empty = np.zeros((30, 40), bool)
    both = image_metrics(empty, empty)
    assert (both.dice, both.iou, both.hd, both.hd95) == (1.0, 1.0, 0.0, 0.0)
    assert both.empty_truth and not both.empty_pred
    false_positive = image_metrics(square((30, 40), 1, 1, 3), empty)
    assert (false_positive.dice, false_positive.hd) == (0.0, pytest.approx(50.0))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one shape"):
        image_metrics(np.zeros((3, 4), bool), np.zeros((4, 3), bool))


def test_summaries():
    summary = summarize([0.5, 0.7, 0.9])
    assert summary["mean"] == pytest.approx(0.7) and summary["std"] == pytest.approx(0.2)
    half_width = 1.96 * 0.2 / math.sqrt(3)
    assert summary["ci95"] == pytest.approx([0.7 - half_width, 0.7 + half_width])
    assert summarize([])["mean"] is None
    truth = square((10, 10), 2, 2, 3)
    rows = [image_metrics(truth, truth), image_metrics(np.zeros_like(truth), truth)]
    per_dataset = summarize_images(rows)
    assert per_dataset["n"] == 2 and per_dataset["n_empty_pred"] == 1
    assert per_dataset["dice"]["mean"] == pytest.approx(0.5)
