"""`uniultra bench speed`: what a user waits for, PyTorch against ONNX Runtime and OpenVINO, in one run.

For each model preset (random weights: speed does not depend on the values) at one input size:
- parameters (count_parameters) and FLOPs with attention counted (uniultra.evaluation.model_info.describe);
- median latency after warm-up, threads fixed (efficiency.measure_latency), of
  * encoder: normalised (1, 3, S, S) image -> image embedding + high-res features,
  * decoder: one box prompt on those features -> low-res logits + IoU,
  * end to end: `set_image` + `predict(box=...)` on a uint8 image of realistic size, i.e.
    pre-processing, encoder, decoder and post-processing to a full-size mask,
  for PyTorch eager fp32 and bf16-autocast encoder (uniultra.inference.predictor.Predictor), ONNX
  Runtime fp32 and dynamic-INT8 encoders (uniultra.export.OnnxPredictor) and OpenVINO fp32, bf16 and
  NNCF-INT8 encoders (uniultra.inference.openvino_predictor), each runtime that can run here;
- the CPU model and ISA flags, and the matmul peaks (fp32: the faster of torch and onnxruntime;
  bf16: torch) measured in the same run, so that each encoder's achieved GFLOP/s reads as a
  fraction of what this machine can do;
- peak RSS of a fresh process that loads the model and segments one image (measure_peak_rss);
- optionally the official sam2 code's image encoder (`forward_image`: trunk, neck, high-res
  projections, the same scope as ours) built with the same config, as a reference.

Timings on a shared machine are noisy: every latency keeps all samples, p10 and p90, and the
load average before and after the run is recorded next to them. Runtimes are measured one
after another, never interleaved (two thread pools spinning at once slow each other down).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uniultra import __version__
from uniultra.atomic import atomic_write_text
from uniultra.bench import workers
from uniultra.evaluation.efficiency import count_parameters, measure_latency, measure_peak_rss
from uniultra.inference.cpu import cpu_model, has_bf16_units, isa_report
from uniultra.inference.openvino_predictor import openvino_version
from uniultra.models.config import PRESETS, preset
from uniultra.models.image_model import SAM2ImageModel

# Keys of the JSON (ort-*: the names of earlier results, kept for comparison across runs).
RUNTIMES = ("torch", "torch-bf16", "ort-fp32", "ort-int8", "openvino", "openvino-bf16", "openvino-int8")
TORCH_RUNTIMES = ("torch", "torch-bf16")
# `--runtime` names (as in predict / evaluate / serve) -> JSON keys.
RUNTIME_KEYS = {"torch": "torch", "torch-bf16": "torch-bf16", "onnx": "ort-fp32", "onnx-int8": "ort-int8",
                "openvino": "openvino", "openvino-bf16": "openvino-bf16", "openvino-int8": "openvino-int8"}
RUNTIME_LABELS = {
    "torch": "PyTorch eager",
    "torch-bf16": "PyTorch bf16 enc.",
    "ort-fp32": "onnxruntime fp32",
    "ort-int8": "onnxruntime int8 enc.",
    "openvino": "OpenVINO fp32",
    "openvino-bf16": "OpenVINO bf16",  # encoder and decoders (uniultra.inference.openvino_predictor)
    "openvino-int8": "OpenVINO int8 enc.",
    "official": "official sam2 (eager)",
}
# Matrix-multiply peak: n x n by n x n (2 n^3 flops), best of `repeats` after one warm-up.
PEAK_SIZE = 2048
STAGES = ("preprocess", "encoder", "decoder", "end_to_end")
# Official config file of each preset; mini is the tiny file with our trunk overrides.
OFFICIAL_CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "mini": "configs/sam2.1/sam2.1_hiera_t.yaml",
}
MARKER = "speed"


@dataclass(frozen=True)
class SpeedConfig:
    models: tuple[str, ...] = ("mini", "tiny")
    size: int = 1024
    threads: int = 2
    repeats: int = 10
    warmup: int = 2
    with_official: bool = False
    image_hw: tuple[int, int] = (600, 800)
    rss: bool = True
    runtimes: tuple[str, ...] = RUNTIMES  # JSON keys; those that cannot run here are skipped (`skipped_runtimes`)
    peak_size: int = PEAK_SIZE

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in PRESETS]
        if unknown:
            raise ValueError(f"unknown model preset(s) {unknown}; choose from {sorted(PRESETS)}")
        if not self.models:
            raise ValueError("give at least one model")
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("need threads >= 1, repeats >= 1 and warmup >= 0")
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown or not self.runtimes:
            raise ValueError(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIME_KEYS)}")
        if self.peak_size < 64:
            raise ValueError(f"the matmul peak needs a size >= 64, got {self.peak_size}")
        preset(self.models[0], self.size)  # validates the size (a multiple of 32)

    def chosen_runtimes(self) -> list[str]:
        """The asked-for runtimes that can run here, in RUNTIMES order (see `skipped_runtimes`)."""
        skipped = skipped_runtimes(self.runtimes)
        return [r for r in RUNTIMES if r in self.runtimes and r not in skipped]


def skipped_runtimes(runtimes: tuple[str, ...]) -> dict[str, str]:
    """{runtime: why it is not measured here}: missing packages, or bf16 on a CPU without bf16 units
    (bf16 would be emulated by PyTorch and ignored by OpenVINO: no number worth reporting)."""
    needs = {"openvino": ("openvino",), "openvino-bf16": ("openvino",), "openvino-int8": ("openvino", "nncf")}
    reasons = {}
    for runtime in runtimes:
        missing = [p for p in needs.get(runtime, ()) if importlib.util.find_spec(p) is None]
        if missing:
            reasons[runtime] = f"{', '.join(missing)} not installed (pip install 'uniultra[openvino]')"
        elif runtime.endswith("-bf16") and not has_bf16_units():
            reasons[runtime] = "this CPU has no bf16 units (avx512_bf16 / amx_bf16)"
    return reasons


# ---------------------------------------------------------------------------------------------
# Machine and inputs


def machine_info() -> dict[str, Any]:
    import onnxruntime

    return {
        "cpu": cpu_model(),
        "isa": isa_report(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino_version(),
        "numpy": np.__version__,
        "uniultra": __version__,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def matmul_peaks(size: int, threads: int, repeats: int = 5) -> dict[str, float]:
    """Measured matmul GFLOP/s (size^2 matrices, `threads` threads, best of `repeats` after one
    warm-up): the ceiling each encoder's achieved GFLOP/s is compared with. fp32 is the faster of
    torch and onnxruntime: torch's CPU sgemm is far from the hardware on some CPUs (AMD EPYC,
    2026-12-02: onnxruntime ran a whole encoder faster than torch's bare matmul), so torch alone
    gave efficiencies above 100 %. bf16 is torch's (onnxruntime's CPU MatMul has no bf16)."""
    peaks = _torch_matmul_peaks(size, threads, repeats)
    peaks["fp32_torch"] = peaks["fp32"]
    peaks["fp32_onnxruntime"] = _onnxruntime_matmul_peak(size, threads, repeats)
    peaks["fp32"] = max(peaks["fp32_torch"], peaks["fp32_onnxruntime"])
    return peaks


def _onnxruntime_matmul_peak(size: int, threads: int, repeats: int) -> float:
    import onnxruntime
    from onnx import TensorProto, helper

    shape = [size, size]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape, dtype=np.float32) for n in ("a", "b")}
    session.run(None, feeds)
    best = min(_seconds(lambda: session.run(None, feeds)) for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


def _torch_matmul_peaks(size: int, threads: int, repeats: int) -> dict[str, float]:
    flops = 2.0 * size**3
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    peaks = {}
    try:
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            a, b = (torch.randn(size, size, generator=torch.Generator().manual_seed(i)).to(dtype) for i in (0, 1))
            torch.mm(a, b)
            best = min(_seconds(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
            peaks[key] = flops / best / 1e9
    finally:
        torch.set_num_threads(previous)
    return peaks


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def efficiency(entry: dict[str, Any], peaks: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per runtime: encoder GFLOP/s achieved (counted FLOPs / median time) and its fraction of the
    fp32 and bf16 matmul peaks of the same run."""
    gflops = entry["gflops"]["encoder"]
    out = {}
    for runtime in [*entry["latency_ms"], *(["official"] if "official" in entry else [])]:
        median = _median(entry, runtime, "encoder")
        if median:
            achieved = gflops / (median / 1000)
            out[runtime] = {"encoder_gflop_per_s": achieved, "fraction_of_fp32_peak": achieved / peaks["fp32"],
                            "fraction_of_bf16_peak": achieved / peaks["bf16"]}
    return out


