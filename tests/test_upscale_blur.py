"""The decoder's optional anti-lattice blur: same weights, no period-2 lattice in the logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from uniultra.models.config import preset
from uniultra.models.image_model import SAM2ImageModel

pytestmark = pytest.mark.usefixtures("one_thread")


def model(blur: int) -> SAM2ImageModel:
    config = preset("mini", 128)
    config = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, upscale_blur=blur))
    torch.manual_seed(0)
    return SAM2ImageModel(config).eval()


def nyquist_share(logits: torch.Tensor) -> float:
    """Share of the logits' power (mean removed) at the period-2 frequencies of the grid."""
    x = logits.detach().numpy()[0, 0]
    power = np.abs(np.fft.fft2(x - x.mean())) ** 2
    n = x.shape[0] // 2
    return float((power[n, :].sum() + power[:, n].sum()) / power.sum())


def test_blur_keeps_the_weights_and_removes_the_lattice():
    plain, blurred = model(0), model(2)
    assert plain.state_dict().keys() == blurred.state_dict().keys()
    blurred.load_state_dict(plain.state_dict())  # official checkpoints load into either
    image = torch.rand(1, 3, 128, 128)
    box = (torch.tensor([[[30.0, 30.0], [90.0, 100.0]]]), torch.tensor([[2, 3]]))
    with torch.no_grad():
        a = plain.decode(plain.encode_image(image), points=box).low_res_logits
        b = blurred.decode(blurred.encode_image(image), points=box).low_res_logits
    assert a.shape == b.shape == (1, 1, 32, 32)
    assert not torch.allclose(a, b)
    assert nyquist_share(b) < 0.2 * nyquist_share(a), (nyquist_share(a), nyquist_share(b))


def test_last_stage_blur_and_bad_values():
    plain, last = model(0), model(1)
    last.load_state_dict(plain.state_dict())
    image = torch.rand(1, 3, 128, 128)
    box = (torch.tensor([[[30.0, 30.0], [90.0, 100.0]]]), torch.tensor([[2, 3]]))
    with torch.no_grad():
        a = plain.decode(plain.encode_image(image), points=box).low_res_logits
        b = last.decode(last.encode_image(image), points=box).low_res_logits
    assert nyquist_share(b) < 0.2 * nyquist_share(a)
    with pytest.raises(ValueError, match="upscale_blur"):
        model(3)
