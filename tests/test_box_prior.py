"""The box's inscribed ellipse as the dense mask prompt (DecoderConfig.box_prior) or added to the mask
logits (DecoderConfig.box_logit_prior)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from uniultra.data.phantom import make_phantom
from uniultra.inference.predictor import Predictor
from uniultra.models.box_prior import PRIOR_GAIN, box_ellipse_logits, box_logit_prior
from uniultra.models.config import preset
from uniultra.models.image_model import SAM2ImageModel

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 128


def model(prior: bool, logit_prior: float = 0.0) -> SAM2ImageModel:
    config = preset("mini", SIZE)
    decoder = dataclasses.replace(config.decoder, box_prior=prior, box_logit_prior=logit_prior)
    config = dataclasses.replace(config, decoder=decoder)
    torch.manual_seed(0)
    built = SAM2ImageModel(config)
    with torch.no_grad():  # random init leaves the mask-prompt path nearly inert: perturb it
        for p in built.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return built.eval()


def test_the_prior_is_the_inscribed_ellipse():
    coords = torch.tensor([[[16.0, 32.0], [111.0, 95.0]], [[40.0, 40.0], [0.0, 0.0]]])
    labels = torch.tensor([[2, 3], [1, -1]])
    logits, has_box = box_ellipse_logits(coords, labels, (32, 32), SIZE)
    assert logits.shape == (2, 1, 32, 32) and has_box.tolist() == [True, False]
    inside = (logits[0, 0] > 0).numpy()
    # Box 96 x 64 px: ellipse area pi * 48 * 32 px, i.e. / 16 cells at a 4 px grid.
    assert inside.sum() == pytest.approx(np.pi * 48 * 32 / 16, rel=0.05)
    assert logits[0, 0, 16, 16] == pytest.approx(PRIOR_GAIN, rel=0.1)  # the centre cell
    assert logits[0, 0, 0, 0] == -PRIOR_GAIN and logits[0, 0, 31, 31] == -PRIOR_GAIN  # box corners
    ys, xs = np.nonzero(inside)
    assert xs.min() * 4 >= 16 and (xs.max() + 1) * 4 <= 112 and ys.min() * 4 >= 32 and (ys.max() + 1) * 4 <= 96
    assert not logits[1].any()  # no box: no prior


def test_only_box_prompts_change_and_weights_are_shared():
    plain, prior = model(False), model(True)
    assert plain.state_dict().keys() == prior.state_dict().keys()
    prior.load_state_dict(plain.state_dict())  # no weights of its own: any checkpoint loads
    features = plain.encode_image(torch.rand(1, 3, SIZE, SIZE))
    box = torch.tensor([[20.0, 30.0, 90.0, 100.0]])
    point = (torch.tensor([[[60.0, 60.0]]]), torch.tensor([[1]]))
    with torch.no_grad():
        assert not torch.allclose(plain.decode(features, boxes=box).low_res_logits,
                                  prior.decode(features, boxes=box).low_res_logits)
        torch.testing.assert_close(plain.decode(features, points=point).low_res_logits,
                                   prior.decode(features, points=point).low_res_logits)
        # A mask given by the caller wins over the prior.
        given = torch.randn(1, 1, SIZE // 4, SIZE // 4)
        torch.testing.assert_close(plain.decode(features, boxes=box, mask_input=given).low_res_logits,
                                   prior.decode(features, boxes=box, mask_input=given).low_res_logits)


def test_mixed_batch_gets_the_prior_row_by_row():
    prior = model(True)
    features = prior.encode_image(torch.rand(1, 3, SIZE, SIZE))
    box_row = (torch.tensor([[[20.0, 30.0], [90.0, 100.0], [50.0, 60.0]]]), torch.tensor([[2, 3, 1]]))
    point_row = (torch.tensor([[[50.0, 60.0], [0.0, 0.0], [0.0, 0.0]]]), torch.tensor([[1, -1, -1]]))
    both = (torch.cat([box_row[0], point_row[0]]), torch.cat([box_row[1], point_row[1]]))
    with torch.no_grad():
        joint = prior.decode(features, points=both).low_res_logits
        torch.testing.assert_close(joint[:1], prior.decode(features, points=box_row).low_res_logits)
        torch.testing.assert_close(joint[1:], prior.decode(features, points=point_row).low_res_logits)


def test_onnx_decoder_applies_the_same_prior(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install '.[export]'")
    pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install '.[export]'")
    from uniultra.export import OnnxPredictor, onnx_export

    prior = model(True)
    onnx_export.export_onnx(prior, tmp_path / "onnx")
    torch_pred, onnx_pred = Predictor(prior), OnnxPredictor(tmp_path / "onnx", threads=1)
    assert not onnx_pred.has_box_decoder  # the prior makes the dense prompt depend on the box
    phantom = make_phantom(3, size=(150, 200), kind="mixed", n_lesions=2)
    torch_pred.set_image(phantom.image)
    onnx_pred.set_image(phantom.image)
    box = [float(v) for v in phantom.boxes[0]]
    for prompt in (dict(box=box), dict(box=box, points=[[box[0] + 5, box[1] + 5]], labels=[0]),
                   dict(points=[[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]], labels=[1])):
        t = torch_pred.predict(**prompt, return_logits=True)[0]
        o = onnx_pred.predict(**prompt, return_logits=True)[0]
        assert np.abs(t - o).max() < 1e-3, prompt


def test_logit_prior_adds_the_weighted_ellipse_to_every_mask_of_a_box_prompt():
    plain, prior = model(False), model(False, logit_prior=4.0)
    prior.load_state_dict(plain.state_dict())
    features = plain.encode_image(torch.rand(1, 3, SIZE, SIZE))
    box = torch.tensor([[20.0, 30.0, 90.0, 100.0]])
    corners = (box.view(1, 2, 2), torch.tensor([[2, 3]]))
    expected = box_logit_prior(*corners, (SIZE // 4, SIZE // 4), SIZE, 4.0)
    assert expected.max() == pytest.approx(4.0, rel=0.1) and expected.min() == -4.0
    with torch.no_grad():
        for multimask in (False, True):
            a = plain.decode(features, boxes=box, multimask=multimask).low_res_logits
            b = prior.decode(features, boxes=box, multimask=multimask).low_res_logits
            torch.testing.assert_close(b - a, expected.expand_as(a), atol=1e-4, rtol=0)
        point = (torch.tensor([[[60.0, 60.0]]]), torch.tensor([[1]]))
        torch.testing.assert_close(plain.decode(features, points=point).low_res_logits,
                                   prior.decode(features, points=point).low_res_logits)


def test_onnx_decoders_apply_the_same_logit_prior(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install '.[export]'")
    pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install '.[export]'")
    from uniultra.export import OnnxPredictor, onnx_export

    prior = model(False, logit_prior=4.0)
    onnx_export.export_onnx(prior, tmp_path / "onnx")
    torch_pred, onnx_pred = Predictor(prior), OnnxPredictor(tmp_path / "onnx", threads=1)
    assert onnx_pred.has_box_decoder  # the dense prompt does not depend on the box: the fast graph stays
    phantom = make_phantom(4, size=(150, 200), kind="mixed", n_lesions=2)
    torch_pred.set_image(phantom.image)
    onnx_pred.set_image(phantom.image)
    box = [float(v) for v in phantom.boxes[0]]
    for prompt in (dict(box=box), dict(box=box, points=[[box[0] + 5, box[1] + 5]], labels=[0])):
        t = torch_pred.predict(**prompt, return_logits=True)[0]
        o = onnx_pred.predict(**prompt, return_logits=True)[0]
        assert np.abs(t - o).max() < 1e-3, prompt


@pytest.mark.parametrize("peft", ["full", "decoder_only"])
def test_a_base_without_the_logit_prior_is_fine_tuned_and_reloaded_with_it(tmp_path, phantoms_and_small_base, peft):
    """The prior has no weights: a second stage may switch it on over a first stage trained without it,
    and the checkpoint it writes (whole model or decoder only) loads with the prior on."""
    from uniultra.engine.config import TrainConfig
    from uniultra.engine.trainer import build_model, train
    from uniultra.inference.loading import load_predictor

    root, base, small = phantoms_and_small_base
    tuned = {**small, "decoder": {**small["decoder"], "box_logit_prior": 4.0}}
    config = TrainConfig.from_dict({
        "model": {"preset": "mini", "image_size": 64, "config": tuned, "base": str(base)},
        "peft": {"method": peft}, "data": [{"path": str(root)}], "zoom": {},
        "prompts": {"train": {"modes": {"box": 1.0}}},
        "optim": {"lr": 1e-3, "epochs": 1, "batch_size": 2, "warmup_steps": 1},
        "out_dir": str(tmp_path / "run"), "progress": False, "threads": 1}, "t")
    assert build_model(config, "t")[0].config.decoder.box_logit_prior == 4.0
    train(config)
    assert load_predictor(tmp_path / "run" / "best.pt").model.config.decoder.box_logit_prior == 4.0