def bench_image(hw: tuple[int, int]) -> tuple[np.ndarray, list[float]]:
    """A synthetic B-mode image (uint8, gray) and a box around its lesion, in its pixels."""
    from uniultra.data.phantom import make_phantom

    phantom = make_phantom(seed=0, size=hw, kind="hypoechoic", geometry="linear")
    ys, xs = np.nonzero(phantom.mask)
    h, w = hw
    box = [max(float(xs.min()) - 8, 0.0), max(float(ys.min()) - 8, 0.0),
           min(float(xs.max()) + 8, float(w)), min(float(ys.max()) + 8, float(h))]
    return phantom.image, box


# ---------------------------------------------------------------------------------------------
# Measurements


def _latency(fn: Callable[[], Any], cfg: SpeedConfig, torch_grad_free: bool = False) -> dict[str, Any]:
    stats = measure_latency(fn, warmup=cfg.warmup, repeats=cfg.repeats, threads=cfg.threads,
                            inference_mode=torch_grad_free)
    return {**asdict(stats), "loadavg_1min": os.getloadavg()[0]}


def bench_model(name: str, cfg: SpeedConfig, image: np.ndarray, box: list[float], workdir: Path,
                log: Callable[[str], None]) -> dict[str, Any]:
    from uniultra.evaluation.model_info import describe
    from uniultra.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = SAM2ImageModel(preset(name, cfg.size)).eval()
    info = describe(model)
    entry: dict[str, Any] = {
        "params": {
            "encoder": count_parameters(model.image_encoder),
            "whole": count_parameters(model),
        },
        "gflops": {
            "encoder": info.encoder_gflops,
            "high_res_projections": info.high_res_projection_gflops,
            "decoder_one_box": info.decoder_gflops_per_prompt,
        },
        "latency_ms": {},
        "peak_rss_mb": {},
        "agreement_with_torch": {},
    }
    inputs = _Inputs.make(cfg.size, image, box)
    runtimes = cfg.chosen_runtimes()
    torch_mask = None
    for runtime in [r for r in runtimes if r in TORCH_RUNTIMES]:
        log(f"[{name}] {RUNTIME_LABELS[runtime]}")
        entry["latency_ms"][runtime], mask = _bench_torch(model, inputs, cfg, bf16=runtime == "torch-bf16")
        torch_mask = mask if runtime == "torch" else torch_mask
        _agreement(entry, runtime, torch_mask, mask)

    export_dir = workdir / name
    exported = [r for r in runtimes if r not in TORCH_RUNTIMES]
    if exported:
        log(f"[{name}] ONNX export")
        start = time.perf_counter()
        export = export_onnx(model, export_dir, int8="ort-int8" in exported)
        entry["export"] = {"seconds": time.perf_counter() - start,
                           "bytes": {k: p.stat().st_size for k, p in export.files.items()},
                           "check_max_abs": export.check,
                           "attention_op": export.metadata["attention_op"]}
    if "openvino-int8" in exported:
        from uniultra.export.openvino_int8 import quantize_encoder

        start = time.perf_counter()
        quantize_encoder(export_dir, log=log)
        entry["export"]["openvino_int8_seconds"] = time.perf_counter() - start
    for runtime in exported:
        log(f"[{name}] {RUNTIME_LABELS[runtime]}")
        predictor = _exported_predictor(runtime, export_dir, cfg.threads)
        entry["latency_ms"][runtime], mask = _bench_exported(predictor, inputs, cfg)
        # The encoder's arithmetic as compiled (OpenVINO reports fp32 where bf16 was asked without bf16 units).
        entry.setdefault("precision", {})[runtime] = "int8" if "int8" in runtime else getattr(predictor, "precision",
                                                                                               "fp32")
        _agreement(entry, runtime, torch_mask, mask)
        del predictor

    if cfg.rss:
        log(f"[{name}] peak memory (fresh processes)")
        for runtime in runtimes:
            rss = measure_peak_rss(_rss_job(runtime, name, cfg, export_dir, image, box))
            entry["peak_rss_mb"][runtime] = {"peak": rss.peak_mb, "baseline": rss.baseline_mb, "work": rss.work_mb}
    return entry


