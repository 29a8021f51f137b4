"""Prompts: one object per component, bounded outward jitter, determinism per (seed, stem)."""

from __future__ import annotations

import numpy as np
import pytest

from dataset_factory import blob_mask
from uniultra.data.prompts import (
    component_boxes,
    farthest_interior_points,
    jitter_boxes,
    label_components,
    make_prompt,
    pad_boxes,
)

TWO_LESIONS = blob_mask((60, 80), ((5, 5, 10, 20), (30, 40, 20, 25)))


def test_one_box_per_component_inclusive_indices():
    boxes = component_boxes(TWO_LESIONS)
    assert boxes.tolist() == [[5, 5, 24, 14], [40, 30, 64, 49]]


def test_diagonal_touch_is_one_component():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = True
    assert label_components(mask)[1] == 1  # 8-connectivity


def test_jitter_pushes_outward_within_bound_and_clips():
    shape = (600, 800)  # J=20 at 1024 scale -> 20 * 800 / 1024 = 15.625 px here
    exact = np.array([[100.0, 100.0, 300.0, 200.0], [2.0, 3.0, 790.0, 595.0]])
    for seed in range(50):
        jittered = jitter_boxes(exact, shape, 20, np.random.default_rng(seed))
        grow = (jittered - exact) * np.array([-1, -1, 1, 1])
        assert (grow >= 0).all()
        assert (grow[0] <= 15.625).all()
        assert (jittered[:, :2] >= 0).all()
        assert (jittered[:, 2] <= 799).all() and (jittered[:, 3] <= 599).all()


def test_padding_pushes_every_side_out_at_the_jitter_scale_and_never_shrinks_a_box():
    shape = (600, 800)  # 8 px at 1024 scale -> 6.25 px here
    boxes = np.array([[100.0, 100.0, 300.0, 200.0], [3.0, 0.0, 800.0, 600.0]])
    padded = pad_boxes(boxes, shape, 8)
    np.testing.assert_allclose(padded[0], [93.75, 93.75, 306.25, 206.25])
    # clipped to the image, but a box already reaching past the last pixel index keeps its sides
    np.testing.assert_allclose(padded[1], [0.0, 0.0, 800.0, 600.0])
    np.testing.assert_array_equal(pad_boxes(boxes[0], shape, 0), boxes[0])


def test_zero_jitter_is_the_exact_box():
    prompt = make_prompt(TWO_LESIONS, "box", stem="x", seed=3, jitter=0)
    assert np.array_equal(prompt.boxes, component_boxes(TWO_LESIONS))


def test_prompts_depend_only_on_seed_and_stem():
    first = make_prompt(TWO_LESIONS, "box", stem="case_7", seed=0, jitter=20)
    make_prompt(TWO_LESIONS, "box", stem="other", seed=0, jitter=20)  # interleaved call, no effect
    again = make_prompt(TWO_LESIONS, "box", stem="case_7", seed=0, jitter=20)
    assert np.array_equal(first.boxes, again.boxes)
    other_stem = make_prompt(TWO_LESIONS, "box", stem="case_8", seed=0, jitter=20)
    other_seed = make_prompt(TWO_LESIONS, "box", stem="case_7", seed=1, jitter=20)
    assert not np.array_equal(first.boxes, other_stem.boxes)
    assert not np.array_equal(first.boxes, other_seed.boxes)


def test_box_and_box_plus_point_share_boxes():
    box = make_prompt(TWO_LESIONS, "box", stem="s", seed=0, jitter=20)
    both = make_prompt(TWO_LESIONS, "box+point", stem="s", seed=0, jitter=20)
    assert np.array_equal(box.boxes, both.boxes)
    assert both.points.shape == (2, 1, 2) and both.labels.tolist() == [[1], [1]]


def test_farthest_point_is_the_centre_and_inside():
    mask = blob_mask((40, 40), ((10, 10, 11, 11),))
    assert farthest_interior_points(mask).tolist() == [[15, 15]]
    # A lesion cut by the image edge: the edge counts as boundary, so the point moves inward.
    edge = blob_mask((40, 40), ((0, 0, 9, 40),))
    x, y = farthest_interior_points(edge)[0]
    assert y == 4 and edge[int(y), int(x)]


def test_three_points_inside_each_component_and_deterministic():
    prompt = make_prompt(TWO_LESIONS, "points3", stem="s", seed=0)
    assert prompt.points.shape == (2, 3, 2) and prompt.labels.shape == (2, 3)
    labels, _ = label_components(TWO_LESIONS)
    for index, points in enumerate(prompt.points):
        assert all(labels[int(y), int(x)] == index + 1 for x, y in points)
        assert len({tuple(p) for p in points}) == 3
    assert np.array_equal(prompt.points, make_prompt(TWO_LESIONS, "points3", stem="s", seed=0).points)


def test_tiny_component_still_gets_three_points():
    mask = np.zeros((10, 10), bool)
    mask[4, 4] = True
    assert make_prompt(mask, "points3", stem="t", seed=0).points.tolist() == [[[4, 4]] * 3]


@pytest.mark.parametrize("mode", ["box", "point", "points3", "box+point"])
def test_empty_mask_has_no_prompt(mode):
    assert make_prompt(np.zeros((8, 8), bool), mode, stem="empty", seed=0, jitter=20) is None


def test_no_prompt_mode_and_unknown_mode():
    none = make_prompt(np.zeros((8, 8), bool), "none", stem="e")
    assert none.boxes is None and none.points is None and none.n_objects == 0
    with pytest.raises(ValueError, match="unknown prompt mode"):
        make_prompt(TWO_LESIONS, "scribble", stem="e")
