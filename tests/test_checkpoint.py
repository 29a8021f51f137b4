from __future__ import annotations

import pytest
import torch

from uniultra.inference.loading import load_model, load_uniultra
from uniultra.models.checkpoint import CheckpointError, infer_preset, load_official, save_model
from uniultra.models.image_model import SAM2ImageModel


@pytest.fixture(scope="module")
def mini() -> SAM2ImageModel:
    torch.manual_seed(0)
    return SAM2ImageModel.from_preset("mini", 256).eval()


def official_like_state(model: SAM2ImageModel) -> dict[str, torch.Tensor]:
    """What an official checkpoint holds: the image path plus video-memory modules."""
    state = dict(model.state_dict())
    state["memory_attention.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
    state["memory_encoder.out_proj.weight"] = torch.zeros(2, 2)
    state["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    return state


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_official_format_loads_and_reports_ignored_keys(mini, tmp_path):
    path = tmp_path / "sam2.1_hiera_mini.pt"
    torch.save({"model": official_like_state(mini)}, path)
    model, report = load_official(path, image_size=256)
    assert report.preset == "mini"
    assert report.ignored_keys == ["maskmem_tpos_enc", "memory_attention.layers.0.self_attn.q_proj.weight",
                                   "memory_encoder.out_proj.weight"]
    assert "memory_attention" in report.summary()
    assert same_weights(model, mini)


def test_missing_image_key_fails_loudly(mini, tmp_path):
    state = official_like_state(mini)
    del state["sam_mask_decoder.iou_token.weight"]
    path = tmp_path / "broken.pt"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"broken\.pt.*missing 1 image-path keys.*iou_token"):
        load_official(path, image_size=256)


def test_wrong_preset_is_named(mini, tmp_path):
    path = tmp_path / "mini.pt"
    torch.save({"model": official_like_state(mini)}, path)
    with pytest.raises(CheckpointError, match="shape mismatch|missing|does not have"):
        load_official(path, image_size=256, preset_name="tiny")


def test_infer_preset_from_width_and_depth(mini):
    assert infer_preset(mini.state_dict()) == "mini"
    with pytest.raises(CheckpointError, match="not a SAM2 model"):
        infer_preset({"foo": torch.zeros(1)})


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_uniultra_round_trip(mini, tmp_path, suffix):
    path = save_model(mini, tmp_path / f"model{suffix}", meta={"note": "test"})
    model, report = load_uniultra(path)
    assert report.preset == "mini" and model.config == mini.config
    assert same_weights(model, mini)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file may be left behind"
    # The same checkpoint can run at another input size: position embeddings are interpolated.
    bigger = load_model(path, image_size=320)
    assert bigger.image_size == 320 and same_weights(bigger, mini)


def test_corrupt_and_missing_files_are_named(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "hook": CheckpointError("x")}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_model(path)


@pytest.mark.parametrize("half", [False, True])
def test_pack_makes_a_standalone_file(mini, tmp_path, half):
    from uniultra.cli import main

    src = save_model(mini, tmp_path / "src.pt")
    out = tmp_path / "packed.safetensors"
    assert main(["pack", str(src), str(out), *(["--half"] if half else []), "--meta", '{"note": "x"}']) == 0
    packed = load_model(out)
    a, b = mini.state_dict(), packed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if half and a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k].half().float(), rtol=0, atol=0)
        else:
            assert torch.equal(a[k], b[k])
    assert packed.state_dict()["no_mem_embed"].dtype == torch.float32


def test_pack_keeps_adapters(tmp_path):
    from uniultra.inference.loading import pack_model
    from uniultra.peft import PeftConfig, apply_peft

    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset("mini", 64)
    apply_peft(model, PeftConfig(method="ch_adapter"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name:
                p.normal_()
    src = save_model(model, tmp_path / "ad.pt", meta={"peft": model.peft_config.to_dict()})
    packed = load_model(pack_model(src, tmp_path / "ad.safetensors"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(packed.encode_image(x).image_embed, model.eval().encode_image(x).image_embed)