@dataclass(frozen=True)
class _Inputs:
    """One run's inputs: a normalised model input, the uint8 image and its box (image and model pixels)."""

    x: torch.Tensor
    image: np.ndarray
    box: list[float]
    box_model: torch.Tensor

    @staticmethod
    def make(size: int, image: np.ndarray, box: list[float]) -> _Inputs:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        h, w = image.shape[:2]
        box_model = torch.tensor([[box[0] * size / w, box[1] * size / h, box[2] * size / w, box[3] * size / h]])
        return _Inputs(x, image, box, box_model)


def _bench_torch(model: SAM2ImageModel, inputs: _Inputs, cfg: SpeedConfig,
                 bf16: bool) -> tuple[dict[str, Any], np.ndarray]:
    from uniultra.inference.predictor import Predictor

    predictor = Predictor(model, cpu_bf16=bf16)

    def encode():
        with predictor._encoder_autocast():
            return model.encode_image(inputs.x)

    with torch.inference_mode():
        features = encode()
    image, box = inputs.image, inputs.box
    latency = {
        "preprocess": _latency(lambda: predictor.preprocess(image), cfg, True),
        "encoder": _latency(encode, cfg, True),
        "decoder": _latency(lambda: model.decode(features, boxes=inputs.box_model), cfg, True),
        "end_to_end": _latency(lambda: (predictor.set_image(image), predictor.predict(box=box)), cfg, True),
    }
    predictor.set_image(image)
    return latency, predictor.predict(box=box)[0]


