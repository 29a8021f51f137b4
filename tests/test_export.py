"""ONNX export, the torch-free OnnxPredictor, and the speed benchmark's plumbing.

One small model (preset mini at 128 px, random weights perturbed so that masks are neither
empty nor full) is exported once through the CLI; every test reuses that export. Speed
targets are NOT asserted here: they live in BENCHMARKS.md (`uniultra bench speed`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from no_torch import run_without_torch
from uniultra import __version__
from uniultra.atomic import file_sha256
from uniultra.cli import main
from uniultra.data.phantom import make_phantom
from uniultra.export import OnnxPredictor, onnx_export
from uniultra.inference import onnx_format as md
from uniultra.inference.loading import load_model
from uniultra.inference.predictor import Predictor
from uniultra.inference.transforms_numpy import resize_antialiased, resize_bilinear
from uniultra.models.checkpoint import save_model
from uniultra.models.image_model import SAM2ImageModel

# The imports above need neither onnx nor onnxruntime (both are imported lazily).
pytest.importorskip("onnxruntime", reason="onnxruntime not installed: pip install '.[export]'")
pytest.importorskip("onnx", reason="onnx not installed: pip install '.[export]'")
pytest.importorskip("onnxscript", reason="onnxscript not installed: pip install '.[export]'")

SIZE = 128
# ONNX Runtime vs PyTorch, fp32: observed ~1e-5 on logits of magnitude ~10; a wrong graph is >> 1e-1.
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[SAM2ImageModel, Path]:
    torch.manual_seed(0)
    model = SAM2ImageModel.from_preset("mini", SIZE)
    with torch.no_grad():
        # Random init leaves position embeddings and tokens at zero and masks near-constant;
        # perturbing every parameter gives masks with structure, so IoU checks mean something.
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    root = tmp_path_factory.mktemp("export")
    checkpoint = root / "mini.pt"
    save_model(model, checkpoint)
    out = root / "onnx"
    assert main(["export", "onnx", "--model", str(checkpoint), "--out", str(out), "--int8"]) == 0
    return load_model(checkpoint), out


@pytest.fixture(scope="module")
def predictors(exported) -> tuple[Predictor, OnnxPredictor]:
    model, out = exported
    pair = Predictor(model), OnnxPredictor(out, threads=1)
    # The graphs are compared, not the hole filling both apply alike (uniultra.inference.holes): on a
    # random model's speckled masks a 1e-5 logit difference can open a pin-hole to the background.
    for predictor in pair:
        predictor.max_hole_share = 0.0
    return pair


def phantom_cases():
    """(image, prompt kwargs) pairs on phantom images: boxes, 1 and 3 points, box + point, batches."""
    cases = []
    for seed, hw in ((1, (150, 200)), (2, (240, 180)), (3, (300, 300))):
        ph = make_phantom(seed, size=hw, kind="mixed", n_lesions=2)
        x0, y0, x1, y1 = (float(v) for v in ph.boxes[0])
        box = [x0, y0, x1 + 1, y1 + 1]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ys, xs = np.nonzero(ph.lesion_masks[0])
        three = [[float(xs[i]), float(ys[i])] for i in np.linspace(0, len(xs) - 1, 3).astype(int)]
        cases += [
            (ph.image, dict(box=box)),
            (ph.image, dict(points=[[cx, cy]], labels=[1])),
            (ph.image, dict(points=three, labels=[1, 1, 0])),
            (ph.image, dict(box=box, points=[[cx, cy]], labels=[1])),
            (ph.image, dict(box=[box, [float(v) for v in ph.boxes[1]]])),
        ]
    return cases


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def test_onnx_matches_pytorch_on_phantoms(predictors):
    torch_pred, onnx_pred = predictors
    worst_logit, worst_iou, worst_score, informative = 0.0, 1.0, 0.0, 0
    for image, prompt in phantom_cases():
        torch_pred.set_image(image)
        onnx_pred.set_image(image)
        for multimask in (False, True):
            t_masks, t_scores, t_low = torch_pred.predict(**prompt, multimask=multimask)
            o_masks, o_scores, o_low = onnx_pred.predict(**prompt, multimask=multimask)
            assert o_masks.shape == t_masks.shape and o_masks.dtype == bool
            assert o_scores.shape == t_scores.shape and o_low.shape == t_low.shape
            t_logits = torch_pred.predict(**prompt, multimask=multimask, return_logits=True)[0]
            o_logits = onnx_pred.predict(**prompt, multimask=multimask, return_logits=True)[0]
            worst_logit = max(worst_logit, float(np.abs(t_logits - o_logits).max()))
            worst_score = max(worst_score, float(np.abs(t_scores - o_scores).max()))
            for t, o in zip(t_masks.reshape(-1, *t_masks.shape[-2:]), o_masks.reshape(-1, *o_masks.shape[-2:]),
                            strict=True):
                worst_iou = min(worst_iou, iou(t, o))
                informative += bool(0.01 < t.mean() < 0.99)
    print(f"ONNX vs PyTorch: min mask IoU {worst_iou:.5f}, max |logit diff| {worst_logit:.2e}, "
          f"max |IoU-score diff| {worst_score:.2e}, {informative} informative masks")
    assert informative >= 10, "masks are (nearly) empty or full: the comparison would prove nothing"
    assert worst_iou > 0.99
    assert worst_logit < LOGIT_ATOL
    assert worst_score < 1e-4


def test_dynamic_point_count_in_one_graph(exported, predictors):
    """1, 2, 3 and 7 points (and two prompt sets at once) go through the same decoder graph."""
    _, onnx_pred = predictors
    model, out = exported
    for graph in (onnx_pred.decoder, onnx_pred.box_decoder):
        dims = {i.name: i.shape for i in graph.get_inputs()}
        assert dims["point_coords"][:2] == ["num_prompts", "num_points"]
    image = make_phantom(4, size=(160, 200)).image
    onnx_pred.set_image(image)
    for n_points in (1, 2, 3, 7):
        pts = np.stack([np.linspace(20, 180, n_points), np.linspace(30, 130, n_points)], axis=1)
        masks, scores, low = onnx_pred.predict(points=pts, labels=np.ones(n_points, int))
        assert masks.shape == (1, 160, 200) and scores.shape == (1,) and low.shape == (1, SIZE // 4, SIZE // 4)
    masks, scores, _ = onnx_pred.predict(points=[[[50, 50], [60, 70]], [[100, 100], [0, 0]]], labels=[[1, 0], [1, -1]])
    assert masks.shape == (2, 1, 160, 200) and scores.shape == (2, 1)


def test_mask_input_round_trip(predictors):
    torch_pred, onnx_pred = predictors
    image = make_phantom(5, size=(128, 160)).image
    torch_pred.set_image(image)
    onnx_pred.set_image(image)
    _, _, low = torch_pred.predict(box=[20, 20, 100, 90])
    t_logits = torch_pred.predict(box=[20, 20, 100, 90], mask_input=low[None], return_logits=True)[0]
    o_logits = onnx_pred.predict(box=[20, 20, 100, 90], mask_input=low[None], return_logits=True)[0]
    assert np.abs(t_logits - o_logits).max() < LOGIT_ATOL
    with pytest.raises(ValueError, match="mask_input"):
        onnx_pred.predict(box=[20, 20, 100, 90], mask_input=np.zeros((1, 1, 8, 8)))


def test_int8_encoder_runs_and_is_plausible(exported):
    _, out = exported
    pred = OnnxPredictor(out, int8=True, threads=1)
    image = make_phantom(6, size=(200, 160)).image
    pred.set_image(image)
    masks, scores, low = pred.predict(box=[30, 40, 120, 150])
    assert masks.shape == (1, 200, 160) and masks.dtype == bool
    assert np.isfinite(low).all() and np.all((scores >= 0) & (scores <= 1))
    multi, scores3, _ = pred.predict(points=[[80, 90]], labels=[1], multimask=True)
    assert multi.shape == (3, 200, 160) and scores3.shape == (3,)


def test_predictor_imports_and_runs_without_torch(exported, predictors, tmp_path):
    _, out = exported
    torch_pred, _ = predictors
    image = make_phantom(7, size=(150, 170)).image
    np.save(tmp_path / "image.npy", image)
    done = run_without_torch(f"""
        import json
        import numpy as np
        from uniultra.export import OnnxPredictor
        pred = OnnxPredictor({str(out)!r}, threads=1)
        pred.max_hole_share = 0.0  # as the fixture's predictors: the graphs are compared
        pred.set_image(np.load({str(tmp_path / "image.npy")!r}))
        logits, scores, _ = pred.predict(box=[20, 25, 120, 130], return_logits=True)
        np.save({str(tmp_path / "logits.npy")!r}, logits)
        print(json.dumps({{"scores": scores.tolist()}}))
    """)
    assert done.returncode == 0, done.stderr
    torch_pred.set_image(image)
    expected, scores, _ = torch_pred.predict(box=[20, 25, 120, 130], return_logits=True)
    assert np.abs(np.load(tmp_path / "logits.npy") - expected).max() < LOGIT_ATOL
    assert np.allclose(json.loads(done.stdout)["scores"], scores, atol=1e-4)


def test_metadata_describes_the_export(exported):
    model, out = exported
    meta = json.loads((out / md.METADATA_FILE).read_text())
    assert meta["format"] == md.FORMAT_NAME and meta["format_version"] == md.FORMAT_VERSION
    assert meta["uniultra_version"] == __version__
    assert meta["onnx_opset"] == onnx_export.DEFAULT_OPSET
    assert meta["image_size"] == SIZE and meta["low_res_size"] == SIZE // 4
    assert meta["preprocessing"]["pixel_mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["preprocessing"]["pixel_std"] == pytest.approx([0.229, 0.224, 0.225])
    assert set(meta["prompts"]["label_meanings"]) == {"-1", "0", "1", "2", "3"}
    assert meta["model"]["config"] == json.loads(json.dumps(model.config.to_dict()))
    assert set(meta["files"]) == {"encoder", "decoder", "box_decoder", "encoder_int8"}
    for entry in meta["files"].values():
        assert file_sha256(out / entry["path"]) == entry["sha256"]
    assert max(meta["export_check_max_abs"].values()) < 0.5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [md.ENCODER_FILE, md.DECODER_FILE, md.BOX_DECODER_FILE, md.ENCODER_INT8_FILE, md.METADATA_FILE])
    assert list(meta["files"]["box_decoder"]["inputs"]) == list(md.BOX_DECODER_INPUTS)


def test_a_tampered_export_is_refused(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / md.DECODER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (copy / md.DECODER_FILE).write_bytes(bytes(data))
    with pytest.raises(md.ExportFormatError, match="sha256"):
        OnnxPredictor(copy)
    (copy / md.DECODER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="decoder"):
        OnnxPredictor(copy)
    with pytest.raises(FileNotFoundError, match="uniultra-onnx.json"):
        OnnxPredictor(tmp_path)


@pytest.mark.filterwarnings("ignore:preset.*randomly initialised weights")
@pytest.mark.parametrize(
    ("spec", "message"),
    [("preset:nope", "unknown preset 'nope'"), ("missing.pt", "checkpoint not found"), ("default", "bundled")],
)
def test_bad_model_spec_gives_one_clear_line_and_no_files(spec, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if spec == "default":
        from uniultra.inference import loading

        monkeypatch.setattr(loading, "bundled_default_path", lambda: tmp_path / "absent.safetensors")
    out = tmp_path / "out"
    assert main(["export", "onnx", "--model", spec, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_failure_leaves_no_partial_files(exported, tmp_path, monkeypatch):
    model, out = exported
    import onnx

    # Reuse the exported graphs (fast), then fail at the last step before anything is moved in place.
    protos = iter([onnx.load(out / name) for name in (md.ENCODER_FILE, md.DECODER_FILE, md.BOX_DECODER_FILE)])
    monkeypatch.setattr(onnx_export, "_onnx_proto", lambda *a, **k: next(protos))

    def broken_quantizer(src, dst):
        Path(dst).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "quantize_encoder", broken_quantizer)
    target = tmp_path / "target"
    target.mkdir()
    (target / md.METADATA_FILE).write_text("previous export")
    with pytest.raises(OSError, match="disk full"):
        onnx_export.export_onnx(model, target, int8=True)
    assert sorted(p.name for p in target.iterdir()) == [md.METADATA_FILE]
    assert (target / md.METADATA_FILE).read_text() == "previous export"


def test_export_check_catches_a_wrong_graph(exported, tmp_path, monkeypatch):
    model, out = exported
    import onnx

    # The decoder graph of a different model must be caught by the export-time comparison.
    protos = iter([onnx.load(out / name) for name in (md.ENCODER_FILE, md.DECODER_FILE, md.BOX_DECODER_FILE)])
    monkeypatch.setattr(onnx_export, "_onnx_proto", lambda *a, **k: next(protos))
    torch.manual_seed(1)
    other = SAM2ImageModel.from_preset("mini", SIZE).eval()
    with pytest.raises(onnx_export.ExportError, match="disagree"):
        onnx_export.export_onnx(other, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("src", "dst"), [((600, 800), (128, 128)), ((90, 70), (128, 128)), ((37, 500), (64, 96)),
                                          ((128, 128), (128, 128))])
def test_numpy_antialiased_resize_matches_torch(src, dst):
    x = np.random.default_rng(0).random((3, *src), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None], size=dst, mode="bilinear", align_corners=False, antialias=True)
    assert np.abs(resize_antialiased(x, dst) - ref[0].numpy()).max() < 1e-5


@pytest.mark.parametrize(("src", "dst"), [((32, 32), (150, 210)), ((64, 64), (600, 800)), ((64, 64), (40, 30))])
def test_numpy_bilinear_upsampling_matches_torch(src, dst):
    x = np.random.default_rng(0).normal(size=(2, 3, *src)).astype(np.float32) * 10
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False)
    assert np.abs(resize_bilinear(x, dst) - ref.numpy()).max() < 1e-4


@pytest.mark.parametrize("channels", [None, 3])
def test_preprocessing_matches_torch(predictors, channels):
    torch_pred, onnx_pred = predictors
    image = make_phantom(8, size=(333, 457)).image
    if channels:
        image = np.stack([image, image[::-1], image[:, ::-1]], axis=2)
    diff = np.abs(onnx_pred.preprocess(image) - torch_pred.preprocess(image).numpy()).max()
    assert diff < 1e-5, diff


def test_bench_speed_smoke(tmp_path, capsys):
    """The whole speed benchmark at a tiny size, once: it runs and reports; no timing is asserted."""
    from uniultra.bench.speed import markdown_table, update_benchmarks_md

    md_file = tmp_path / "BENCHMARKS.md"
    md_file.write_text("# Benchmarks\n\n## Someone else's section\n\nkeep me\n")
    # Every runtime but the OpenVINO INT8 encoder (its NNCF calibration is tested in test_openvino.py).
    argv = ["bench", "speed", "--models", "mini", "--size", "64", "--repeats", "1", "--warmup", "0",
            "--image-size", "90x120", "--out-dir", str(tmp_path / "results"), "--markdown", str(md_file),
            "--runtime", "torch,torch-bf16,onnx,onnx-int8,openvino,openvino-bf16", "--peak-size", "128"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| mini | PyTorch eager |" in table and "| mini | onnxruntime int8 enc. |" in table
    (result_file,) = (tmp_path / "results").glob("speed-*.json")
    results = json.loads(result_file.read_text())
    machine = results["machine"]
    assert machine["cpu"] and machine["onnxruntime"] and "avx512_bf16" in machine["isa"]
    peaks = machine["matmul_peak_gflop_per_s"]
    assert peaks["fp32"] > 0 and peaks["bf16"] > 0
    assert peaks["fp32"] == max(peaks["fp32_torch"], peaks["fp32_onnxruntime"]) > 0
    mini = results["models"]["mini"]
    measured = [r for r in ("torch", "torch-bf16", "ort-fp32", "ort-int8", "openvino", "openvino-bf16")
                if r not in results["skipped_runtimes"]]
    assert {"torch", "ort-fp32", "ort-int8"} <= set(measured) and "openvino-int8" not in mini["latency_ms"]
    for runtime in measured:
        assert set(mini["latency_ms"][runtime]) == {"preprocess", "encoder", "decoder", "end_to_end"}
        assert mini["peak_rss_mb"][runtime]["peak"] > 0
        assert mini["efficiency"][runtime]["fraction_of_fp32_peak"] > 0
    assert "fp32 FLOP bound" in table and "matmul peak" in table
    assert mini["params"]["encoder"] > 0 and mini["gflops"]["encoder"] > 0
    text = md_file.read_text()
    assert "keep me" in text and "<!-- bench:speed:start -->" in text and "| mini |" in text
    # Writing again replaces the section instead of appending a second one.
    update_benchmarks_md(md_file, results, "| new table |")
    text = md_file.read_text()
    assert text.count("<!-- bench:speed:start -->") == 1 and "| new table |" in text and "keep me" in text
    # Ratios to tiny appear once tiny is among the models.
    results["models"]["tiny"] = results["models"]["mini"]
    assert "| 1.00 | 1.00 |" in markdown_table(results)


def test_evaluate_runs_an_export_like_its_checkpoint(exported, tmp_path):
    from uniultra.data.dataset import SegmentationDataset
    from uniultra.data.phantom import write_phantom_dataset
    from uniultra.evaluation.evaluate import ModelMethod, evaluate, make_method

    model, out = exported
    data = [SegmentationDataset(write_phantom_dataset(tmp_path / "ph", 3, seed=3, size=(100, 140)))]
    protocol = {"prompt_mode": "box", "jitter": 20, "seed": 0, "progress": False}
    torch_rows = evaluate(ModelMethod("torch", Predictor(model)), data, **protocol)[0].rows
    onnx_rows = evaluate(make_method(f"onnx:{out}"), data, **protocol)[0].rows
    assert [r["stem"] for r in onnx_rows] == [r["stem"] for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        assert a["dice"] == pytest.approx(b["dice"], abs=0.01)
    assert make_method(f"onnx-int8:{out}").predictor.int8


def test_exported_graphs_normalise_channels_without_transposes(exported):
    """LayerNorm2d is exported as a reduction over axis 1 (OpenVINO fuses it into one MVN): no
    NCHW <-> NHWC Transpose pair is left around it, which OpenVINO's bf16 runs with a slow kernel."""
    import onnx

    _, out = exported
    layout_swaps = ([0, 2, 3, 1], [0, 3, 1, 2])
    # The decoder only: Hiera itself works channels-last (B, H, W, C), so the encoder has its own.
    graph = onnx.load(str(out / md.DECODER_FILE)).graph
    swaps = [n.name for n in graph.node if n.op_type == "Transpose"
             and any(list(a.ints) in layout_swaps for a in n.attribute if a.name == "perm")]
    assert swaps == []


