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


# --- folder runs: bad files, Ctrl-C, --resume ------------------------------------------------------

@pytest.fixture()
def mixed_folder(tmp_path):
    """Three good phantoms, plus a corrupt image, a mask of the wrong size and an image without mask."""
    root = write_phantom_dataset(tmp_path / "mixed", 5, seed=3, size=(120, 160))
    (root / "images" / "phantom_0001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.fromarray(np.full((40, 50), 255, np.uint8)).save(root / "masks" / "phantom_0002.png")
    (root / "masks" / "phantom_0003.png").unlink()
    return root


def _outputs(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_folder_run_segments_every_good_file_and_lists_the_bad_ones(model_path, mixed_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", "--model", model_path, "--input", str(mixed_folder), "--output", str(out),
                 "--no-progress"])
    assert code == 1
    captured = capsys.readouterr()
    assert "segmented 2 images" in captured.out
    failed = captured.err.split("3 FAILED:")[1]
    assert "images/phantom_0001.png: cannot read the image" in failed
    assert "masks/phantom_0002.png: mask is 50 x 40 pixels but phantom_0002.png is 160 x 120" in failed
    assert "images/phantom_0003.png: no mask" in failed
    assert "Traceback" not in captured.err
    assert _outputs(out) == [f"{sub}/phantom_{i:04d}.png" for sub in ("masks", "overlays") for i in (0, 4)]


def test_boxes_file_problems_are_found_before_the_model_is_loaded(phantoms, tmp_path, capsys, monkeypatch):
    import uniultra.commands.segment as segment_command

    monkeypatch.setattr(segment_command, "_predict_predictor", lambda *a, **k: pytest.fail("model loaded"))
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"phantom_0000": [[5, 5, 600, 70]], "absent": [[1, 1, 9, 9]]}))
    assert main(["predict", "--input", str(phantoms / "images"), "--boxes", str(boxes),
                 "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "2 of the inputs cannot be segmented" in err and "2 FAILED" in err
    assert "phantom_0000.png: boxes.json: box [5, 5, 600, 70] lies outside the image (160 x 120" in err
    assert "boxes.json entry 'absent': no image absent.*" in err


def test_ctrl_c_leaves_only_complete_outputs_and_exits_130(model_path, phantoms, tmp_path, capsys, monkeypatch):
    import uniultra.segment.folder as folder

    real_overlay, calls = folder.overlay_image, []

    def overlay_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second image: after its mask is computed, before its files are all written
            raise KeyboardInterrupt
        return real_overlay(*args, **kwargs)

    monkeypatch.setattr(folder, "overlay_image", overlay_then_interrupt)
    out = tmp_path / "out"
    code = main(["predict", "--model", model_path, "--input", str(phantoms), "--output", str(out), "--no-progress"])
    assert code == 130
    err = capsys.readouterr().err.strip()
    assert err == "uniultra predict: interrupted after 1 of 3 images; rerun with --resume to finish"
    assert _outputs(out) == ["masks/phantom_0000.png", "overlays/phantom_0000.png"]  # no temp or half pair


def test_an_interrupted_pair_is_removed(tmp_path, monkeypatch):
    import uniultra.segment.folder as folder

    real_write = folder.atomic_write_bytes

    def write_one_then_interrupt(path, data):
        if "masks" in str(path):
            raise KeyboardInterrupt
        return real_write(path, data)

    monkeypatch.setattr(folder, "atomic_write_bytes", write_one_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        folder._write_pair([(tmp_path / "overlays" / "a.png", b"o"), (tmp_path / "masks" / "a.png", b"m")])
    assert _outputs(tmp_path) == []


def test_resume_keeps_finished_images_and_does_the_rest(model_path, phantoms, tmp_path, capsys, monkeypatch):
    import uniultra.segment.folder as folder

    out = tmp_path / "out"
    args = ["predict", "--model", model_path, "--input", str(phantoms), "--output", str(out), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    (out / "overlays" / "phantom_0001.png").unlink()  # an incomplete image: done again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    segmented = []
    real = folder.segment_image
    monkeypatch.setattr(folder, "segment_image", lambda p, image, *a: segmented.append(1) or real(p, image, *a))
    assert main([*args, "--resume"]) == 0
    again = capsys.readouterr().out
    assert len(segmented) == 1
    assert "segmented 3 images" in again and "(2 already done, kept)" in again
    assert first.split("mean Dice")[1] == again.split("mean Dice")[1]  # resumed images are scored too
    for path in (out / "masks" / "phantom_0000.png", out / "overlays" / "phantom_0002.png"):
        assert path.stat().st_mtime_ns == before[path]
    assert (out / "overlays" / "phantom_0001.png").is_file()
