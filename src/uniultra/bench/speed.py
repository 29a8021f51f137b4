"""`uniultra bench speed`: what a user waits for, PyTorch eager against ONNX Runtime, in one run.

For each model preset (random weights: speed does not depend on the values) at one input size:
- parameters (count_parameters) and FLOPs with attention counted (uniultra.evaluation.model_info.describe);
- median latency after warm-up, threads fixed (efficiency.measure_latency), of
  * encoder: normalised (1, 3, S, S) image -> image embedding + high-res features,
  * decoder: one box prompt on those features -> low-res logits + IoU,
  * end to end: `set_image` + `predict(box=...)` on a uint8 image of realistic size, i.e.
    pre-processing, encoder, decoder and post-processing to a full-size mask,
  for PyTorch eager (uniultra.inference.predictor.Predictor) and ONNX Runtime fp32 and dynamic-INT8
  encoders (uniultra.export.OnnxPredictor);
- peak RSS of a fresh process that loads the model and segments one image (measure_peak_rss);
- optionally the official sam2 code's image encoder (`forward_image`: trunk, neck, high-res
  projections, the same scope as ours) built with the same config, as a reference.

Timings on a shared machine are noisy: every latency keeps all samples, p10 and p90, and the
load average before and after the run is recorded next to them. Runtimes are measured one
after another, never interleaved (two thread pools spinning at once slow each other down).
"""

from __future__ import annotations

import datetime as dt
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
from uniultra.models.config import PRESETS, preset
from uniultra.models.image_model import SAM2ImageModel

RUNTIMES = ("torch", "ort-fp32", "ort-int8")
RUNTIME_LABELS = {
    "torch": "PyTorch eager",
    "ort-fp32": "onnxruntime fp32",
    "ort-int8": "onnxruntime int8 enc.",
    "official": "official sam2 (eager)",
}
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

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in PRESETS]
        if unknown:
            raise ValueError(f"unknown model preset(s) {unknown}; choose from {sorted(PRESETS)}")
        if not self.models:
            raise ValueError("give at least one model")
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError("need threads >= 1, repeats >= 1 and warmup >= 0")
        preset(self.models[0], self.size)  # validates the size (a multiple of 32)


# ---------------------------------------------------------------------------------------------
# Machine and inputs


