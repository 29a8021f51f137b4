"""`uniultra predict` and `uniultra demo` end to end with a small random-weight model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from uniultra.cli import main
from uniultra.data.phantom import write_phantom_dataset
from uniultra.models.checkpoint import save_model
from uniultra.models.image_model import SAM2ImageModel


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    return str(save_model(SAM2ImageModel.from_preset("mini", 128), tmp_path_factory.mktemp("m") / "mini.pt"))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "phantoms", 3, seed=1, size=(120, 160))


def test_predict_one_image_writes_mask_of_image_size(model_path, phantoms, tmp_path, capsys):
    image = phantoms / "images" / "phantom_0000.png"
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    code = main(["predict", "--model", model_path, "--image", str(image), "--box", "10", "20", "90", "100",
                 "--point", "50", "60", "--out", str(out), "--overlay", str(overlay)])
    assert code == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (120, 160) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == (160, 120)
    assert "foreground pixels" in capsys.readouterr().out


def test_predict_refuses_to_overwrite_its_input(model_path, phantoms, capsys):
    image = str(phantoms / "images" / "phantom_0001.png")
    before = (phantoms / "images" / "phantom_0001.png").read_bytes()
    assert main(["predict", "--model", model_path, "--image", image, "--box", "1", "1", "50", "50",
                 "--out", image]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (phantoms / "images" / "phantom_0001.png").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [([], "at least one --box"), (["--box", "500", "1", "600", "50"], "outside the image")],
)
def test_predict_bad_prompts_are_clear(model_path, phantoms, tmp_path, capsys, extra, message):
    image = str(phantoms / "images" / "phantom_0000.png")
    assert main(["predict", "--model", model_path, "--image", image, "--out", str(tmp_path / "m.png"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_folder_mode_with_masks_and_with_boxes_json(model_path, phantoms, tmp_path, capsys):
    assert main(["predict", "--model", model_path, "--input", str(phantoms), "--output", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "a" / "masks").iterdir()) == [
        "phantom_0000.png", "phantom_0001.png", "phantom_0002.png"]
    assert "mean Dice" in capsys.readouterr().out
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"phantom_0002": [[5, 5, 60, 70], [70, 40, 150, 110]]}))
    assert main(["predict", "--model", model_path, "--input", str(phantoms / "images"), "--boxes", str(boxes),
                 "--output", str(tmp_path / "b"), "--no-progress"]) == 0
    assert [p.name for p in (tmp_path / "b" / "masks").iterdir()] == ["phantom_0002.png"]


def test_folder_without_masks_or_boxes_is_explained(model_path, phantoms, tmp_path, capsys):
    assert main(["predict", "--model", model_path, "--input", str(phantoms / "images"),
                 "--output", str(tmp_path / "c")]) == 2
    assert "--boxes" in capsys.readouterr().err


def test_demo_prints_dice_for_every_image(model_path, tmp_path, capsys):
    assert main(["demo", "--model", model_path, "--output", str(tmp_path / "demo"), "--n", "3",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("phantom_")]
    assert len(rows) == 3 and "mean" in out
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == 3


def test_default_model_missing_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import uniultra.inference.loading as ckpt

    monkeypatch.setattr(ckpt, "bundled_default_path", lambda: tmp_path / "absent.safetensors")
    assert main(["demo", "--output", str(tmp_path / "d"), "--n", "1"]) == 2
    assert "bundled default model" in capsys.readouterr().err
