"""`uniultra evaluate`: baselines, the model path (fake and real predictor), outputs."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from dataset_factory import blob_mask, shared_dataset, write_dataset, write_pair
from uniultra.cli import main
from uniultra.data.dataset import SegmentationDataset
from uniultra.data.prompts import Prompt, component_boxes
from uniultra.evaluation.baselines import fill_boxes, fill_ellipses
from uniultra.evaluation.evaluate import ModelMethod, evaluate, make_method
from uniultra.inference.objects import union_of_object_masks, widen_degenerate_boxes

TWO_RECTANGLES = blob_mask((48, 64), ((4, 4, 10, 12), (25, 30, 15, 20)))


def test_filled_exact_boxes_recover_rectangles():
    assert np.array_equal(fill_boxes(component_boxes(TWO_RECTANGLES), TWO_RECTANGLES.shape), TWO_RECTANGLES)


def test_ellipse_is_inscribed_in_its_box():
    box = np.array([[10.0, 5.0, 49.0, 24.0]])  # 40 x 20 pixels
    ellipse = fill_ellipses(box, (40, 70))
    assert np.array_equal(ellipse, ellipse & fill_boxes(box, (40, 70)))
    assert ellipse.sum() == pytest.approx(np.pi * 20 * 10, rel=0.03)
    assert ellipse[15, 10] and ellipse[15, 49] and ellipse[5, 30] and ellipse[24, 30] and not ellipse[5, 10]


class FakePredictor:
    """Stands in for uniultra.inference.predictor.Predictor: returns each box filled, one mask per object."""

    def __init__(self):
        self.calls = []

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict(self, box=None, points=None, labels=None, multimask=False):
        self.calls.append({"box": box, "points": points, "labels": labels, "multimask": multimask})
        count = len(box) if box is not None else len(points)
        masks = np.zeros((count, 1, *self.shape), bool)
        for index in range(count):
            if box is not None:
                masks[index, 0] = fill_boxes(box[index:index + 1], self.shape)
            else:
                x, y = points[index, 0].astype(int)
                masks[index, 0, y, x] = True
        return masks, np.ones((count, 1)), np.zeros((count, 1, 8, 8))


def test_model_method_unions_objects_and_passes_prompts(tmp_path):
    root = tmp_path / "set"
    write_pair(root, "two", TWO_RECTANGLES)
    write_pair(root, "empty", np.zeros((48, 64), bool))
    fake = FakePredictor()
    results = evaluate(ModelMethod("fake", fake), [SegmentationDataset(root)], prompt_mode="box+point",
                       jitter=0, seed=0, progress=False)
    (result,) = results
    assert [row["stem"] for row in result.rows] == ["two"] and result.skipped[0]["stem"] == "empty"
    assert result.rows[0]["dice"] == 1.0 and result.rows[0]["n_objects"] == 2
    call = fake.calls[0]
    assert call["box"].shape == (2, 4) and call["points"].shape == (2, 1, 2) and call["labels"].shape == (2, 1)
    assert call["multimask"] is False


def test_union_never_sums_and_accepts_unbatched_output():
    masks = np.zeros((2, 1, 4, 4), bool)
    masks[0, 0, 0, 0] = masks[1, 0, 0, 0] = masks[1, 0, 3, 3] = True
    assert union_of_object_masks(masks, (4, 4)).sum() == 2
    assert union_of_object_masks(masks[0], (4, 4)).sum() == 1
    with pytest.raises(ValueError, match="expected"):
        union_of_object_masks(masks, (5, 5))


def test_degenerate_boxes_are_widened():
    assert widen_degenerate_boxes(np.array([[3.0, 4.0, 3.0, 9.0]])).tolist() == [[3, 4, 4, 9]]


def test_baselines_need_box_prompts_and_unknown_models_fail_clearly(tmp_path):
    root = write_dataset(tmp_path / "set", ["a"])
    assert main(["evaluate", "--model", "baseline:ellipse", "--data", str(root), "--prompt", "point"]) == 2
    with pytest.raises(ValueError, match="unknown baseline"):
        make_method("baseline:circle")


def test_cli_writes_results_table_and_overlays(tmp_path, capsys):
    root = tmp_path / "rects"
    write_pair(root, "a", TWO_RECTANGLES)
    write_pair(root, "b", blob_mask())
    write_pair(root, "normal", np.zeros((48, 64), bool))
    out, overlays = tmp_path / "results.json", tmp_path / "overlays"
    code = main(["evaluate", "--model", "baseline:box", "--data", str(root), "--prompt", "box", "--jitter", "0",
                 "--out", str(out), "--overlays", str(overlays), "--no-progress"])
    assert code == 0
    table = capsys.readouterr().out
    assert "rects" in table and "100.00" in table
    document = json.loads(out.read_text())
    summary = document["datasets"]["rects"]
    assert summary["n"] == 2 and summary["n_skipped"] == 1 and summary["dice"]["mean"] == 1.0
    assert summary["hd"]["mean"] == 0.0 and summary["n_objects"] == 3
    assert [row["stem"] for row in document["images"]["rects"]] == ["a", "b"]
    assert document["skipped"]["rects"][0]["stem"] == "normal"
    assert document["command"].startswith("uniultra evaluate --model baseline:box")
    assert document["config"]["jitter"] == 0.0 and document["config"]["prompt"] == "box"
    assert sorted(p.name for p in (overlays / "rects").iterdir()) == ["a.png", "b.png"]
    assert not list(tmp_path.glob(".results.json*"))  # no temporary file left behind


def test_tight_boxes_reach_a_zoomed_model_and_are_refused_elsewhere(tmp_path, capsys):
    root = tmp_path / "rects"
    write_pair(root, "a", TWO_RECTANGLES)
    assert main(["evaluate", "--model", "baseline:ellipse", "--data", str(root), "--tight-boxes"]) == 2
    assert "--tight-boxes is for zoomed models" in capsys.readouterr().err
    out = tmp_path / "results.json"
    assert main(["evaluate", "--model", "default", "--data", str(root), "--jitter", "0", "--tight-boxes",
                 "--out", str(out), "--no-progress"]) == 0
    document = json.loads(out.read_text())
    assert "--tight-boxes" in document["command"] and document["config"]["tight_boxes"] is True


def test_same_prompts_for_every_method(tmp_path):
    root = write_dataset(tmp_path / "set", ["x", "y", "z"], mask=TWO_RECTANGLES)
    dataset = [SegmentationDataset(root)]
    first, second = FakePredictor(), FakePredictor()
    evaluate(ModelMethod("a", first), dataset, prompt_mode="box", jitter=20, seed=5, progress=False)
    evaluate(ModelMethod("b", second), dataset, prompt_mode="box", jitter=20, seed=5, progress=False)
    assert all(np.array_equal(a["box"], b["box"]) for a, b in zip(first.calls, second.calls, strict=True))


def test_real_predictor_with_random_tiny_model(tmp_path):
    pytest.importorskip("uniultra.inference.predictor", reason="the model code is not in this tree yet")
    root = tmp_path / "set"
    write_pair(root, "two", TWO_RECTANGLES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are announced with a warning
        method = make_method("preset:mini", image_size=64)
    for mode in ("box", "point", "points3", "box+point"):
        (result,) = evaluate(method, [SegmentationDataset(root)], prompt_mode=mode, jitter=20, seed=0,
                             progress=False)
        assert len(result.rows) == 1 and 0.0 <= result.rows[0]["dice"] <= 1.0


def test_prompt_dataclass_counts_objects():
    assert Prompt("box", boxes=np.zeros((3, 4))).n_objects == 3


@pytest.mark.realdata
def test_busi_inscribed_ellipse_matches_the_reference(tmp_path):
    """Data README: ellipse inscribed in the exact box, 647 lesion images, Dice 89.29."""
    out = tmp_path / "busi.json"
    assert main(["evaluate", "--model", "baseline:ellipse", "--data", str(shared_dataset("busi")),
                 "--prompt", "box", "--jitter", "0", "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(out.read_text())["datasets"]["busi"]
    assert summary["n"] == 647 and summary["n_skipped"] == 133
    assert abs(summary["dice"]["mean"] * 100 - 89.3) < 1.5


def test_postprocess_keeps_one_clean_component_inside_the_box():
    from uniultra.inference.objects import clean_object_mask

    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20] = True
    mask[14:16, 14:16] = False  # a hole
    mask[30:33, 30:33] = True  # a far fragment, outside the box
    mask[10:12, 22:24] = True  # a small fragment inside the box + margin
    cleaned = clean_object_mask(mask, np.array([9.0, 9.0, 20.0, 20.0]), margin=5)
    expected = np.zeros_like(mask)
    expected[10:20, 10:20] = True
    np.testing.assert_array_equal(cleaned, expected)


def test_postprocess_flag_reaches_the_model_method(tmp_path):
    root = tmp_path / "set"
    truth = np.zeros((30, 30), dtype=bool)
    truth[5:21, 5:21] = True
    write_pair(root, "a", truth)

    class Fake:
        def set_image(self, image):
            self.shape = image.shape[:2]

        def predict(self, box, points, labels, multimask):
            m = np.zeros((len(box), 1, *self.shape), dtype=bool)
            m[:, 0, 5:21, 5:21] = True
            m[:, 0, 0:2, 28:30] = True  # a speck far from the box
            return m, np.ones((len(box), 1)), None

    dataset = [SegmentationDataset(root)]
    protocol = {"prompt_mode": "box", "jitter": 0, "seed": 0, "progress": False}
    raw = evaluate(ModelMethod("fake", Fake()), dataset, **protocol)
    clean = evaluate(ModelMethod("fake", Fake(), postprocess=True), dataset, **protocol)
    assert clean[0].rows[0]["dice"] == 1.0 > raw[0].rows[0]["dice"]
    assert clean[0].rows[0]["hd"] == 0.0 < raw[0].rows[0]["hd"]
