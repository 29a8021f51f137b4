"""The automatic head (SPEC 5): shapes, patch targets, modality routing, neutral start, checkpoints.

Random weights, preset "mini" at 128 px, one torch thread: every test runs in well under a second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniultra.inference.loading import load_auto_model, load_model
from uniultra.models.auto_checkpoint import is_auto_checkpoint, save_auto_model
from uniultra.models.auto_segmenter import ABSENT_LOGIT, AutoHeadConfig, AutoSegmenter, presence
from uniultra.models.checkpoint import CheckpointError, save_model
from uniultra.models.image_model import SAM2ImageModel
from uniultra.models.patch_prompt import patch_targets

SIZE = 128
MODALITIES = ("busi", "ddti", "tg3k")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(modalities=MODALITIES, modality_decoder=True, seed=0) -> AutoSegmenter:
    torch.manual_seed(seed)
    base = SAM2ImageModel.from_preset("mini", SIZE)
    return AutoSegmenter(base, AutoHeadConfig(modalities, modality_decoder)).eval()


def perturb_channels(model: AutoSegmenter) -> None:
    """Make the channels differ (an untrained head has identical ones) and the dense prompt active."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.modality_decoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        for p in model.prompt_generator.to_dense.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def features_of(model: AutoSegmenter, n: int = 3):
    torch.manual_seed(2)
    with torch.no_grad():
        return model.encode_image(model.normalize(torch.rand(n, 3, SIZE, SIZE)))


def test_output_shapes():
    model = make_model()
    out = model(model.normalize(torch.rand(2, 3, SIZE, SIZE)), torch.tensor([0, 2]))
    assert out.low_res_logits.shape == (2, 1, SIZE // 4, SIZE // 4)
    assert out.patch_logits.shape == (2, 1, SIZE // 32, SIZE // 32)
    assert model.image_size == SIZE


def test_patch_size_sets_the_patch_grid_and_is_checked():
    torch.manual_seed(0)
    base = SAM2ImageModel.from_preset("mini", SIZE)
    model = AutoSegmenter(base, AutoHeadConfig(patch_size=64)).eval()
    assert model(model.normalize(torch.rand(1, 3, SIZE, SIZE)), torch.tensor([0])).patch_logits.shape == (1, 1, 2, 2)
    with pytest.raises(ValueError, match="multiple of the backbone stride"):
        AutoSegmenter(base, AutoHeadConfig(patch_size=24))


def test_patch_target_is_the_max_pool_of_the_mask():
    mask = torch.zeros(1, 64, 96)
    mask[0, 40, 5] = 1  # one pixel: patch row 1, col 0
    mask[0, 0:32, 64:96] = 1  # a whole patch: row 0, col 2
    mask[0, 31, 63] = 1  # the last pixel of patch row 0, col 1
    expected = torch.tensor([[[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]]])
    assert torch.equal(patch_targets(mask, 32), expected)
    random = (torch.rand(2, 1, 64, 64) > 0.97).float()
    assert torch.equal(patch_targets(random, 16), F.max_pool2d(random, 16))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        patch_targets(torch.zeros(1, 1, 40, 40), 32)


def test_changing_one_samples_modality_changes_only_that_sample():
    model = make_model()
    perturb_channels(model)
    features = features_of(model)
    with torch.no_grad():
        before = model.decode_auto(features, torch.tensor([0, 1, 2])).low_res_logits
        after = model.decode_auto(features, torch.tensor([0, 2, 2])).low_res_logits
    # Batched matmuls may round differently when the batch changes: compare to float precision.
    scale = before.abs().max()
    assert (before[0] - after[0]).abs().max() <= 1e-5 * scale
    assert (before[2] - after[2]).abs().max() <= 1e-5 * scale
    assert (before[1] - after[1]).abs().max() > 1e-2 * scale
    # Each sample's output is what it gets when decoded alone with its own channel.
    with torch.no_grad():
        alone = model.decode_auto(features.select(1), torch.tensor([1])).low_res_logits
    assert (alone[0] - before[1]).abs().max() <= 1e-5 * scale


def test_a_loss_on_one_modality_leaves_the_other_channels_without_gradient():
    model = make_model()
    perturb_channels(model)
    features = features_of(model, 2)
    out = model.decode_auto(features, torch.tensor([1, 1]))
    out.low_res_logits.square().mean().backward()
    decoder = model.modality_decoder
    grad = decoder.queries.weight.grad
    assert grad[1].abs().sum() > 0
    assert torch.count_nonzero(grad[[0, 2]]) == 0
    for k, mlp in enumerate(decoder.hypernetworks):
        grads = [p.grad for p in mlp.parameters()]
        if k == 1:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_an_untrained_head_decodes_every_modality_alike_and_adds_no_dense_prompt():
    model = make_model()
    features = features_of(model, 2)
    with torch.no_grad():
        outputs = [model.decode_auto(features, torch.full((2,), k)).low_res_logits for k in range(3)]
        dense = model.prompt_generator.dense_prompt(torch.randn(2, 1, 4, 4), (8, 8))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    assert torch.count_nonzero(dense) == 0
    decoder = model.base.sam_mask_decoder
    assert torch.equal(model.modality_decoder.queries.weight[2], decoder.mask_tokens.weight[0])
    hyper = model.modality_decoder.hypernetworks[1].state_dict()
    assert all(torch.equal(v, decoder.output_hypernetworks_mlps[0].state_dict()[k]) for k, v in hyper.items())


def test_modality_names_map_to_channels():
    model = make_model()
    assert [model.modality_index(n) for n in MODALITIES] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"unknown modality 'ct'.*busi"):
        model.modality_index("ct")
    with pytest.raises(ValueError, match="name one of"):
        model.modality_index(None)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        model.decode_auto(features_of(model, 1), torch.tensor([3]))
    shared = make_model(modality_decoder=False)
    assert shared.modality_decoder.channels == 1
    assert {shared.modality_index(n) for n in (*MODALITIES, "ct", None)} == {0}
    assert make_model(modalities=("any",)).modality_index(None) == 0


def test_head_config_is_checked():
    with pytest.raises(ValueError, match="unique"):
        AutoHeadConfig(("a", "a"))
    with pytest.raises(ValueError, match="non-empty"):
        AutoHeadConfig(())
    with pytest.raises(ValueError, match="unknown auto-head config keys"):
        AutoHeadConfig.from_dict({"modalities": ["a"], "colour": 1})
    config = AutoHeadConfig(("a", "b"), False, 64)
    assert AutoHeadConfig.from_dict(config.to_dict()) == config


def test_save_load_round_trip_is_exact_and_load_model_gives_the_base(tmp_path):
    model = make_model()
    perturb_channels(model)
    path = tmp_path / "auto.pt"
    save_auto_model(model, path, meta={"note": "test"})
    assert is_auto_checkpoint(path)
    loaded = load_auto_model(path)
    assert loaded.config == model.config and not loaded.training
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    features = features_of(model, 2)
    with torch.no_grad():
        assert torch.equal(model.decode_auto(features, torch.tensor([0, 2])).low_res_logits,
                           loaded.decode_auto(features, torch.tensor([0, 2])).low_res_logits)
    base = load_model(path)
    assert type(base) is SAM2ImageModel
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.base.state_dict().items())