def _exported_predictor(runtime: str, export_dir: Path, threads: int):
    from uniultra.inference.onnx_predictor import OnnxPredictor

    if runtime.startswith("ort-"):
        return OnnxPredictor(export_dir, int8=runtime == "ort-int8", threads=threads, verify=False)
    from uniultra.inference.openvino_predictor import OpenVinoPredictor

    precision = "bf16" if runtime == "openvino-bf16" else "fp32"
    return OpenVinoPredictor(export_dir, precision=precision, int8=runtime == "openvino-int8", threads=threads,
                             verify=False)


def _bench_exported(predictor, inputs: _Inputs, cfg: SpeedConfig) -> tuple[dict[str, Any], np.ndarray]:
    """Latencies of an `ExportedPredictor` (onnxruntime or OpenVINO): its graphs, then end to end."""
    x_np = inputs.x.numpy()
    image, box = inputs.image, inputs.box
    predictor.set_image(image)
    # The graph `predict` runs for one box: the box decoder when the export has one.
    feeds, box_graph = predictor.decoder_feeds(inputs.box_model.numpy().reshape(1, 2, 2).astype(np.float32),
                                               np.array([[2, 3]], np.int32))
    latency = {
        "preprocess": _latency(lambda: predictor.preprocess(image), cfg),
        "encoder": _latency(lambda: predictor._encode(x_np), cfg),
        "decoder": _latency(lambda: predictor._decode(["masks", "iou_scores"], feeds, box_graph), cfg),
        "end_to_end": _latency(lambda: (predictor.set_image(image), predictor.predict(box=box)), cfg),
    }
    predictor.set_image(image)
    return latency, predictor.predict(box=box)[0]


