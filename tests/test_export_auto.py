"""The automatic head exported beside the encoder and decoder (auto_decoder.onnx): onnxruntime and
OpenVINO answer `predict_auto` like the PyTorch AutoPredictor, and the loaders treat an export with a
head like a checkpoint with one (modality channels, --prompt none, zoom wrapping).

Random weights (perturbed so that masks have structure), preset mini at 128 px.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniultra.data.phantom import make_phantom
from uniultra.inference import onnx_format as md
from uniultra.inference.auto_predictor import AutoPredictor, has_auto_head
from uniultra.inference.loading import load_predictor
from uniultra.inference.predictor import Predictor
from uniultra.inference.zoom import ZoomPredictor
from uniultra.models.auto_checkpoint import save_auto_model
from uniultra.models.auto_segmenter import AutoHeadConfig, AutoSegmenter, with_own_encoder
from uniultra.models.image_model import SAM2ImageModel

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install '.[export]'")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install '.[export]'")

SIZE = 128
CHANNELS = ("busi", "ddti", "tg3k")


@pytest.fixture(scope="module")
def auto_export(tmp_path_factory):
    from uniultra.export.onnx_export import export_onnx

    torch.manual_seed(0)
    base = SAM2ImageModel.from_preset("mini", SIZE)
    config = AutoHeadConfig(CHANNELS, presence_head=True, own_decoder=True, presence_threshold=0.2)
    model = AutoSegmenter(base, config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        probe = model.attach_presence_probe()  # the probe, not the head, scores presence in the graph
        probe.weight[0].normal_(0, 0.05)
        probe.bias[0] = 0.3
    model.base.inference = {"zoom": {"margin": 1.4}}
    root = tmp_path_factory.mktemp("auto-export")
    save_auto_model(model, root / "auto.pt")
    result = export_onnx(str(root / "auto.pt"), root / "onnx")
    return model.eval(), root, result


def images():
    cases = ((1, (150, 200)), (2, (96, 96)))
    return [make_phantom(seed, size=hw, kind="mixed", n_lesions=1).image for seed, hw in cases]


def test_export_writes_the_auto_graph_and_its_channels(auto_export):
    _, root, result = auto_export
    meta = result.metadata
    assert "auto_decoder" in meta["files"] and (root / "onnx" / "auto_decoder.onnx").is_file()
    assert meta["auto"]["modalities"] == list(CHANNELS) and meta["auto"]["presence_threshold"] == 0.2
    assert max(v for k, v in result.check.items() if k.startswith("auto_")) < 1e-3
    # The metadata describes the graph's own inputs and outputs, as the file has them.
    import onnx

    graph = onnx.load(str(root / "onnx" / "auto_decoder.onnx")).graph
    spec = meta["files"]["auto_decoder"]
    assert list(spec["inputs"]) == [i.name for i in graph.input] == list(md.AUTO_INPUTS)
    assert list(spec["outputs"]) == [o.name for o in graph.output] == list(md.AUTO_OUTPUTS)


@pytest.mark.parametrize("spec", ["onnx:{}", "openvino:{}"])
def test_exported_auto_head_answers_like_pytorch(auto_export, spec):
    if spec.startswith("openvino"):
        pytest.importorskip("openvino", reason="openvino not installed: pip install '.[openvino]'")
    model, root, _ = auto_export
    exported = load_predictor(spec.format(root / "onnx"))
    assert isinstance(exported, ZoomPredictor) and has_auto_head(exported)
    assert exported.modality_choices == CHANNELS
    reference = AutoPredictor(model)
    for image in images():
        exported.set_image(image)
        reference.set_image(image)
        for channel in CHANNELS:
            mask, score, _ = exported.predict_auto(channel)
            want_mask, want_score, _ = reference.predict_auto(channel)
            assert mask.shape == image.shape[:2] and mask.dtype == bool
            # OpenVINO's fp32 attention differs from PyTorch's by up to a few 1e-2 in logits (BENCHMARKS.md).
            assert abs(score - want_score) < 1e-2
            agree = (mask == want_mask).mean()
            assert agree > 0.99, (channel, agree)
    with pytest.raises(ValueError, match="unknown modality"):
        exported.predict_auto("carotid")


def test_evaluate_runs_an_export_without_a_prompt(auto_export):
    from uniultra.evaluation.evaluate import make_method

    _, root, _ = auto_export
    method = make_method(f"onnx:{root / 'onnx'}")
    assert method.selects_modality("none") and not method.selects_modality("box")
    assert method.modality_for("ddti") == "ddti"
    method.predictor.modality = "ddti"
    image = images()[0]
    method.predictor.set_image(image)
    mask = method.predictor.predict_without_prompt()[0]
    np.testing.assert_array_equal(mask, method.predictor.predict_auto("ddti")[0])


def test_an_export_without_a_head_has_no_automatic_mode(tmp_path):
    from uniultra.export.onnx_export import export_onnx

    torch.manual_seed(0)
    export_onnx(SAM2ImageModel.from_preset("mini", 64).eval(), tmp_path / "onnx")
    predictor = load_predictor(f"onnx:{tmp_path / 'onnx'}")
    assert not has_auto_head(predictor) and not hasattr(predictor, "predict_without_prompt")
    assert not predictor.selects_modality(True)


def test_an_export_leaves_the_gate_to_each_call(auto_export, tmp_path):
    import json
    import shutil

    model, root, result = auto_export
    assert result.metadata["auto"]["presence_gate_in_graph"] is False
    exported = load_predictor(f"onnx:{root / 'onnx'}").predictor  # the unzoomed predictor
    reference = AutoPredictor(model)
    image = images()[0]
    exported.set_image(image)
    reference.set_image(image)
    score = exported.predict_auto("busi", presence_gate="off")[1]
    for gate in ("off", "calibrated", max(0.0, score - 0.02), min(1.0, score + 0.02)):
        mask = exported.predict_auto("busi", presence_gate=gate)[0]
        want = reference.predict_auto("busi", presence_gate=gate)[0]
        assert (mask == want).mean() > 0.99, gate
    assert not exported.predict_auto("busi", presence_gate=min(1.0, score + 0.02))[0].any()
    assert exported.resolve_presence_gate() == 0.2
    assert exported.set_presence_gate(1.0) == 1.0 and not exported.predict_auto("busi")[0].any()  # kept

    # An export made before the gate left the graph keeps its own and says how to choose another.
    old = tmp_path / "old"
    shutil.copytree(root / "onnx", old)
    meta_path = old / md.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    del meta["auto"]["presence_gate_in_graph"]
    meta_path.write_text(json.dumps(meta))
    older = load_predictor(f"onnx:{old}").predictor
    older.set_image(image)
    older.predict_auto("busi")  # its calibrated gate: fine
    with pytest.raises(ValueError, match="applies its presence gate inside the exported graph.*export the checkpoint"):
        older.predict_auto("busi", presence_gate=0.5)


@pytest.fixture(scope="module")
def own_encoder_export(tmp_path_factory):
    """A head trained on one model's features, packed onto another model that answers prompts."""
    from uniultra.export.onnx_export import export_onnx

    torch.manual_seed(3)
    head = AutoSegmenter(SAM2ImageModel.from_preset("mini", SIZE), AutoHeadConfig(CHANNELS, own_decoder=True))
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith(("base.", "decoder.conv_s")):
                p.add_(torch.randn_like(p) * 0.05)
    torch.manual_seed(4)
    prompts = SAM2ImageModel.from_preset("mini", SIZE)
    model = with_own_encoder(head, prompts).eval()
    root = tmp_path_factory.mktemp("own-encoder-export")
    save_auto_model(model, root / "auto.pt")
    result = export_onnx(str(root / "auto.pt"), root / "onnx")
    return model, prompts.eval(), root, result


@pytest.mark.parametrize("spec", ["onnx:{}", "openvino:{}"])
def test_an_exported_head_with_its_own_encoder_answers_like_pytorch(own_encoder_export, spec):
    if spec.startswith("openvino"):
        pytest.importorskip("openvino", reason="openvino not installed: pip install '.[openvino]'")
    model, prompts, root, result = own_encoder_export
    assert result.metadata["auto"]["own_encoder"] is True
    assert (root / "onnx" / md.AUTO_ENCODER_FILE).is_file()
    assert max(v for k, v in result.check.items() if k.startswith("auto_encoder_")) < 1e-3
    exported = load_predictor(spec.format(root / "onnx"))
    reference, plain = AutoPredictor(model), Predictor(prompts)
    image = images()[0]
    for predictor in (exported, reference, plain):
        predictor.set_image(image)
    box = np.array([30, 20, 120, 110])
    assert (exported.predict(box=box)[0] == plain.predict(box=box)[0]).mean() > 0.99
    for channel in CHANNELS:
        mask, score, _ = exported.predict_auto(channel)
        want_mask, want_score, _ = reference.predict_auto(channel)
        assert abs(score - want_score) < 1e-2
        assert (mask == want_mask).mean() > 0.99, channel