def test_a_plain_checkpoint_has_no_auto_head(tmp_path):
    plain = tmp_path / "plain.pt"
    save_model(make_model().base, plain)
    assert not is_auto_checkpoint(plain)
    assert not is_auto_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"plain\.pt: has no automatic head"):
        load_auto_model(plain)


def test_head_keys_without_their_config_are_a_clear_error(tmp_path):
    model = make_model()
    path = tmp_path / "auto.pt"
    save_auto_model(model, path)
    data = torch.load(path, weights_only=True)
    del data["meta"]["auto_head"]
    torch.save(data, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken\.pt.*auto_head"):
        load_model(tmp_path / "broken.pt")


# --- presence head and own decoder (the head shipped inside the default) -------------------------

def make_shipped_kind(seed=0) -> AutoSegmenter:
    torch.manual_seed(seed)
    base = SAM2ImageModel.from_preset("mini", SIZE)
    return AutoSegmenter(base, AutoHeadConfig(MODALITIES, presence_head=True, own_decoder=True)).eval()


def test_presence_head_gives_one_logit_per_image_of_its_channel():
    model = make_shipped_kind()
    with torch.no_grad():
        model.presence_head.classify.bias.copy_(torch.tensor([-3.0, 0.0, 3.0]))
        out = model.decode_auto(features_of(model, 3), torch.tensor([0, 1, 2]))
    assert out.presence_logits.shape == (3,)
    # Same weights per channel except the bias: the channel's bias orders the three images' logits.
    assert out.presence_logits[0] < out.presence_logits[1] < out.presence_logits[2]
    assert torch.allclose(presence(out), torch.sigmoid(out.presence_logits))


def test_presence_gate_uses_the_presence_head():
    model = make_shipped_kind()
    features = features_of(model, 2)
    with torch.no_grad():
        model.presence_head.classify.bias.copy_(torch.tensor([-9.0, 9.0, 0.0]))
        model.config = AutoHeadConfig(MODALITIES, presence_head=True, own_decoder=True, presence_threshold=0.5)
        out = model.decode_auto(features, torch.tensor([0, 1]))
    assert (out.low_res_logits[0] == ABSENT_LOGIT).all()  # channel 0 says "absent"
    assert not (out.low_res_logits[1] == ABSENT_LOGIT).all()


def test_training_the_own_decoder_leaves_the_base_decoder_untouched():
    model = make_shipped_kind()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    model.train()
    out = model.decode_auto(features_of(model, 2), torch.tensor([0, 1]))
    (out.low_res_logits.mean() + out.presence_logits.mean()).backward()
    decoder_grads = [p.grad for p in model.decoder.transformer.parameters() if p.grad is not None]
    assert decoder_grads and all(p.grad is None for p in model.base.sam_mask_decoder.parameters())
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.1)
    assert all(torch.equal(before[k], v) for k, v in model.base.state_dict().items())


def test_presence_head_and_own_decoder_round_trip_and_pack(tmp_path):
    from uniultra.inference.loading import pack_model

    model = make_shipped_kind()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.base.inference = {"zoom": {"margin": 1.4}}
    path = tmp_path / "auto.pt"
    save_auto_model(model, path, meta={"presence_calibration": {"threshold": 0.3}})
    packed = pack_model(path, tmp_path / "packed.safetensors", half=True)
    features = features_of(model, 2)
    for file, tolerance in ((path, 0.0), (packed, 5e-2)):
        loaded = load_auto_model(file)
        assert loaded.config.presence_head and loaded.config.own_decoder
        assert loaded.base.inference == {"zoom": {"margin": 1.4}}
        with torch.no_grad():
            a = model.decode_auto(features, torch.tensor([0, 2]))
            b = loaded.decode_auto(features, torch.tensor([0, 2]))
        assert torch.allclose(a.low_res_logits, b.low_res_logits, atol=tolerance)
        assert torch.allclose(a.presence_logits, b.presence_logits, atol=tolerance)
    from uniultra.models.checkpoint import read_checkpoint

    assert read_checkpoint(packed)["meta"]["presence_calibration"] == {"threshold": 0.3}
