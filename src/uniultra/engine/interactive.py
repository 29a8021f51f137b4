"""SAM-style interactive training: corrective clicks sampled from the model's own errors.

SAM trains prompt-following by simulating a user: after the first answer to a prompt, the next
click lands uniformly in the region where the current mask is wrong (positive on a missed pixel,
negative on a wrong one), and the previous low-res logits come back as the dense mask prompt;
the loss covers every pass. A model trained only on first answers has never seen its own mistakes
as a prompt, which is what a user's second click always is.

    rounds = interactive_rounds(config.interactive, seed, step)     # same on every DDP rank
    coords, labels = error_clicks(previous_logits, targets, generator)
"""

from __future__ import annotations

import random

import torch

from uniultra.engine.config import InteractiveConfig
from uniultra.inference.transforms import upsample_logits
from uniultra.models.prompt_labels import PADDING

# A sample whose mask is already exact gets a padding point (the prompt encoder ignores it).
PADDING_LABEL = PADDING


def interactive_rounds(config: InteractiveConfig | None, seed: int, step: int) -> int:
    """Correction rounds of this step: `config.rounds` with probability `config.probability`, else 0.
    A function of (seed, step) only, so that every DDP process runs the same graph."""
    if config is None:
        return 0
    return config.rounds if random.Random(_step_key(seed, step)).random() < config.probability else 0


def step_generator(seed: int, step: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The click sampler's generator: a resumed run draws the same clicks at the same step."""
    return torch.Generator(device=device).manual_seed(_step_key(seed, step))


def _step_key(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def chosen_logits(low_res_logits: torch.Tensor, iou_scores: torch.Tensor) -> torch.Tensor:
    """(n, M, h, w), (n, M) -> (n, 1, h, w): the candidate with the highest predicted IoU (what a
    predictor shows the user)."""
    best = iou_scores.argmax(dim=1)
    return low_res_logits[torch.arange(low_res_logits.shape[0], device=low_res_logits.device), best][:, None]


@torch.no_grad()
def error_clicks(low_res_logits: torch.Tensor, targets: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per sample, uniform over the pixels where the thresholded mask disagrees with the
    target; labelled with the target there (1: add, 0: remove), or padding when there is no error.

    low_res_logits (n, 1, h, w); targets (n, S, S) in {0, 1} at the model input size ->
    coords (n, 1, 2) xy in model-input pixels (pixel centres), labels (n, 1) int64.
    """
    if low_res_logits.ndim != 4 or low_res_logits.shape[1] != 1:
        raise ValueError(f"expected (n, 1, h, w) logits, got {tuple(low_res_logits.shape)}")
    height, width = targets.shape[-2:]
    predicted = upsample_logits(low_res_logits.float(), (height, width))[:, 0] > 0
    truth = targets > 0.5
    wrong = (predicted != truth).flatten(1)
    # Uniform over the error pixels: the largest of i.i.d. uniform keys, zero off the region.
    keys = torch.rand(wrong.shape, generator=generator, device=wrong.device) * wrong
    index = keys.argmax(dim=1)
    ys, xs = index // width, index % width
    coords = torch.stack([xs, ys], dim=-1).to(torch.float32) + 0.5
    labels = truth.flatten(1).gather(1, index[:, None])[:, 0].long()
    labels = torch.where(wrong.any(dim=1), labels, torch.full_like(labels, PADDING_LABEL))
    return coords[:, None], labels[:, None]
