"""Weight averaging (`uniultra average`, uniultra.models.weight_average): the arithmetic and its refusals."""

from __future__ import annotations

import pytest
import torch

from uniultra.cli import main
from uniultra.inference.loading import average_models, load_model
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter
from uniultra.models.checkpoint import CheckpointError, read_checkpoint, save_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.models.weight_average import average_states, normalised_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def mini(seed: int, size: int = SIZE) -> SAM2ImageModel:
    torch.manual_seed(seed)
    return SAM2ImageModel.from_preset("mini", size).eval()


def test_weighted_mean_and_integer_tensors():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3]), "h": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([3]), "h": torch.tensor([3.0], dtype=torch.float16)}
    equal = average_states([a, b])
    assert torch.equal(equal["w"], torch.tensor([2.0, 4.0])) and torch.equal(equal["n"], torch.tensor([3]))
    assert equal["h"].dtype == torch.float16 and equal["h"].item() == 2.0
    weighted = average_states([a, b], weights=[3, 1])
    assert torch.allclose(weighted["w"], torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match=r"second: integer tensor n differs from first's"):
        average_states([a, {**b, "n": torch.tensor([4])}], names=["first", "second"])


def test_layout_and_weights_are_checked():
    a = {"w": torch.zeros(2), "v": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"b\.pt has other weights than a\.pt: 0 extra.*1 missing.*'v'"):
        average_states([a, {"w": torch.zeros(2)}], names=["a.pt", "b.pt"])
    with pytest.raises(ValueError, match=r"model 1: 1 weights differ in shape.*w: \(3,\) vs \(2,\)"):
        average_states([a, {"w": torch.zeros(3), "v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="at least two"):
        normalised_weights(None, 1)
    with pytest.raises(ValueError, match="positive"):
        normalised_weights([1.0, 0.0], 2)
    with pytest.raises(ValueError, match="3 weights for 2 models"):
        normalised_weights([1, 1, 1], 2)
    assert normalised_weights([1, 3], 2) == [0.25, 0.75]


def test_average_models_writes_the_mean_of_the_weights(tmp_path):
    first, second = mini(0), mini(1)
    save_model(first, tmp_path / "a.pt")
    save_model(second, tmp_path / "b.safetensors")
    out = average_models([tmp_path / "a.pt", tmp_path / "b.safetensors"], tmp_path / "avg.safetensors",
                         weights=[1, 3])
    averaged = load_model(out).state_dict()
    for key, value in first.state_dict().items():
        assert torch.allclose(averaged[key], 0.25 * value + 0.75 * second.state_dict()[key], atol=1e-6), key
    sources = read_checkpoint(out)["meta"]["averaged_from"]
    assert [s["weight"] for s in sources] == [0.25, 0.75] and len(sources[0]["sha256"]) == 64
    image = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert load_model(out).image_encoder(image)["vision_features"].isfinite().all()


def test_refusals_name_the_file(tmp_path):
    save_model(mini(0), tmp_path / "a.pt")
    save_model(mini(1, size=128), tmp_path / "big.pt")
    with pytest.raises(CheckpointError, match=r"big\.pt: its model config differs from .*a\.pt"):
        average_models([tmp_path / "a.pt", tmp_path / "big.pt"], tmp_path / "x.pt")
    save_auto_model(AutoSegmenter(mini(2), AutoHeadConfig(("busi",))), tmp_path / "auto.pt")
    with pytest.raises(CheckpointError, match=r"auto\.pt: has an automatic head"):
        average_models([tmp_path / "a.pt", tmp_path / "auto.pt"], tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        average_models([tmp_path / "a.pt", tmp_path / "missing.pt"], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_command_line(tmp_path, capsys):
    save_model(mini(0), tmp_path / "a.pt")
    save_model(mini(1), tmp_path / "b.pt")
    out = tmp_path / "avg.pt"
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(out), "--half"]) == 0
    assert "the average of 2 models" in capsys.readouterr().out
    assert read_checkpoint(out)["meta"]["dtype"] == "float16"
    assert main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "c.pt"),
                 "--weights", "1"]) == 2
    assert "1 weights for 2 models" in capsys.readouterr().err


@pytest.mark.parametrize("meta", ["[1]", "{not json"])
def test_meta_must_be_a_json_object(tmp_path, capsys, meta):
    with pytest.raises(SystemExit):
        main(["average", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--out", str(tmp_path / "c.pt"),
              "--meta", meta])
    assert "--meta" in capsys.readouterr().err and not (tmp_path / "c.pt").exists()
