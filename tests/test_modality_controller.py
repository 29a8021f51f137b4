"""uniultra.peft.controller: the modality controller in the Hiera blocks (SPEC 5).

Random-weight `mini` models (windowed and global blocks, q-pooling) at 64-128 px, one thread:
a zeroed controller is exactly the shared network, gradients reach it from the first step,
samples are routed by their own modality, and checkpoints rebuild it.
"""

from __future__ import annotations

import pytest
import torch

from uniultra.inference.loading import load_model, pack_model
from uniultra.models.checkpoint import CheckpointError, read_checkpoint, save_model
from uniultra.models.config import preset
from uniultra.models.image_model import SAM2ImageModel
from uniultra.peft import PeftConfig, apply_peft
from uniultra.peft.controller import (
    BlockController,
    ControllerConfig,
    attach_modality_controller,
    controller_config,
    controller_parameters,
    detach_modality_controller,
    find_controllers,
    modality_ids,
    set_modality,
    use_modality,
)

SIZE = 128
MODALITIES = ("busi", "ddti", "tg3k")

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_adapters(seed: int = 0, size: int = SIZE) -> SAM2ImageModel:
    torch.manual_seed(seed)
    model = SAM2ImageModel(preset("mini", size))
    apply_peft(model, PeftConfig(method="ch_adapter", edge_channels=2))
    with torch.no_grad():  # non-zero adapters, so the controller is tested next to a working adapter
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, 0.1)
    return model.eval()


