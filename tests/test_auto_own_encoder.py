"""An automatic head on an encoder of its own (`AutoHeadConfig.own_encoder`, `uniultra pack --prompt-model`):
the head trained on one model's features moves onto another model that answers prompts.

Random weights, preset "mini" at 128 px, one torch thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniultra.cli import main
from uniultra.inference.auto_predictor import AutoPredictor
from uniultra.inference.loading import load_any_model, load_auto_model, load_model, pack_model
from uniultra.inference.predictor import Predictor
from uniultra.inference.zoom import ZoomPredictor
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter, with_own_encoder
from uniultra.models.checkpoint import CheckpointError, read_checkpoint, save_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft import PeftConfig, apply_peft

SIZE = 128
MODALITIES = ("busi", "ddti")

pytestmark = pytest.mark.usefixtures("one_thread")


def whole_scan_head(seed: int = 0) -> AutoSegmenter:
    """A head with a decoder copy on a CH-Adapter model (as the 2026-11-22 default), every weight perturbed."""
    torch.manual_seed(seed)
    features = SAM2ImageModel.from_preset("mini", SIZE)
    apply_peft(features, PeftConfig(method="ch_adapter", edge_channels=2))
    head = AutoSegmenter(features, AutoHeadConfig(MODALITIES, own_decoder=True, presence_head=True))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith(("base.", "decoder.conv_s")):  # the copy's projections are never trained
                p.add_(torch.randn_like(p) * 0.05)
    return head.eval()


def prompt_model(seed: int = 5) -> SAM2ImageModel:
    torch.manual_seed(seed)
    return SAM2ImageModel.from_preset("mini", SIZE).eval()


def scan(seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).random((90, 110)) * 255).astype(np.uint8)


def test_the_moved_head_answers_as_it_did_and_prompts_as_the_prompt_model():
    head, prompts = whole_scan_head(), prompt_model()
    combined = with_own_encoder(head, prompts).eval()
    image = scan()
    before, after, plain = AutoPredictor(head), AutoPredictor(combined), Predictor(prompts)
    for predictor in (before, after, plain):
        predictor.set_image(image)
    for channel in MODALITIES:
        mask_a, score_a, low_a = before.predict_auto(channel)
        mask_b, score_b, low_b = after.predict_auto(channel)
        assert score_a == pytest.approx(score_b, abs=1e-6)
        assert torch.allclose(torch.as_tensor(low_a), torch.as_tensor(low_b), atol=1e-5)
    box = np.array([20, 15, 80, 70])
    assert np.array_equal(after.predict(box=box)[0], plain.predict(box=box)[0])
    assert not np.array_equal(before.predict(box=box)[0], after.predict(box=box)[0])


def test_the_inputs_are_left_unchanged_and_a_head_without_a_decoder_copy_is_refused():
    head, prompts = whole_scan_head(), prompt_model()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    with_own_encoder(head, prompts)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in state.items())
    torch.manual_seed(0)
    shared = AutoSegmenter(SAM2ImageModel.from_preset("mini", SIZE), AutoHeadConfig(MODALITIES))
    with pytest.raises(ValueError, match="own_decoder"):
        with_own_encoder(shared, prompts)
    with pytest.raises(ValueError, match="own_decoder"):
        AutoHeadConfig(MODALITIES, own_encoder=True)


def test_an_encoder_of_another_input_size_is_refused():
    head = whole_scan_head()
    with pytest.raises(ValueError, match="same input"):
        with_own_encoder(head, SAM2ImageModel.from_preset("mini", 2 * SIZE))


def test_pack_with_a_prompt_model_round_trips_and_stores_the_encoder_once(tmp_path):
    head, prompts = whole_scan_head(), prompt_model()
    head_path, prompts_path = tmp_path / "head.pt", tmp_path / "prompts.safetensors"
    save_auto_model(head, head_path, meta={"presence_calibration": {"threshold": 0.4}})
    save_model(prompts, prompts_path)
    out = tmp_path / "packed.safetensors"
    assert main(["pack", str(head_path), str(out), "--prompt-model", str(prompts_path)]) == 0
    data = read_checkpoint(out)
    meta = data["meta"]
    assert meta["auto_head"]["own_encoder"] is True
    assert meta["auto_encoder"]["peft"]["method"] == "ch_adapter"
    assert meta["prompt_model"]["file"] == "prompts.safetensors"
    assert meta["presence_calibration"] == {"threshold": 0.4}
    keys = set(data["state_dict"])
    assert "auto_head.encoder.image_encoder.trunk.patch_embed.proj.weight" in keys
    assert not any(k.startswith("auto_head.encoder.sam_mask_decoder.") for k in keys)
    # load_model gives the prompt model itself; load_auto_model the head on its own encoder.
    plain = load_model(out)
    assert all(torch.equal(v, prompts.state_dict()[k]) for k, v in plain.state_dict().items())
    loaded = load_auto_model(out)
    expected = with_own_encoder(head, prompts)
    assert loaded.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert isinstance(load_any_model(out), AutoSegmenter)


def test_box_prompts_never_run_the_automatic_encoder(tmp_path, monkeypatch):
    combined = with_own_encoder(whole_scan_head(), prompt_model()).eval()
    calls = []
    original = combined.encoder.encode_image
    monkeypatch.setattr(combined.encoder, "encode_image", lambda x: calls.append(1) or original(x))
    predictor = AutoPredictor(combined)
    predictor.set_image(scan())
    predictor.predict(box=np.array([10, 10, 60, 60]))
    assert calls == []
    predictor.predict_auto("busi")
    predictor.predict_auto("ddti")
    assert calls == [1]  # once per image
    predictor.set_image(scan(4))
    predictor.predict_auto("busi")
    assert calls == [1, 1]


def test_a_prompt_model_needs_an_automatic_checkpoint_and_a_missing_encoder_config_is_named(tmp_path):
    prompts_path = tmp_path / "prompts.pt"
    save_model(prompt_model(), prompts_path)
    with pytest.raises(ValueError, match="no automatic head"):
        pack_model(prompts_path, tmp_path / "x.pt", prompt_model=prompts_path)
    packed = tmp_path / "packed.pt"
    head_path = tmp_path / "head.pt"
    save_auto_model(whole_scan_head(), head_path)
    pack_model(head_path, packed, prompt_model=prompts_path)
    data = read_checkpoint(packed)
    del data["meta"]["auto_encoder"]
    broken = tmp_path / "broken.pt"
    torch.save(data, broken)
    with pytest.raises(CheckpointError, match="auto_encoder"):
        load_auto_model(broken)


def test_info_counts_the_automatic_encoder_apart():
    from uniultra.evaluation.model_info import describe, format_info

    head, prompts = whole_scan_head(), prompt_model()
    shared = describe(head)
    combined = describe(with_own_encoder(head, prompts))
    assert shared.auto.own_encoder_params == 0 and combined.auto.own_encoder_params > 0
    assert combined.auto.head_params - shared.auto.head_params == combined.auto.own_encoder_params + sum(
        p.numel() for p in prompts.sam_prompt_encoder.parameters()) + prompts.no_mem_embed.numel()
    assert combined.encoder_params == describe(prompts).encoder_params
    assert "of which its own encoder" in format_info(combined)


def test_serving_describes_the_automatic_encoder(tmp_path):
    from uniultra.inference.loading import load_for_serving

    path = tmp_path / "combined.pt"
    save_auto_model(with_own_encoder(whole_scan_head(), prompt_model()), path)
    model, described = load_for_serving(str(path))
    assert isinstance(model, AutoSegmenter) and described.endswith("busi, ddti (on its own encoder)")
    head_path = tmp_path / "head.pt"
    save_auto_model(whole_scan_head(), head_path)
    assert "own encoder" not in load_for_serving(str(head_path))[1]


def test_taps_on_one_image_read_the_head_once(monkeypatch):
    combined = with_own_encoder(whole_scan_head(), prompt_model()).eval()
    calls = []
    original = combined.encoder.encode_image
    monkeypatch.setattr(combined.encoder, "encode_image", lambda x: calls.append(1) or original(x))
    zoom = ZoomPredictor(AutoPredictor(combined))
    zoom.modality = "busi"
    tap = dict(points=np.array([[40.0, 45.0]]), labels=np.array([1]))
    zoom.set_image(scan())
    first = zoom.predict(**tap)[0]
    second = zoom.predict(points=np.array([[70.0, 30.0]]), labels=np.array([1]))[0]
    again = zoom.predict(**tap)[0]
    assert calls == [1]  # each tap's crops re-encode for the prompt model; the head's answer is kept
    assert np.array_equal(first, again) and first.shape == second.shape == (1, *scan().shape)
    zoom.set_image(scan(4))
    zoom.predict(**tap)
    assert calls == [1, 1]
