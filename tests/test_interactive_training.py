"""SAM-style interactive training (uniultra.engine.interactive): clicks from the model's own errors."""

from __future__ import annotations

import pytest
import torch

from test_engine import datasets, tiny_config  # noqa: F401  (the module-scoped phantom datasets)
from uniultra.config_io import ConfigError
from uniultra.engine import trainer as trainer_module
from uniultra.engine.config import InteractiveConfig
from uniultra.engine.interactive import PADDING_LABEL, chosen_logits, error_clicks, interactive_rounds
from uniultra.engine.trainer import train
from uniultra.inference.transforms import upsample_logits
from uniultra.models.image_model import SAM2ImageModel

pytestmark = pytest.mark.usefixtures("one_thread")
S = 32


def _square(lo: int, hi: int) -> torch.Tensor:
    mask = torch.zeros(S, S)
    mask[lo:hi, lo:hi] = 1.0
    return mask


def _logits(mask: torch.Tensor) -> torch.Tensor:
    """Low-res logits (1, 1, S/4, S/4) whose upsampled threshold is `mask` (a multiple-of-4 square)."""
    low = torch.nn.functional.avg_pool2d(mask[None, None], 4)
    return torch.where(low > 0.5, 20.0, -20.0)


def test_a_missed_object_gets_a_positive_click_inside_it():
    target = _square(8, 24)[None]
    coords, labels = error_clicks(_logits(torch.zeros(S, S)), target, torch.Generator().manual_seed(0))
    assert coords.shape == (1, 1, 2) and labels.tolist() == [[1]]
    x, y = coords[0, 0].tolist()
    assert 8 <= x < 24 and 8 <= y < 24 and x % 1 == 0.5


def test_a_spill_gets_a_negative_click_outside_the_object_and_an_exact_mask_padding():
    target = _square(12, 20)[None]
    spill = _square(4, 28)
    coords, labels = error_clicks(_logits(spill), target, torch.Generator().manual_seed(1))
    x, y = coords[0, 0].tolist()
    assert labels.tolist() == [[0]] and 4 <= x < 28 and 4 <= y < 28 and not (12 <= x < 20 and 12 <= y < 20)
    logits = _logits(_square(12, 20))
    exact = (upsample_logits(logits, (S, S))[:, 0] > 0).float()  # bilinear rounds the corners
    _, labels = error_clicks(logits, exact)
    assert labels.tolist() == [[PADDING_LABEL]]


def test_clicks_are_uniform_over_the_error_region():
    # Error region: 16 x 16 square minus nothing predicted; its left and right halves are equally likely.
    target = _square(8, 24)[None].expand(2000, S, S)
    coords, _ = error_clicks(_logits(torch.zeros(S, S)).expand(2000, 1, S // 4, S // 4), target,
                             torch.Generator().manual_seed(2))
    left = (coords[:, 0, 0] < 16).float().mean().item()
    assert 0.45 < left < 0.55
    assert len({tuple(c) for c in coords[:, 0].tolist()}) > 200  # not one favourite pixel


def test_the_shown_candidate_is_the_one_with_the_highest_predicted_iou():
    logits = torch.arange(2 * 3 * 4).float().reshape(2, 3, 2, 2)
    iou = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.1, 0.3]])
    chosen = chosen_logits(logits, iou)
    assert chosen.shape == (2, 1, 2, 2)
    assert torch.equal(chosen[0, 0], logits[0, 1]) and torch.equal(chosen[1, 0], logits[1, 0])


def test_rounds_depend_only_on_seed_and_step():
    config = InteractiveConfig(rounds=3, probability=0.5)
    draws = [interactive_rounds(config, 7, step) for step in range(400)]
    assert set(draws) == {0, 3} and 0.4 < draws.count(3) / 400 < 0.6
    assert draws == [interactive_rounds(config, 7, step) for step in range(400)]
    assert interactive_rounds(None, 7, 0) == 0
    assert all(interactive_rounds(InteractiveConfig(rounds=2, probability=1.0), 0, s) == 2 for s in range(20))


@pytest.mark.parametrize("section", [{"rounds": 0}, {"probability": 0.0}, {"probability": 1.5},
                                     {"modes": ["tap"]}, {"modes": []}])
def test_bad_interactive_sections_are_config_errors(section, tmp_path, datasets):  # noqa: F811
    with pytest.raises((ConfigError, ValueError), match="interactive"):
        tiny_config(tmp_path / "run", datasets, interactive=section)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_training_runs_the_correction_passes_and_learns(datasets, tmp_path, monkeypatch, mask_prompt):  # noqa: F811
    seen, masks_given = [], []
    original_forward = trainer_module._TrainForward.forward
    original_decode = SAM2ImageModel.decode

    def spy(self, images, groups, modality=None, targets=None, rounds=0, generator=None, mask_prompt=True):
        outputs = original_forward(self, images, groups, modality, targets, rounds, generator, mask_prompt)
        seen.append((rounds, [len(passes) for passes in outputs]))
        return outputs

    def decode_spy(self, features, points=None, boxes=None, mask_input=None, multimask=False):
        masks_given.append(mask_input is not None)
        return original_decode(self, features, points, boxes, mask_input, multimask)

    monkeypatch.setattr(trainer_module._TrainForward, "forward", spy)
    monkeypatch.setattr(SAM2ImageModel, "decode", decode_spy)
    config = tiny_config(tmp_path / "run", datasets, optim__epochs=3,
                         interactive={"rounds": 2, "probability": 1.0, "mask_prompt": mask_prompt})
    result = train(config)
    assert seen and all(rounds == 2 and set(lengths) == {3} for rounds, lengths in seen)
    # Validation decodes too (never with a mask); training's correction passes get one when asked.
    assert any(masks_given) == mask_prompt
    losses = [e["train_loss"] for e in result.epochs]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "best.pt").is_file()


def test_modes_left_out_of_the_rounds_train_one_pass(datasets, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    original_forward = trainer_module._TrainForward.forward

    def spy(self, images, groups, modality=None, targets=None, rounds=0, generator=None, mask_prompt=True):
        outputs = original_forward(self, images, groups, modality, targets, rounds, generator, mask_prompt)
        seen.extend((group[4], len(passes)) for group, passes in zip(groups, outputs, strict=True))
        return outputs

    monkeypatch.setattr(trainer_module._TrainForward, "forward", spy)
    config = tiny_config(tmp_path / "run", datasets, optim__epochs=1,
                         prompts={"train": {"modes": {"box": 0.5, "point": 0.5}}},
                         interactive={"rounds": 2, "probability": 1.0, "modes": ["box"]})
    train(config)
    assert {passes for corrected, passes in seen if corrected} == {3}
    assert {passes for corrected, passes in seen if not corrected} == {1}