def images(n: int = 3, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomise(controllers, rows=None, seed: int = 1) -> None:
    """Give the controllers (all modalities, or the listed rows) non-zero values everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in controllers:
            for p in c.parameters():
                noise = torch.randn(p.shape, generator=g) * 0.2
                if rows is None:
                    p.copy_(noise)
                else:
                    p[rows] = noise[rows]


def encode(model: SAM2ImageModel, x: torch.Tensor) -> list[torch.Tensor]:
    """Every encoder output: the trunk's four stages and the FPN outputs."""
    with torch.no_grad():
        out = model.image_encoder(x, with_position_encoding=False)
        return [*model.image_encoder.trunk(x), *out["backbone_fpn"]]


def test_zeroed_controller_is_exactly_the_shared_network():
    model = model_with_adapters()
    x = images()
    reference = encode(model, x)
    controllers = attach_modality_controller(model, MODALITIES)
    assert len(controllers) == len(model.image_encoder.trunk.blocks) == 12
    assert all(torch.equal(a, b) for a, b in zip(encode(model, x), reference, strict=True))
    with use_modality(model, torch.tensor([0, 1, 2])):
        selected = encode(model, x)
    diffs = [float((a - b).abs().max()) for a, b in zip(selected, reference, strict=True)]
    assert max(diffs) < 1e-6
    assert max(diffs) == 0.0  # not merely close: the zero terms add exact zeros


def test_gradients_reach_value_tokens_and_up_projections_at_once():
    model = model_with_adapters()
    controllers = attach_modality_controller(model, MODALITIES)
    with use_modality(model, [0, 2, 2]):
        loss = sum(o.square().mean() for o in model.image_encoder.trunk(images()))
    loss.backward()
    for i, c in enumerate(controllers):
        # Modalities 0 and 2 are in the batch: their value tokens and up projections learn now.
        for row in (0, 2):
            assert c.value.grad[row].abs().sum() > 0, f"block {i} value row {row}"
            assert c.up_weight.grad[row].abs().sum() > 0, f"block {i} up row {row}"
            assert c.up_bias.grad[row].abs().sum() > 0, f"block {i} up bias row {row}"
        # Modality 1 is absent: exactly zero gradient (gathered rows only).
        assert all(float(p.grad[1].abs().max()) == 0.0 for p in c.parameters())
    names = [n for n, _ in controllers[0].named_parameters()]
    assert set(controller_parameters(model)) == {f"image_encoder.trunk.blocks.{i}.controller.{n}"
                                                 for i in range(12) for n in names}


def test_each_sample_follows_its_own_modality():
    model = model_with_adapters()
    controllers = attach_modality_controller(model, MODALITIES)
    randomise(controllers)
    x, ids = images(4), torch.tensor([0, 1, 2, 1])
    with use_modality(model, ids):
        batched = encode(model, x)
    # A sample's output is the one it gets alone with its modality (per-sample routing, every window).
    for i in range(4):
        with use_modality(model, ids[i:i + 1]):
            alone = encode(model, x[i:i + 1])
        for a, b in zip(batched, alone, strict=True):
            torch.testing.assert_close(a[i:i + 1], b, rtol=1e-5, atol=1e-5)
    # Changing modality 1's parameters changes samples 1 and 3 only, bit for bit.
    randomise(controllers, rows=1, seed=7)
    with use_modality(model, ids):
        changed = encode(model, x)
    for a, b in zip(batched, changed, strict=True):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert any(not torch.equal(a[[1, 3]], b[[1, 3]]) for a, b in zip(batched, changed, strict=True))
    # Different modalities give different features for the same image.
    with use_modality(model, "busi"):
        first = encode(model, x[:1])
    with use_modality(model, "tg3k"):
        third = encode(model, x[:1])
    assert not torch.equal(first[-1], third[-1])


def test_no_modality_and_detached_controller_are_the_shared_network():
    model = model_with_adapters()
    x = images(2)
    reference = encode(model, x)
    keys = set(model.state_dict())
    randomise(attach_modality_controller(model, MODALITIES))
    assert all(torch.equal(a, b) for a, b in zip(encode(model, x), reference, strict=True))  # nothing selected
    set_modality(model, [1, 1])
    assert not all(torch.equal(a, b) for a, b in zip(encode(model, x), reference, strict=True))
    with use_modality(model, None):
        assert all(torch.equal(a, b) for a, b in zip(encode(model, x), reference, strict=True))
    assert find_controllers(model)[0].ids.tolist() == [1, 1]  # restored after the block
    set_modality(model, None)
    detach_modality_controller(model)
    assert set(model.state_dict()) == keys and not find_controllers(model) and controller_config(model) is None
    assert all(torch.equal(a, b) for a, b in zip(encode(model, x), reference, strict=True))


def test_ids_names_and_errors():
    model = model_with_adapters(size=64)
    with pytest.raises(ValueError, match="no modality controller"):
        set_modality(model, [0])
    attach_modality_controller(model, MODALITIES, bottleneck=4, blocks=[0, 5, 11])
    assert modality_ids(model, ["tg3k", "busi"]).tolist() == [2, 0]
    assert modality_ids(model, "ddti").tolist() == [1] and modality_ids(model, 2).tolist() == [2]
    with pytest.raises(ValueError, match="unknown modality 'cars'"):
        set_modality(model, "cars")
    with pytest.raises(ValueError, match="out of range"):
        set_modality(model, torch.tensor([3]))
    with pytest.raises(ValueError, match="already attached"):
        attach_modality_controller(model, MODALITIES)
    with pytest.raises(ValueError, match="distinct"):
        ControllerConfig(("a", "a"))
    assert controller_config(model) == ControllerConfig(MODALITIES, 4, (0, 5, 11))
    # One id for the whole batch broadcasts; a count that fits neither samples nor windows does not.
    x = images(3, size=64)
    with use_modality(model, [1]):
        one = encode(model, x)
    with use_modality(model, [1, 1, 1]):
        assert all(torch.equal(a, b) for a, b in zip(one, encode(model, x), strict=True))
    with use_modality(model, [0, 1]), pytest.raises(ValueError, match="do not fit"):
        encode(model, x)
    block = model.image_encoder.trunk.blocks[5]
    assert isinstance(block.controller, BlockController) and model.image_encoder.trunk.blocks[1].controller is None


def test_checkpoint_rebuilds_the_controller(tmp_path):
    model = model_with_adapters(size=64)
    controllers = attach_modality_controller(model, MODALITIES, bottleneck=4)
    randomise(controllers)
    path = tmp_path / "student.pt"
    save_model(model, path, meta={"weights": "full", "peft": model.peft_config.to_dict(),
                                  "modality_controller": controller_config(model).to_dict()})
    x = images(2, size=64)
    loaded = load_model(path)
    assert controller_config(loaded) == ControllerConfig(MODALITIES, 4)
    for ids in (None, ["ddti", "busi"]):
        with use_modality(model, ids), use_modality(loaded, ids):
            assert all(torch.equal(a, b) for a, b in zip(encode(model, x), encode(loaded, x), strict=True))
    packed = pack_model(path, tmp_path / "packed.pt")
    assert read_checkpoint(packed)["meta"]["modality_controller"]["modalities"] == list(MODALITIES)
    assert controller_config(load_model(packed)) == ControllerConfig(MODALITIES, 4)
    # Without the recorded config the controller keys cannot be placed.
    save_model(model, tmp_path / "bad.pt", meta={"weights": "full", "peft": model.peft_config.to_dict()})
    with pytest.raises(CheckpointError, match="controller"):
        load_model(tmp_path / "bad.pt")