def _agreement(entry: dict[str, Any], runtime: str, reference: np.ndarray | None, mask: np.ndarray) -> None:
    if reference is not None and runtime != "torch":
        entry["agreement_with_torch"][runtime] = {"mask_iou": _iou(reference, mask)}


def _rss_job(runtime: str, name: str, cfg: SpeedConfig, export_dir: Path, image: np.ndarray, box: list[float]):
    if runtime in TORCH_RUNTIMES:
        return partial(workers.torch_predict_once, name, cfg.size, cfg.threads, image, box, runtime == "torch-bf16")
    if runtime.startswith("ort-"):
        return partial(workers.onnx_predict_once, str(export_dir), runtime == "ort-int8", cfg.threads, image, box)
    precision = "bf16" if runtime == "openvino-bf16" else "fp32"
    return partial(workers.openvino_predict_once, str(export_dir), precision, runtime == "openvino-int8",
                   cfg.threads, image, box)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def official_overrides(name: str, size: int) -> list[str]:
    """Hydra overrides that make the official config build our preset's trunk at `size`."""
    cfg = preset(name, size).trunk

    def seq(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    trunk = "++model.image_encoder.trunk."
    return [
        f"++model.image_size={size}",
        f"{trunk}embed_dim={cfg.embed_dim}",
        f"{trunk}num_heads={cfg.num_heads}",
        f"{trunk}stages={seq(cfg.stages)}",
        f"{trunk}global_att_blocks={seq(cfg.global_att_blocks)}",
        f"{trunk}window_spec={seq(cfg.window_spec)}",
        f"{trunk}window_pos_embed_bkg_spatial_size={seq(cfg.window_pos_embed_bkg_spatial_size)}",
        f"++model.image_encoder.neck.backbone_channel_list={seq(reversed(cfg.stage_dims))}",
    ]


def bench_official(name: str, cfg: SpeedConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The official sam2 image encoder (reference implementation only; imported here, on request)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sam2.build_sam import build_sam2
    except ImportError as exc:
        raise ValueError(f"--with-official needs the official sam2 package (make setup): {exc}") from exc
    log(f"[{name}] official sam2 encoder")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_sam2(OFFICIAL_CONFIGS[name], None, device="cpu",
                           hydra_overrides_extra=official_overrides(name, cfg.size))
    model.eval()
    x = torch.randn(1, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(1))
    result = {
        "config": OFFICIAL_CONFIGS[name],
        "overrides": official_overrides(name, cfg.size),
        "params": {"encoder": count_parameters(model.image_encoder)},
        "latency_ms": {"encoder": _latency(lambda: model.forward_image(x), cfg, True)},
    }
    return result


def run_speed(cfg: SpeedConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole benchmark and return its results (also what gets written as JSON)."""
    import onnxruntime  # noqa: F401  (fail early, before minutes of PyTorch timing)

    results: dict[str, Any] = {
        "benchmark": "speed",
        "machine": machine_info(),
        "config": {**asdict(cfg), "image_hw": list(cfg.image_hw)},
        "command": None,
        "models": {},
        "skipped_runtimes": skipped_runtimes(cfg.runtimes),
    }
    for runtime, why in results["skipped_runtimes"].items():
        log(f"not measured: {RUNTIME_LABELS[runtime]}: {why}")
    log(f"matmul peaks ({cfg.peak_size}^2, {cfg.threads} threads)")
    peaks = matmul_peaks(cfg.peak_size, cfg.threads)
    results["machine"]["matmul_peak_gflop_per_s"] = peaks
    image, box = bench_image(cfg.image_hw)
    results["config"]["box"] = box
    workdir = Path(tempfile.mkdtemp(prefix="uniultra-bench-"))
    try:
        for name in cfg.models:
            results["models"][name] = bench_model(name, cfg, image, box, workdir, log)
            shutil.rmtree(workdir / name, ignore_errors=True)
        if cfg.with_official:
            for name in cfg.models:
                results["models"][name]["official"] = bench_official(name, cfg, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for entry in results["models"].values():
        entry["efficiency"] = efficiency(entry, peaks)
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    return results


# ---------------------------------------------------------------------------------------------
# Reporting


def _median(entry: dict[str, Any], runtime: str, stage: str) -> float | None:
    if runtime == "official":
        lat = entry.get("official", {}).get("latency_ms", {}).get(stage)
    else:
        lat = entry["latency_ms"].get(runtime, {}).get(stage)
    return None if lat is None else lat["median_ms"]


def _cell(lat: dict[str, Any] | None) -> str:
    if lat is None:
        return "–"
    return f"{lat['median_ms']:.0f} ({lat['p10_ms']:.0f}–{lat['p90_ms']:.0f})" if lat["median_ms"] >= 10 else \
        f"{lat['median_ms']:.1f} ({lat['p10_ms']:.1f}–{lat['p90_ms']:.1f})"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table plus the comparisons the issue asks for."""
    header = ("| model | runtime | enc. params | enc. GFLOPs | encoder ms | enc. GFLOP/s (% fp32 peak) | "
              "decoder ms (1 box) | end-to-end ms | peak RSS MB | encoder ÷ tiny | end-to-end ÷ tiny |")
    lines = [header, "|" + "---|" * 11]
    for name, entry in results["models"].items():
        lines += [_row(name, entry, runtime, results["models"].get("tiny")) for runtime in _measured(entry)]
    return "\n".join(lines + _notes(results))


def _measured(entry: dict[str, Any]) -> list[str]:
    return [r for r in RUNTIMES if r in entry["latency_ms"]] + (["official"] if "official" in entry else [])


def _row(name: str, entry: dict[str, Any], runtime: str, tiny: dict[str, Any] | None) -> str:
    official = runtime == "official"
    source = entry["official"] if official else entry
    lat = source["latency_ms"] if official else source["latency_ms"].get(runtime, {})
    ratios = []
    for stage in ("encoder", "end_to_end"):
        mine, ref = _median(entry, runtime, stage), _median(tiny, runtime, stage) if tiny else None
        ratios.append(f"{mine / ref:.2f}" if mine and ref else "–")
    rss = entry["peak_rss_mb"].get(runtime, {}).get("peak") if not official else None
    eff = entry.get("efficiency", {}).get(runtime)
    achieved = f"{eff['encoder_gflop_per_s']:.0f} ({100 * eff['fraction_of_fp32_peak']:.0f}%)" if eff else "–"
    return (f"| {name} | {RUNTIME_LABELS[runtime]} | {source['params']['encoder'] / 1e6:.3f} M | "
            f"{entry['gflops']['encoder']:.1f} | {_cell(lat.get('encoder'))} | {achieved} | "
            f"{_cell(lat.get('decoder'))} | {_cell(lat.get('end_to_end'))} | {f'{rss:.0f}' if rss else '–'} | "
            f"{ratios[0]} | {ratios[1]} |")


def _notes(results: dict[str, Any]) -> list[str]:
    cfg, models, machine = results["config"], results["models"], results["machine"]
    notes = [
        "",
        f"Input {cfg['size']} px; {cfg['threads']} threads; median (p10–p90) of {cfg['repeats']} runs after "
        f"{cfg['warmup']} warm-up runs; end to end = `set_image` + `predict(box=...)` on a "
        f"{cfg['image_hw'][0]}x{cfg['image_hw'][1]} uint8 image, full-size mask out. "
        "÷ tiny = this time / tiny's time with the same runtime. Peak RSS: fresh process loading the model "
        "and segmenting one image (the onnxruntime and OpenVINO workers do not import torch). "
        "enc. GFLOP/s = counted encoder FLOPs / median encoder time; % of the fp32 matmul peak of this run.",
    ]
    notes += _machine_notes(machine, results.get("skipped_runtimes", {}))
    for name, entry in models.items():
        official = _median(entry, "official", "encoder")
        if official:
            speedups = ", ".join(f"{RUNTIME_LABELS[r]} {official / m:.2f}x"
                                 for r in RUNTIMES if (m := _median(entry, r, "encoder")))
            notes.append(f"- {name} encoder speed-up over the official code (same run): {speedups}.")
        peak = machine.get("matmul_peak_gflop_per_s", {}).get("fp32")
        if peak:
            notes.append(f"- {name} encoder fp32 FLOP bound: {1000 * entry['gflops']['encoder'] / peak:.0f} ms "
                         f"({entry['gflops']['encoder']:.1f} GFLOPs at {peak:.0f} GFLOP/s).")
        agree = entry.get("agreement_with_torch", {})
        if agree:
            notes.append(f"- {name}: mask IoU against PyTorch fp32 on the test image: "
                         + ", ".join(f"{RUNTIME_LABELS[r]} {a['mask_iou']:.4f}" for r, a in agree.items()) + ".")
    notes.append(f"- load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in machine['loadavg_start'])}, "
                 f"at end {'/'.join(f'{v:.1f}' for v in machine.get('loadavg_end', []))} on "
                 f"{machine['usable_cores']} cores.")
    return notes


def _machine_notes(machine: dict[str, Any], skipped: dict[str, str]) -> list[str]:
    notes = []
    isa = machine.get("isa")
    if isa:
        flags = ", ".join(flag for flag, present in isa.items() if present and flag != "bf16_units") or "none"
        notes.append(f"- CPU {machine['cpu']}; ISA: {flags}; bf16 units: {'yes' if isa['bf16_units'] else 'no'}.")
    peaks = machine.get("matmul_peak_gflop_per_s")
    if peaks:
        sources = (f" (torch {peaks['fp32_torch']:.0f}, onnxruntime {peaks['fp32_onnxruntime']:.0f})"
                   if "fp32_onnxruntime" in peaks else "")
        notes.append(f"- measured matmul peak (same run): fp32 {peaks['fp32']:.0f} GFLOP/s{sources}, "
                     f"bf16 {peaks['bf16']:.0f} GFLOP/s (torch).")
    notes += [f"- not measured: {RUNTIME_LABELS[r]}: {why}." for r, why in skipped.items()]
    return notes


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    date = results["machine"]["date"][:10]
    return atomic_write_text(Path(out_dir) / f"speed-{date}.json", json.dumps(results, indent=2) + "\n")


BENCHMARKS_HEADER = """# Benchmarks

Measured numbers, each section written by the command named in it. Timings come from a shared
machine, so every table gives a spread (p10–p90) and the load average; raw samples are in the
JSON files under `benchmarks/results/`. Speed targets live here, never in unit tests.

"""


def update_benchmarks_md(path: Path, results: dict[str, Any], table: str) -> Path:
    """Replace (or append) the speed section of BENCHMARKS.md, keeping every other section."""
    path = Path(path)
    m = results["machine"]
    command = results.get("command") or "uniultra bench speed"
    body = (
        f"## Speed: PyTorch, onnxruntime and OpenVINO (`uniultra bench speed`)\n\n"
        f"- machine: {m['cpu']}, {m['usable_cores']} usable cores (shared with other work)\n"
        f"- date: {m['date']}\n"
        f"- command: `{command}`\n"
        f"- versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino {m.get('openvino')}, "
        f"numpy {m['numpy']}, "
        f"uniultra {m['uniultra']}, Python {m['python']}\n"
        f"- raw results: `benchmarks/results/speed-{m['date'][:10]}.json`\n\n"
        f"{table}\n"
    )
    start, end = f"<!-- bench:{MARKER}:start -->", f"<!-- bench:{MARKER}:end -->"
    block = f"{start}\n{body}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else BENCHMARKS_HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + block + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    return atomic_write_text(path, text)
