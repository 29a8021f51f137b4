"""The bundled default model: what MODEL_CARD.md promises, checked on every test run."""

from __future__ import annotations

import numpy as np
import pytest

from uniultra.data.phantom import make_phantom
from uniultra.data.prompts import make_prompt
from uniultra.evaluation.baselines import fill_ellipses
from uniultra.evaluation.efficiency import count_parameters
from uniultra.evaluation.metrics import dice_score
from uniultra.inference.loading import bundled_default_path, load_model, predictor_for
from uniultra.inference.zoom import ZoomPredictor
from uniultra.segment.folder import segment_image

pytestmark = pytest.mark.skipif(not bundled_default_path().is_file(), reason="no bundled default model")


@pytest.fixture(scope="module")
def default_model():
    return load_model("default")


def test_encoder_is_under_a_million_parameters(default_model):
    assert count_parameters(default_model.image_encoder) <= 900_000
    assert default_model.image_size == 256
    # fp16: the base (10.1 MB) and the automatic head with its own decoder copy (10.3 MB) and, since
    # 2026-12-06 evening, its own whole-scan encoder (1.8 MB).
    assert bundled_default_path().stat().st_size < 23e6


def test_runs_zoomed_and_without_the_lattice(default_model):
    predictor = predictor_for(default_model)
    assert isinstance(predictor, ZoomPredictor) and predictor.margin == 1.4
    assert default_model.config.decoder.upscale_blur == 2


def test_segments_phantoms_it_never_saw(default_model):
    # Seeds far from the training phantoms (seeds 0..239 of write_phantom_dataset).
    predictor = predictor_for(default_model)
    dice, ellipse = [], []
    for seed in range(10_000, 10_012):
        phantom = make_phantom(seed, size=256, kind="mixed" if seed % 2 else "hypoechoic")
        prompt = make_prompt(phantom.mask, "box", stem=str(seed), seed=0, jitter=20)
        mask = segment_image(predictor, phantom.image, prompt)
        dice.append(dice_score(mask, phantom.mask))
        ellipse.append(dice_score(fill_ellipses(prompt.boxes, phantom.mask.shape), phantom.mask))
    # Measured at bundling: 0.886 against 0.860 for the ellipse under the same boxes.
    assert np.mean(dice) > max(0.85, np.mean(ellipse)), (np.mean(dice), np.mean(ellipse))


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["busi", "tg3k", "carotid", "usgra_nerve", "usgra_vessel"])
def test_beats_the_inscribed_ellipse_on_each_test_split(default_model, name):
    """MODEL_CARD's claim: same jittered boxes (J=20, seed 0), committed test splits (not ddti: there
    the default is 0.3 below the ellipse, 91.06 vs 91.36, and MODEL_CARD says so)."""
    from dataset_factory import shared_dataset
    from uniultra.evaluation.evaluate import ModelMethod, evaluate, load_datasets, make_method

    data = load_datasets([shared_dataset(name)], "test", None)
    protocol = {"prompt_mode": "box", "jitter": 20, "seed": 0, "progress": False}
    model = evaluate(ModelMethod("default", predictor_for(default_model)), data, **protocol)[0].summary()
    ellipse = evaluate(make_method("baseline:ellipse"), data, **protocol)[0].summary()
    assert model["n"] == ellipse["n"] >= 30  # usgra_vessel: 36 of its 40 test images have a vessel
    assert model["dice"]["mean"] > ellipse["dice"]["mean"]


def test_packing_the_default_keeps_its_automatic_head(tmp_path):
    from uniultra.inference.loading import load_auto_model, pack_model
    from uniultra.models.auto_checkpoint import is_auto_checkpoint
    from uniultra.models.checkpoint import read_checkpoint

    if not is_auto_checkpoint(bundled_default_path()):
        pytest.skip("the bundled default of this installation has no automatic head")
    packed = pack_model("default", tmp_path / "default.safetensors", half=True)
    model = load_auto_model(packed)
    assert model.config.presence_head and model.config.presence_threshold is not None
    calibration = read_checkpoint(packed)["meta"]["presence_calibration"]
    assert calibration == read_checkpoint(bundled_default_path())["meta"]["presence_calibration"]
    assert calibration["split"].startswith("val") and calibration["threshold"] == pytest.approx(
        model.config.presence_threshold)
    # Its automatic path keeps an encoder of its own (a whole-scan model's), also under a million parameters,
    # and the prompt model stays the one box prompts are answered by.
    assert model.encoder is not None and count_parameters(model.encoder.image_encoder) <= 900_000
    plain = load_model("default")
    assert all(np.array_equal(v.numpy(), model.base.state_dict()[k].numpy()) for k, v in plain.state_dict().items())
    own, prompts = (m.image_encoder.trunk.patch_embed.proj.weight.detach().numpy() for m in (model.encoder, plain))
    assert not np.array_equal(own, prompts)