def test_layernorm2d_exported_form_matches_eager():
    from uniultra.models.layers import LayerNorm2d

    torch.manual_seed(0)
    norm = LayerNorm2d(16).eval()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 9, 7) * 3 + 1
    program = torch.export.export(norm, (x,))
    assert "permute" not in str(program.graph)
    torch.testing.assert_close(program.module()(x), norm(x), rtol=1e-5, atol=1e-5)


def test_box_decoder_answers_prompts_without_a_mask_and_old_exports_still_run(exported, predictors, tmp_path):
    """Prompts without a mask input go to box_decoder.onnx (image tokens laid out once per image); a mask
    input goes to decoder.onnx; an export without a box decoder (older) answers everything with decoder.onnx,
    with the same logits."""
    _, out = exported
    _, onnx_pred = predictors
    image = make_phantom(6, size=(150, 170)).image
    onnx_pred.set_image(image)
    coords, labels = np.zeros((1, 2, 2), np.float32), np.array([[2, 3]], np.int32)
    feeds, box = onnx_pred.decoder_feeds(coords, labels)
    assert box and set(feeds) == set(md.BOX_DECODER_INPUTS)
    feeds, box = onnx_pred.decoder_feeds(coords, labels, np.zeros((1, 1, SIZE // 4, SIZE // 4), np.float32))
    assert not box and set(feeds) == set(md.DECODER_INPUTS)

    old = tmp_path / "old"
    shutil.copytree(out, old)
    meta = json.loads((old / md.METADATA_FILE).read_text())
    del meta["files"]["box_decoder"]
    (old / md.METADATA_FILE).write_text(json.dumps(meta))
    (old / md.BOX_DECODER_FILE).unlink()
    old_pred = OnnxPredictor(old)
    old_pred.max_hole_share = 0.0  # as the fixture's predictors: the graphs are compared
    assert not old_pred.has_box_decoder
    old_pred.set_image(image)
    for prompt in ({"box": [30, 25, 120, 110]}, {"points": [[70, 60]], "labels": [1]}):
        new_logits = onnx_pred.predict(**prompt, multimask=True, return_logits=True)[0]
        old_logits = old_pred.predict(**prompt, multimask=True, return_logits=True)[0]
        assert np.abs(new_logits - old_logits).max() < 1e-3


def test_exact_box_tokens_survive_export(tmp_path):
    """A model with exact-box tokens (prompt labels 4, 5) answers exact boxes alike in both runtimes;
    the export says it has them, and an export without them refuses an exact box."""
    torch.manual_seed(1)
    config = SAM2ImageModel.from_preset("mini", SIZE).config
    model = SAM2ImageModel(dataclasses.replace(config, decoder=dataclasses.replace(config.decoder,
                                                                                   exact_box_tokens=True)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    checkpoint, out = tmp_path / "exact.pt", tmp_path / "onnx"
    save_model(model, checkpoint)
    assert main(["export", "onnx", "--model", str(checkpoint), "--out", str(out)]) == 0
    torch_pred, onnx_pred = Predictor(load_model(checkpoint)), OnnxPredictor(out, threads=1)
    assert torch_pred.supports_exact_box and onnx_pred.supports_exact_box
    image, prompt = phantom_cases()[0]
    torch_pred.set_image(image)
    onnx_pred.set_image(image)
    exact = torch_pred.predict(**prompt, exact_box=True, return_logits=True)[0]
    plain = torch_pred.predict(**prompt, return_logits=True)[0]
    assert np.abs(exact - plain).max() > 1e-2  # the tokens matter, so the comparison below means something
    np.testing.assert_allclose(onnx_pred.predict(**prompt, exact_box=True, return_logits=True)[0], exact,
                               atol=LOGIT_ATOL)


def test_an_export_without_exact_box_tokens_refuses_an_exact_box(predictors):
    _, onnx_pred = predictors
    image, prompt = phantom_cases()[0]
    onnx_pred.set_image(image)
    assert not onnx_pred.supports_exact_box
    with pytest.raises(ValueError, match="exact_box_tokens"):
        onnx_pred.predict(**prompt, exact_box=True)
