"""Zoomed segmentation: crop geometry, the zoomed predictor, zoomed training samples and runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from uniultra.data.phantom import make_phantom, write_phantom_dataset
from uniultra.data.prompts import corrective_clicks, make_prompt, pad_boxes
from uniultra.data.regions import grow_region, region_label_maps, regions_holding
from uniultra.engine.config import TrainConfig, TrainPromptConfig, ZoomConfig
from uniultra.engine.trainer import train
from uniultra.engine.zoom_data import NativeSet, ZoomTrainSet
from uniultra.inference.loading import load_model, load_predictor, pack_model
from uniultra.inference.predictor import Predictor
from uniultra.inference.prompts import LOGIT_CLAMP
from uniultra.inference.roi import MAX_ASPECT, TAP_SIDES, Roi, crop, full_roi, mask_box, paste, roi_around_box
from uniultra.inference.zoom import (
    TAP_SCORE_WEIGHT,
    TIGHT_BOX_PADDING,
    ZoomPredictor,
    _most_agreed,
    _points_in_roi,
    answer_tight_boxes,
    main_parts_box,
    touches_border,
)
from uniultra.models.checkpoint import read_checkpoint
from uniultra.models.image_model import SAM2ImageModel

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 120, 160


@pytest.fixture(scope="module")
def base() -> Predictor:
    torch.manual_seed(0)
    return Predictor(SAM2ImageModel.from_preset("mini", 64))


def speckle() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.rayleigh(size=(H, W))
    return (image / image.max() * 255).astype(np.uint8)


# --- geometry ------------------------------------------------------------------------------------

def test_roi_holds_the_box_enlarged_by_the_margin():
    roi = roi_around_box(np.array([40, 30, 79, 69]), (400, 400), 1.5)  # a 40 x 40 box
    assert (roi.width, roi.height) == (60, 60)
    assert roi.x0 <= 40 and roi.x1 >= 80 and roi.y0 <= 30 and roi.y1 >= 70


def test_roi_limits_the_aspect_and_the_smallest_side():
    thin = roi_around_box(np.array([10, 50, 209, 54]), (400, 400), 1.0)  # 200 x 5
    assert thin.width / thin.height <= MAX_ASPECT + 0.05
    tiny = roi_around_box(np.array([100, 100, 101, 101]), (1000, 1000), 1.4)
    assert min(tiny.width, tiny.height) >= 80  # 8 % of the longer image side


def test_crop_pads_with_black_and_paste_inverts_it():
    image = np.arange(H * W, dtype=np.float32).reshape(H, W) + 1
    roi = Roi(-10, 100, 30, 140)  # leaves the image at the left and the bottom
    cut = crop(image, roi)
    assert cut.shape == (40, 40)
    assert (cut[:, :10] == 0).all() and (cut[20:] == 0).all()
    np.testing.assert_array_equal(cut[:20, 10:], image[100:120, 0:30])
    back = paste(cut, roi, (H, W), fill=-1.0)
    np.testing.assert_array_equal(back[100:120, 0:30], image[100:120, 0:30])
    assert (back[:100] == -1).all() and (back[:, 30:] == -1).all()
    assert mask_box(np.zeros((4, 4), bool)) is None


def test_points_outside_the_crop_become_padding():
    points = np.array([[15.0, 15.0], [500.0, 5.0]])
    local, labels = _points_in_roi(points, np.array([1, 0]), Roi(10, 10, 50, 50))
    np.testing.assert_array_equal(local, [[5.0, 5.0], [0.0, 0.0]])
    np.testing.assert_array_equal(labels, [1, -1])


# --- the zoomed predictor --------------------------------------------------------------------------

def test_zoomed_box_is_the_crop_prediction_pasted_back(base):
    zoom = ZoomPredictor(base, margin=1.5)
    image, box = speckle(), np.array([50.0, 40.0, 89.0, 79.0])
    zoom.set_image(image)
    logits, scores, low = zoom.predict(box=box, return_logits=True)
    roi = roi_around_box(box, (H, W), 1.5)
    base.set_image(crop(image, roi))
    expected, expected_scores, _ = base.predict(box=box - np.tile(roi.offset, 2), return_logits=True)
    np.testing.assert_allclose(logits[0, roi.y0:roi.y1, roi.x0:roi.x1], expected[0], atol=1e-6)
    np.testing.assert_allclose(scores, expected_scores)
    outside = np.ones((H, W), bool)
    outside[roi.y0:roi.y1, roi.x0:roi.x1] = False
    assert (logits[0][outside] == -LOGIT_CLAMP).all()
    masks, _, _ = zoom.predict(box=[box, box + 10])
    assert masks.shape == (2, 1, H, W) and masks.dtype == bool
    assert low.shape == (1, 16, 16)


class CountingPredictor:
    """Wraps a Predictor and records the shapes of the images it is given."""

    def __init__(self, inner: Predictor) -> None:
        self.inner, self.shapes = inner, []

    def set_image(self, image):
        self.shapes.append(image.shape)
        self.inner.set_image(image)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tight_boxes_are_answered_as_the_padded_box(base):
    image, box = speckle(), np.array([50.0, 40.0, 89.0, 79.0])
    padded = pad_boxes(box, (H, W), TIGHT_BOX_PADDING)
    assert (padded[:2] < box[:2]).all() and (padded[2:] > box[2:]).all()
    plain = ZoomPredictor(base, margin=1.5)
    plain.set_image(image)
    expected = plain.predict(box=padded, return_logits=True)[0]
    outside = np.ones((H, W), bool)
    outside[40:80, 50:90] = False  # the box as drawn, pixels inclusive
    expected[:, outside] = -LOGIT_CLAMP  # an exact box: nothing of the object lies outside it
    tight = ZoomPredictor(base, margin=1.5)
    answer_tight_boxes(tight, "test")
    assert tight.clip_to_boxes and tight.box_padding == TIGHT_BOX_PADDING
    tight.set_image(image)
    np.testing.assert_allclose(tight.predict(box=box, return_logits=True)[0], expected, atol=1e-6)
    np.testing.assert_array_equal(tight.predict(box=box)[0], expected > 0)
    assert not np.allclose(plain.predict(box=box, return_logits=True)[0], expected)
    with pytest.raises(ValueError, match="zoomed models"):
        answer_tight_boxes(base, "preset:mini")
    with pytest.raises(ValueError, match="padding"):
        ZoomPredictor(base, box_padding=-1)


def test_clipping_to_the_box_keeps_the_positive_points_it_was_given(base):
    image, box, point = speckle(), np.array([50.0, 40.0, 69.0, 59.0]), np.array([[80.0, 50.0]])
    free = ZoomPredictor(base, margin=1.5)
    clipped = ZoomPredictor(base, margin=1.5)
    clipped.clip_to_boxes = True
    for predictor in (free, clipped):
        predictor.set_image(image)
    kept = np.zeros((H, W), bool)
    kept[40:60, 50:81] = True  # the box extended to hold the positive point
    answer = clipped.predict(box=box, points=point, labels=[1], return_logits=True)[0]
    reference = free.predict(box=box, points=point, labels=[1], return_logits=True)[0]
    np.testing.assert_allclose(answer[:, kept], reference[:, kept], atol=1e-6)
    assert (answer[:, ~kept] == -LOGIT_CLAMP).all() and (reference[:, ~kept] > -LOGIT_CLAMP).any()
    batched = clipped.predict(box=[box, box + 5], multimask=True)[0]
    assert batched.shape == (2, 3, H, W) and not batched[0][:, ~kept].any()


def test_a_tap_runs_a_whole_image_pass_then_a_crop(base):
    counting = CountingPredictor(base)
    zoom = ZoomPredictor(counting, tap_regions=False)
    zoom.set_image(speckle())
    masks, scores, _ = zoom.predict(points=[[80, 60]], labels=[1])
    assert masks.shape == (1, H, W) and scores.shape == (1,)
    assert counting.shapes[0] == (H, W) and counting.shapes[1] != (H, W)
    assert len(counting.shapes) == 2 + len(zoom.tap_scales)
    with pytest.raises(ValueError, match="mask_input"):
        zoom.predict(box=[1, 1, 20, 20], mask_input=np.zeros((1, 16, 16)))


def test_main_parts_box_leaves_out_small_fragments_and_loosens_the_box():
    mask = np.zeros((H, W), bool)
    mask[40:60, 50:90] = True  # the object: 40 x 20
    mask[45:55, 100:108] = True  # a second part, 80 px = 10 % of the first: left out
    mask[5:7, 5:7] = True  # a stray fragment: left out
    x0, y0, x1, y1 = main_parts_box(mask)
    # Pixel edges of the object (50, 40, 90, 60) pushed out by 10 % of its size + 2 px per side.
    np.testing.assert_allclose([x0, y0, x1, y1], [44.0, 36.0, 96.0, 64.0])
    mask[45:55, 100:120] = True  # now 200 px = 25 % of the first: kept
    assert main_parts_box(mask)[2] > 120
    assert main_parts_box(np.zeros((H, W), bool)) is None


def test_automatic_mode_refines_the_heads_mask_as_a_box():
    from uniultra.inference.auto_predictor import AutoPredictor
    from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter

    torch.manual_seed(0)
    auto = AutoPredictor(AutoSegmenter(SAM2ImageModel.from_preset("mini", 64), AutoHeadConfig(("a", "b"))),
                         mask_threshold=-0.5)  # a random head: a low threshold makes its mask non-empty
    zoom = ZoomPredictor(auto)
    image = speckle()
    zoom.set_image(image)
    zoom.modality = "b"
    assert auto.modality == "b"  # set through to the wrapped predictor
    zoom.refine_auto = False
    head_mask, score, _ = zoom.predict_without_prompt()
    auto.set_image(image)
    np.testing.assert_array_equal(head_mask, auto.predict_auto("b")[0])
    box = main_parts_box(head_mask)
    assert box is not None
    zoom.refine_auto = True
    refined, refined_score, _ = zoom.predict_without_prompt()
    assert refined_score == score  # the presence of the head, not the box answer's IoU
    np.testing.assert_array_equal(refined, zoom.predict(box=box)[0][0])


def test_zoom_checkpoints_load_as_zoomed_predictors_and_pack_keeps_it(tmp_path):
    from uniultra.models.checkpoint import save_model

    torch.manual_seed(0)
    path = save_model(SAM2ImageModel.from_preset("mini", 64), tmp_path / "z.pt",
                      meta={"inference": {"zoom": {"margin": 1.3}}})
    predictor = load_predictor(path)
    assert isinstance(predictor, ZoomPredictor) and predictor.margin == 1.3
    packed = pack_model(path, tmp_path / "z.safetensors", half=True, decoder_blur=2)
    assert load_model(packed).config.decoder.upscale_blur == 2
    assert load_model(packed).sam_mask_decoder.upscale_blur == 2
    assert read_checkpoint(packed)["meta"]["inference"] == {"zoom": {"margin": 1.3}}
    assert load_model(packed).inference == {"zoom": {"margin": 1.3}}
    plain = save_model(SAM2ImageModel.from_preset("mini", 64), tmp_path / "p.pt")
    assert isinstance(load_predictor(plain), Predictor)


# --- the corrective click ------------------------------------------------------------------------

def test_corrective_click_goes_to_the_largest_error():
    truth = np.zeros((40, 40), bool)
    truth[10:30, 10:30] = True
    missed = truth.copy()
    missed[10:30, 20:30] = False  # right half missed: positive click there
    points, labels = corrective_clicks(missed[None], truth.astype(int))
    assert labels.tolist() == [[1]] and 20 <= points[0, 0, 0] < 30
    spilled = truth.copy()
    spilled[10:30, 30:40] = True  # a wrong part right of the object: negative click there
    points, labels = corrective_clicks(spilled[None], truth.astype(int))
    assert labels.tolist() == [[0]] and points[0, 0, 0] >= 30
    prompt = make_prompt(truth, "box+click", stem="s", jitter=0)
    assert prompt.boxes.shape == (1, 4) and prompt.objects.max() == 1


# --- zoomed training samples ---------------------------------------------------------------------

def native_set(weight: float = 1.0) -> NativeSet:
    mask = np.zeros((H, W), bool)
    mask[30:50, 20:60] = True
    mask[80:100, 100:150] = True
    return NativeSet("s", ["a", "b"], [speckle(), speckle()], [mask, np.zeros_like(mask)], None, weight)


def test_box_samples_put_the_box_at_the_canonical_place():
    prompts = TrainPromptConfig(modes={"box": 1.0}, jitter=(0.0,))
    data = ZoomTrainSet([native_set()], prompts, ZoomConfig(margin=(1.5, 1.5), intensity=0.0), 64, seed=0,
                        hflip=0.0)
    assert len(data) == 1 and data.n_empty == {"s": 1}
    for epoch in range(4):
        item = data[(epoch, 0)]
        assert item["image"].shape == (1, 64, 64) and item["target"].shape == (64, 64)
        (x0, y0), (x1, y1) = item["coords"].tolist()
        # the box spans 1 / 1.5 of the crop on its long side, centred
        assert abs((x0 + x1) / 2 - 32) < 3 and abs((x1 - x0) - 64 / 1.5) < 3
        assert item["target"].sum() > 0 and item["labels"].tolist() == [2, 3]


def test_point_samples_use_whole_images_or_crops():
    prompts = TrainPromptConfig(modes={"point": 1.0})
    data = ZoomTrainSet([native_set(weight=8.0)], prompts, ZoomConfig(whole_image_points=0.5), 64, seed=0)
    assert len(data) == 8
    kinds = [item["kind"] for item in (data[(0, i)] for i in range(8))]
    assert set(kinds) == {"point"}
    assert full_roi((H, W)) == Roi(0, 0, W, H)


def _touches_border(target: torch.Tensor) -> bool:
    t = target > 0.5
    return bool(t[0].any() or t[-1].any() or t[:, 0].any() or t[:, -1].any())


def test_tap_crops_centre_the_tap_and_may_cut_the_object_off():
    prompts = TrainPromptConfig(modes={"point": 1.0}, center_point_prob=0.0)
    taps = ZoomTrainSet([native_set(weight=8.0)], prompts, ZoomConfig(tap_crops=1.0, intensity=0.0), 64, seed=0,
                        hflip=0.0)
    items = [taps[(epoch, i)] for epoch in range(4) for i in range(8)]
    for item in items:
        # the crop is a square centred on the tap: the tap lands in the middle of the model input
        assert np.allclose(item["coords"][0].numpy(), 32, atol=1.5)
        assert item["target"][32, 32] == 1
    # the smallest sides (0.12, 0.2 of the longer side) are narrower than the 40 px wide object
    assert min(TAP_SIDES) * W < 40
    assert any(_touches_border(item["target"]) for item in items)
    whole = ZoomTrainSet([native_set(weight=8.0)], prompts, ZoomConfig(tap_crops=0.0, intensity=0.0), 64, seed=0,
                         hflip=0.0)
    assert not any(_touches_border(whole[(epoch, i)]["target"]) for epoch in range(4) for i in range(8))


def test_a_sample_counts_the_object_area_its_crop_cut_off():
    points = TrainPromptConfig(modes={"point": 1.0}, center_point_prob=0.0)
    taps = ZoomTrainSet([native_set(weight=8.0)], points, ZoomConfig(tap_crops=1.0, intensity=0.0), 64, seed=0,
                        hflip=0.0)
    items = [taps[(epoch, i)] for epoch in range(4) for i in range(8)]
    # an object clear of the crop's border is all inside it; most that touch it go on beyond it
    assert all(item["outside"] == 0 for item in items if not _touches_border(item["target"]))
    cut = [item["outside"] > 0 for item in items if _touches_border(item["target"])]
    assert len(cut) >= 8 and sum(cut) >= len(cut) - 1
    boxes = ZoomTrainSet([native_set()], TrainPromptConfig(modes={"box": 1.0}), ZoomConfig(intensity=0.0), 64,
                         seed=0, hflip=0.0)
    assert all(boxes[(epoch, 0)]["outside"] == 0 for epoch in range(4))


def test_tap_crops_leave_box_samples_alone():
    prompts = TrainPromptConfig(modes={"box": 1.0}, jitter=(0.0,))
    plain, taps = (ZoomTrainSet([native_set()], prompts, ZoomConfig(tap_crops=p, intensity=0.0), 64, seed=0,
                                hflip=0.0) for p in (0.0, 1.0))
    for epoch in range(3):
        assert torch.equal(plain[(epoch, 0)]["image"], taps[(epoch, 0)]["image"])


def test_region_targets_grow_by_map_pixels_scaled_to_the_image():
    maps = np.zeros((1, 32, 64), np.uint8)  # a 128 x 256 image's maps at half its size
    maps[0, 10:20, 20:40] = 1
    images = [np.zeros((128, 256), np.float32)]
    plain = NativeSet("r", ["a"], images, None, [maps]).target(0, np.random.default_rng(0))
    grown = NativeSet("r", ["a"], images, None, [maps], region_grow=2.0).target(0, np.random.default_rng(0))
    assert plain.sum() == 10 * 20 * 16
    assert np.array_equal(grown, grow_region(plain, 8.0))  # 2 map pixels = 8 image pixels


def test_region_grow_is_checked():
    with pytest.raises(ValueError, match="region_grow"):
        ZoomConfig(region_grow=-1.0)


@pytest.mark.parametrize("field", ["tap_crops", "whole_image_points", "intensity"])
def test_zoom_probabilities_are_checked(field):
    with pytest.raises(ValueError, match=field):
        ZoomConfig(**{field: 1.5})


def test_zoomed_training_run_writes_a_zoomed_checkpoint(tmp_path):
    root = write_phantom_dataset(tmp_path / "ph", 8, seed=3, size=96, n_lesions=2)
    stems = [f"phantom_{i:04d}" for i in range(8)]
    (root / "splits.json").write_text(json.dumps({"train": stems[:6], "val": stems[6:], "test": []}))
    config = TrainConfig.from_dict({
        "model": {"preset": "mini", "image_size": 64,
                  "config": {"name": "c8", "trunk": {"embed_dim": 8}, "neck": {"d_model": 32},
                             "decoder": {"transformer_mlp_dim": 64, "iou_head_hidden_dim": 32}}},
        "data": [{"path": str(root)}],
        "zoom": {"inference_margin": 1.3},
        "prompts": {"train": {"modes": {"box": 0.5, "box+click": 0.25, "point": 0.25}}},
        "optim": {"lr": 1e-3, "epochs": 1, "batch_size": 4, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"), "progress": False, "threads": 1}, "test")
    result = train(config)
    assert result.epochs and result.epochs[-1]["val_dice"] is not None
    predictor = load_predictor(Path(tmp_path / "run" / "best.pt"))
    assert isinstance(predictor, ZoomPredictor) and predictor.margin == 1.3
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["data"]["train"][root.name]["targets"] == "labels"


def test_regions_entries_need_zoom_and_no_val(tmp_path):
    from uniultra.config_io import ConfigError

    with pytest.raises(ValueError, match="split_val: null"):
        TrainConfig.from_dict({"data": [{"path": "x", "targets": "regions"}]}, "t")
    with pytest.raises(ConfigError, match="zoom"):
        TrainConfig.from_dict({"data": [{"path": "x", "targets": "regions", "split_val": None}]}, "t")


def _candidate(mask: np.ndarray, predicted_iou: float, cut_off: bool = False) -> tuple:
    return mask[None], np.array([predicted_iou]), None, cut_off


def test_tap_candidates_agreeing_alike_are_told_apart_by_the_predicted_iou():
    square = np.zeros((20, 20), bool)
    square[5:15, 5:15] = True
    small, large = square.copy(), square.copy()
    small[5:15, 5] = False
    large[5:15, 15] = True  # each differs from the square by one column: equal agreement, 0.9 IoU
    answers = [_candidate(small, 0.5), _candidate(square, 0.5), _candidate(large, 0.55)]
    assert TAP_SCORE_WEIGHT > 0
    assert _most_agreed(answers, 0.0, logits=False) == 1  # agreement first: the square agrees with both
    answers = [_candidate(small, 0.3), _candidate(large, 0.9)]
    assert _most_agreed(answers, 0.0, logits=False) == 1  # a tie in agreement: the higher predicted IoU
    answers = [_candidate(small, 0.3), _candidate(large, 0.9, cut_off=True)]
    assert _most_agreed(answers, 0.0, logits=False) == 0  # cut off by its crop: penalised


def test_region_answers_alike_vote_once():
    """Three near-identical region answers (nested regions of several levels) do not outvote two crops
    that agree with each other; without `copies_from` they would."""
    square = np.zeros((40, 40), bool)
    square[10:20, 10:20] = True
    nearly = square.copy()
    nearly[10:20, 19] = False
    region = np.zeros((40, 40), bool)
    region[5:35, 5:35] = True
    answers = [_candidate(square, 0.5), _candidate(nearly, 0.5)] + [_candidate(region, 0.5) for _ in range(3)]
    assert _most_agreed(answers, 0.0, logits=False) >= 2
    assert _most_agreed(answers, 0.0, logits=False, copies_from=2) == 0


def test_touches_border_tells_each_mask_apart():
    masks = np.zeros((4, 10, 12), bool)
    masks[0, 3:6, 3:6] = True  # inside
    masks[1, 0, 5] = True  # top row
    masks[2, 4, -1] = True  # right column
    masks[3, 2:-2, 1:-1] = True  # one pixel short of every border
    assert touches_border(masks).tolist() == [False, True, True, False]


# --- taps located by an automatic head -----------------------------------------------------------

class HeadStub:
    """A zoomed model's inner predictor with an automatic head of two channels. Its head finds
    `head_mask`; on any crop, a box is answered with the box filled and a tap alone with a 5 x 5 blob."""

    mask_threshold = 0.0
    modality_choices = ("a", "b")

    def __init__(self, head_mask: np.ndarray, head_logits: np.ndarray | None = None) -> None:
        self.head_mask, self.modality, self.auto_calls, self.gates = head_mask, None, [], []
        self.head_logits = np.where(head_mask, 10.0, -10.0).astype(np.float32) if head_logits is None else head_logits

    def selects_modality(self, automatic: bool = False, tap: bool = False) -> bool:
        return automatic

    def check_modality(self, name: str) -> None:
        if name not in self.modality_choices:
            raise ValueError(f"unknown modality {name}")

    def set_image(self, image: np.ndarray) -> None:
        self.hw = image.shape[:2]

    def predict_auto(self, modality=None, return_logits=False, presence_gate="calibrated"):
        self.auto_calls.append(modality)
        self.gates.append(presence_gate)
        return (self.head_logits if return_logits else self.head_mask), 1.0, np.zeros((16, 16))

    def predict(self, box=None, points=None, labels=None, multimask=False, return_logits=False):
        answer = np.zeros(self.hw, bool)
        if box is not None:
            x0, y0, x1, y1 = np.round(np.asarray(box, dtype=float).ravel()).astype(int)
            answer[max(y0, 0):y1 + 1, max(x0, 0):x1 + 1] = True
        else:
            x, y = np.round(np.asarray(points, dtype=float).reshape(-1, 2)[0]).astype(int)
            answer[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = True
        logits = np.where(answer, 10.0, -10.0)[None].astype(np.float32)
        return (logits if return_logits else answer[None]), np.array([0.9]), np.zeros((1, 16, 16))


def _rectangle(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _tap(zoom: ZoomPredictor, x: float, y: float) -> np.ndarray:
    zoom.set_image(speckle())
    return zoom.predict(points=[[x, y]], labels=[1])[0][0]


def test_a_tap_in_the_heads_part_is_answered_as_its_box():
    head = _rectangle(40, 30, 100, 80)
    stub = HeadStub(head)
    zoom = ZoomPredictor(stub, tap_regions=False)  # the crops alone answer what the head does not locate
    assert zoom.selects_modality(tap=True) and not zoom.selects_modality()
    stub.modality = "b"
    answer = _tap(zoom, 70, 55)
    assert stub.auto_calls == ["b"] and stub.gates == ["off"]  # a tap says the object is there: no presence gate
    # The part's box (loosened by TAP_LOCATOR_PADDING) filled by the box answer, averaged with the head's
    # logits: where the head says a firm no inside the loosened box, the mean says no too.
    np.testing.assert_array_equal(answer, head)
    zoom.exact_boxes = True  # --tight-boxes: the part's loosened box still goes without the exact-box tokens
    np.testing.assert_array_equal(_tap(zoom, 70, 55), answer)  # (the stub takes no exact_box argument)
    zoom.exact_boxes = False
    # Without the locator (or a modality, or a part under the tap) the crops answer: the 5 x 5 blob.
    for modality, locator, x, y in (("b", False, 70, 55), (None, True, 70, 55), ("b", True, 20, 100)):
        stub.modality, zoom.tap_locator = modality, locator
        assert _tap(zoom, x, y).sum() <= 25
    assert not ZoomPredictor(stub, tap_locator=False).selects_modality(tap=True)


def test_a_located_tap_is_the_mean_of_the_heads_and_the_box_answers_logits():
    head = _rectangle(40, 30, 100, 80)
    logits = np.full((H, W), -10.0, np.float32)
    logits[28:82, 38:102] = -2.0  # a weak no around the part, inside its loosened box
    logits[head] = 10.0
    stub = HeadStub(head, logits)
    stub.modality = "a"
    answer = _tap(ZoomPredictor(stub, tap_regions=False), 70, 55)
    # Box answer +10 everywhere in the box: the weak ring joins ((10 - 2) / 2 > 0), the rest stays out.
    np.testing.assert_array_equal(answer, logits > -5)


def test_a_located_answer_that_disagrees_with_the_part_is_not_kept():
    head = _rectangle(20, 20, 30, 100) | _rectangle(20, 90, 140, 100)  # an L: its box is mostly not the part
    stub = HeadStub(head)
    stub.modality = "a"
    answer = _tap(ZoomPredictor(stub, tap_regions=False), 25, 50)
    assert stub.auto_calls == ["a"] and answer.sum() <= 25


def test_a_disagreeing_located_answer_can_join_the_crops_vote(monkeypatch):
    import uniultra.inference.zoom as zoom_module

    head = _rectangle(20, 20, 30, 100) | _rectangle(20, 90, 140, 100)
    stub = HeadStub(head)
    stub.modality = "a"
    voted = []
    most_agreed = zoom_module._most_agreed
    monkeypatch.setattr(zoom_module, "_most_agreed", lambda answers, *a, **k: voted.append(answers) or
                        most_agreed(answers, *a, **k))
    for votes in (False, True):
        answer = _tap(ZoomPredictor(stub, tap_regions=False, tap_locator_votes=votes), 25, 50)
        assert answer.sum() <= 25  # the crops agree with each other, not with the L's box answer
    without, with_located = (len(v) for v in voted)
    assert with_located == without + 1 and voted[1][-1][0][0][head].all()


def test_taps_need_no_modality_where_boxes_need_none():
    from uniultra.inference.auto_predictor import check_modality_option, choose_modality

    zoom = ZoomPredictor(HeadStub(_rectangle(40, 30, 100, 80)))
    assert choose_modality(zoom, None, "unknown-set", required=False) is None
    assert choose_modality(zoom, None, "b", required=False) == "b"
    with pytest.raises(ValueError, match="--modality"):
        choose_modality(zoom, None, "unknown-set")
    check_modality_option(zoom, "stub", "a", automatic=False, tap=True)  # a channel locates taps: accepted
    with pytest.raises(ValueError, match="point prompts only"):
        check_modality_option(zoom, "stub", "a", automatic=False)


# --- taps answered on the unsupervised regions that hold them ---------------------------------------

def test_regions_holding_a_point_fine_to_coarse_without_repeats():
    maps = np.zeros((3, 8, 8), np.uint8)
    maps[0, 2:4, 2:4] = 1  # a small region
    maps[1, 2:4, 2:4] = 1  # the same region again: given once
    maps[2, 0:6, 0:6] = 2  # a coarse one
    regions = regions_holding(maps, np.array([[6.0, 6.0]]), (16, 16))  # (x, y) in a 16 x 16 image
    assert [r.shape for r in regions] == [(16, 16), (16, 16)]
    assert regions[0].sum() == 4 * 4 and regions[0][4:8, 4:8].all()
    assert regions[1].sum() == 12 * 12
    assert regions_holding(maps, np.array([[15.0, 15.0]]), (16, 16)) == []  # no region there (label 0)
    # a region that also holds a negative point is left out
    avoided = regions_holding(maps, np.array([[6.0, 6.0]]), (16, 16), avoid=np.array([[1.0, 1.0]]))
    assert len(avoided) == 1 and avoided[0].sum() == 16


def test_a_tap_is_also_answered_on_each_region_holding_it(base):
    phantom = make_phantom(3, (H, W), n_lesions=1)
    tap = np.argwhere(phantom.mask).mean(axis=0)[::-1]
    regions = regions_holding(region_label_maps(phantom.image), tap[None], (H, W))
    assert regions, "the phantom's lesion should lie in some region"
    counting = CountingPredictor(base)
    zoom = ZoomPredictor(counting)
    zoom.set_image(phantom.image)
    masks, _, _ = zoom.predict(points=[tap], labels=[1])
    # the whole-image pass, the crops of the first pass and of each square, then one crop per region
    assert len(counting.shapes) == 2 + len(zoom.tap_scales) + len(regions)
    for prompt in ({"box": [40, 30, 100, 80]}, {"points": [tap], "labels": [1], "multimask": True}):
        counting.shapes.clear()
        zoom.predict(**prompt)
        assert len(counting.shapes) <= 2 + len(zoom.tap_scales), prompt  # no region crops
    # A named anatomy is one the model was trained on: its own crops answer there, not the regions.
    counting.shapes.clear()
    counting.inner.modality = "busi"
    try:
        zoom.predict(points=[tap], labels=[1])
    finally:
        counting.inner.modality = None
    assert len(counting.shapes) == 2 + len(zoom.tap_scales)
