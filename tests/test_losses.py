"""The training loss terms: what each one measures."""

from __future__ import annotations

import torch

from uniultra.engine.config import LossConfig
from uniultra.engine.losses import dice_loss, projection_loss, segmentation_loss

BIG = 30.0  # a logit this large is a certain answer


def square(size: int, start: int, stop: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[start:stop, start:stop] = 1.0
    return mask


def logits_of(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * BIG


def test_projection_measures_how_far_the_mask_reaches_not_what_it_fills():
    truth = square(32, 6, 26)  # 20 x 20
    core = square(32, 11, 21)  # its centre only: 10 x 10
    ring = truth - square(32, 8, 24)  # a 2 px outline: reaches every side, fills little
    assert projection_loss(logits_of(truth), truth) < 1e-3
    # the core covers half of each projection: dice 2 * 10 / (10 + 20)
    assert abs(projection_loss(logits_of(core), truth).item() - (1 - 20 / 30)) < 0.02
    assert projection_loss(logits_of(ring), truth) < 1e-3 < dice_loss(logits_of(ring), truth)


def test_the_projection_weight_adds_the_term_to_every_candidate():
    truth = square(16, 3, 12)[None]
    low_res = logits_of(square(16, 5, 10))[None, None] * 0.1  # (n, M, h, w), upsampled to the truth's size
    iou = torch.zeros(1, 1)
    plain, _ = segmentation_loss(low_res, iou, truth, LossConfig())
    weighted, _ = segmentation_loss(low_res, iou, truth, LossConfig(projection=2.0))
    expected = 2.0 * projection_loss(low_res[0], truth)
    torch.testing.assert_close(weighted - plain, expected.reshape(1), atol=1e-5, rtol=1e-4)


def test_the_whole_object_iou_counts_what_the_crop_cut_off_as_missed():
    truth = square(16, 0, 8)[None]  # 64 px inside the crop
    low_res = logits_of(square(16, 0, 8))[None, None]  # a perfect answer within the crop
    iou = torch.ones(1, 1)
    outside = torch.tensor([64.0])  # as much again beyond the crop
    _, within = segmentation_loss(low_res, iou, truth, LossConfig(), outside)
    _, whole = segmentation_loss(low_res, iou, truth, LossConfig(iou_whole_object=True), outside)
    assert within["real_iou"].item() == 1.0 and within["iou"].item() == 0.0
    assert abs(whole["real_iou"].item() - 0.5) < 1e-6 and abs(whole["iou"].item() - 0.25) < 1e-6
    # the mask terms are the same: only the IoU head's target changes
    _, none_outside = segmentation_loss(low_res, iou, truth, LossConfig(iou_whole_object=True), torch.zeros(1))
    assert none_outside["real_iou"].item() == 1.0 and whole["dice"].item() == within["dice"].item()