def machine_info() -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "uniultra": __version__,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


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
    from uniultra.inference.onnx_predictor import OnnxPredictor
    from uniultra.inference.predictor import Predictor

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
    }
    s = cfg.size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))
    h, w = image.shape[:2]
    box_model = torch.tensor([[box[0] * s / w, box[1] * s / h, box[2] * s / w, box[3] * s / h]])

    log(f"[{name}] PyTorch eager")
    predictor = Predictor(model)
    with torch.inference_mode():
        features = model.encode_image(x)
    entry["latency_ms"]["torch"] = {
        "preprocess": _latency(lambda: predictor.preprocess(image), cfg, True),
        "encoder": _latency(lambda: model.encode_image(x), cfg, True),
        "decoder": _latency(lambda: model.decode(features, boxes=box_model), cfg, True),
        "end_to_end": _latency(lambda: (predictor.set_image(image), predictor.predict(box=box)), cfg, True),
    }
    predictor.set_image(image)
    torch_mask = predictor.predict(box=box)[0]

    log(f"[{name}] ONNX export")
    start = time.perf_counter()
    export_dir = workdir / name
    export = export_onnx(model, export_dir, int8=True)
    entry["export"] = {"seconds": time.perf_counter() - start,
                       "bytes": {k: p.stat().st_size for k, p in export.files.items()},
                       "check_max_abs": export.check,
                       "attention_op": export.metadata["attention_op"]}
    x_np = x.numpy()
    entry["agreement_with_torch"] = {}
    for runtime, int8 in (("ort-fp32", False), ("ort-int8", True)):
        log(f"[{name}] {RUNTIME_LABELS[runtime]}")
        onnx_predictor = OnnxPredictor(export_dir, int8=int8, threads=cfg.threads, verify=False)
        encoder, decoder = onnx_predictor.encoder, onnx_predictor.decoder
        feats = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, {"image": x_np}), strict=True))
        coords = box_model.numpy().reshape(1, 2, 2).astype(np.float32)
        feeds = {**feats, "point_coords": coords, "point_labels": np.array([[2, 3]], np.int32),
                 "mask_input": np.zeros((1, 1, s // 4, s // 4), np.float32),
                 "has_mask_input": np.zeros(1, np.float32)}
        entry["latency_ms"][runtime] = {
            "preprocess": _latency(lambda p=onnx_predictor: p.preprocess(image), cfg),
            "encoder": _latency(lambda e=encoder: e.run(None, {"image": x_np}), cfg),
            "decoder": _latency(lambda d=decoder, f=feeds: d.run(["masks", "iou_scores"], f), cfg),
            "end_to_end": _latency(lambda p=onnx_predictor: (p.set_image(image), p.predict(box=box)), cfg),
        }
        onnx_predictor.set_image(image)
        onnx_mask = onnx_predictor.predict(box=box)[0]
        entry["agreement_with_torch"][runtime] = {"mask_iou": _iou(torch_mask, onnx_mask)}
        del onnx_predictor, encoder, decoder

    if cfg.rss:
        log(f"[{name}] peak memory (fresh processes)")
        jobs = {
            "torch": partial(workers.torch_predict_once, name, s, cfg.threads, image, box),
            "ort-fp32": partial(workers.onnx_predict_once, str(export_dir), False, cfg.threads, image, box),
            "ort-int8": partial(workers.onnx_predict_once, str(export_dir), True, cfg.threads, image, box),
        }
        for runtime, job in jobs.items():
            rss = measure_peak_rss(job)
            entry["peak_rss_mb"][runtime] = {"peak": rss.peak_mb, "baseline": rss.baseline_mb, "work": rss.work_mb}
    return entry


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
    }
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
    cfg = results["config"]
    models = results["models"]
    tiny = models.get("tiny")
    header = ("| model | runtime | enc. params | enc. GFLOPs | encoder ms | decoder ms (1 box) | "
              "end-to-end ms | peak RSS MB | encoder ÷ tiny | end-to-end ÷ tiny |")
    lines = [header, "|" + "---|" * 10]
    for name, entry in models.items():
        runtimes = list(RUNTIMES) + (["official"] if "official" in entry else [])
        for runtime in runtimes:
            official = runtime == "official"
            source = entry["official"] if official else entry
            lat = source["latency_ms"] if official else source["latency_ms"].get(runtime, {})
            ratios = []
            for stage in ("encoder", "end_to_end"):
                mine, ref = _median(entry, runtime, stage), _median(tiny, runtime, stage) if tiny else None
                ratios.append(f"{mine / ref:.2f}" if mine and ref else "–")
            rss = entry["peak_rss_mb"].get(runtime, {}).get("peak") if not official else None
            lines.append(
                f"| {name} | {RUNTIME_LABELS[runtime]} | {source['params']['encoder'] / 1e6:.3f} M | "
                f"{entry['gflops']['encoder']:.1f} | {_cell(lat.get('encoder'))} | {_cell(lat.get('decoder'))} | "
                f"{_cell(lat.get('end_to_end'))} | {f'{rss:.0f}' if rss else '–'} | {ratios[0]} | {ratios[1]} |"
            )
    notes = [
        "",
        f"Input {cfg['size']} px; {cfg['threads']} threads; median (p10–p90) of {cfg['repeats']} runs after "
        f"{cfg['warmup']} warm-up runs; end to end = `set_image` + `predict(box=...)` on a "
        f"{cfg['image_hw'][0]}x{cfg['image_hw'][1]} uint8 image, full-size mask out. "
        "÷ tiny = this time / tiny's time with the same runtime. Peak RSS: fresh process loading the model "
        "and segmenting one image (the onnxruntime worker does not import torch).",
    ]
    for name, entry in models.items():
        official = _median(entry, "official", "encoder")
        if official:
            speedups = ", ".join(f"{RUNTIME_LABELS[r]} {official / m:.2f}x"
                                 for r in RUNTIMES if (m := _median(entry, r, "encoder")))
            notes.append(f"- {name} encoder speed-up over the official code (same run): {speedups}.")
    for name, entry in models.items():
        agree = entry.get("agreement_with_torch", {})
        if agree:
            notes.append(f"- {name}: mask IoU of onnxruntime vs PyTorch on the test image: "
                         + ", ".join(f"{RUNTIME_LABELS[r]} {a['mask_iou']:.4f}" for r, a in agree.items()) + ".")
    load = results["machine"]
    notes.append(f"- load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in load['loadavg_start'])}, "
                 f"at end {'/'.join(f'{v:.1f}' for v in load.get('loadavg_end', []))} on "
                 f"{load['usable_cores']} cores.")
    return "\n".join(lines + notes)


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
        f"## Speed: PyTorch eager vs onnxruntime (`uniultra bench speed`)\n\n"
        f"- machine: {m['cpu']}, {m['usable_cores']} usable cores (shared with other work)\n"
        f"- date: {m['date']}\n"
        f"- command: `{command}`\n"
        f"- versions: torch {m['torch']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, "
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
