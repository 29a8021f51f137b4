"""The presence gate of the automatic head: the gate itself, its calibration, and the command."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from test_auto_train import phantom_sets, run_config  # noqa: F401 (phantom_sets is a fixture)
from uniultra.auto.calibration import ImageOutcome, choose_threshold, mean_dice
from uniultra.auto.trainer import train_auto
from uniultra.cli import main
from uniultra.inference.loading import load_auto_model
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.auto_segmenter import ABSENT_LOGIT, AutoHeadConfig, AutoSegmenter
from uniultra.models.image_model import SAM2ImageModel

pytestmark = pytest.mark.usefixtures("one_thread")


def outcome(presence, dice, empty=False):
    return ImageOutcome(presence=presence, dice=dice, truth_empty=empty)


def test_threshold_gates_the_empty_images_that_the_head_is_unsure_about():
    outcomes = {
        "with_normals": [outcome(0.1, 0.0, True), outcome(0.2, 0.0, True), outcome(0.6, 0.8), outcome(0.9, 0.9)],
        "lesions_only": [outcome(0.4, 0.7), outcome(0.95, 0.9)],
    }
    result = choose_threshold(outcomes)
    # Gating below 0.3 turns both normals into Dice 1 and costs no lesion; gating higher would
    # lose the 0.4 lesion (Dice 0.7 -> 0).
    assert result.threshold == pytest.approx(0.3)
    assert result.val_dice_ungated == pytest.approx(((0.8 + 0.9) / 4 + 0.8) / 2)
    assert result.val_dice_gated == pytest.approx(((2 + 0.8 + 0.9) / 4 + 0.8) / 2)
    assert result.val_dice_gated == pytest.approx(mean_dice(outcomes, result.threshold))
    assert result.per_dataset["with_normals"]["n_gated"] == 2
    assert result.per_dataset["lesions_only"]["n_gated"] == 0


def test_no_gate_when_gating_never_helps():
    result = choose_threshold({"a": [outcome(0.2, 0.9), outcome(0.5, 0.8), outcome(0.7, 0.95)]})
    assert result.threshold is None and result.val_dice_gated == result.val_dice_ungated
    with pytest.raises(ValueError, match="at least one validation image"):
        choose_threshold({"a": []})


def test_gate_empties_absent_images_in_eval_mode_only():
    torch.manual_seed(0)
    model = AutoSegmenter(SAM2ImageModel.from_preset("mini", image_size=64), AutoHeadConfig()).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ungated = model(images, torch.zeros(2, dtype=torch.long)).low_res_logits
        model.config = dataclasses.replace(model.config, presence_threshold=1.0)  # every image is "absent"
        gated = model(images, torch.zeros(2, dtype=torch.long)).low_res_logits
        assert torch.all(gated == ABSENT_LOGIT)
        model.train()
        assert torch.equal(model(images, torch.zeros(2, dtype=torch.long)).low_res_logits, ungated)
        model.config = dataclasses.replace(model.config, presence_threshold=0.0)  # nothing is gated
        assert torch.equal(model.eval()(images, torch.zeros(2, dtype=torch.long)).low_res_logits, ungated)
    with pytest.raises(ValueError, match="presence_threshold"):
        AutoHeadConfig(presence_threshold=1.5)


def test_training_calibrates_best_pt_and_the_command_recalibrates(phantom_sets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    config = run_config(out, phantom_sets)
    result = train_auto(config)
    meta = torch.load(out / "best.pt", weights_only=True)["meta"]
    calibration = meta["presence_calibration"]
    assert calibration == result.calibration.as_dict() and calibration["split"] == "val"
    assert calibration["val_dice_gated"] >= calibration["val_dice_ungated"]
    assert load_auto_model(out / "best.pt").config.presence_threshold == calibration["threshold"]
    assert set(calibration["per_dataset"]) == {"pa", "pb"}

    config_file = tmp_path / "auto.yaml"
    import yaml

    config_file.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["auto", "calibrate", "--config", str(config_file), "--model", str(out / "best.pt")]) == 0
    again = torch.load(out / "best.pt", weights_only=True)["meta"]["presence_calibration"]
    assert again["threshold"] == calibration["threshold"]  # same weights, same val split: same choice

    # A head whose automatic path reads another encoder than the config's model.base is refused: the
    # command's cached features would not be the ones it decodes.
    other = load_auto_model(out / "best.pt")
    with torch.no_grad():
        next(other.base.image_encoder.parameters()).add_(0.1)
    save_auto_model(other, tmp_path / "other.pt")
    assert main(["auto", "calibrate", "--config", str(config_file), "--model", str(tmp_path / "other.pt")]) != 0
    assert "other.pt: its automatic path runs another image encoder" in capsys.readouterr().err
