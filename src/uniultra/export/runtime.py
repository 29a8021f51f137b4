"""`--runtime`: which engine runs a model, turned into a model spec that `load_predictor` understands.

| runtime        | spec                  | needs                                       |
|----------------|-----------------------|---------------------------------------------|
| torch          | the checkpoint        | -                                           |
| torch-bf16     | `torch-bf16:CKPT`     | a CPU with bf16 units (else fp32, warned)   |
| onnx           | `onnx:DIR`            | the `export` extra                          |
| onnx-int8      | `onnx-int8:DIR`       | the `export` extra                          |
| openvino       | `openvino:DIR`        | `export` + `openvino` extras                |
| openvino-bf16  | `openvino-bf16:DIR`   | as openvino; bf16 units (else fp32, warned) |
| openvino-int8  | `openvino-int8:DIR`   | as openvino (NNCF, calibrated on phantoms)  |

DIR is the checkpoint's ONNX export, made once into a cache directory (CACHE_ENV, else
$XDG_CACHE_HOME/uniultra, else ~/.cache/uniultra) keyed by the checkpoint's sha256 and the input
size; a `--model` that already is an export (`onnx:DIR`, or a directory with uniultra-onnx.json)
is used as it is.

`auto` follows a fixed rule, from measurements (issue #13: on a Xeon with AMX, OpenVINO bf16 ran
the mini encoder in 149 ms against 234 ms for onnxruntime fp32 and 248 ms for PyTorch):
1. openvino-bf16 when openvino is installed and the CPU has bf16 units (avx512_bf16 / amx_bf16);
2. else onnx (onnxruntime fp32) when the `export` extra is installed;
3. else torch.
PyTorch is used whatever the rule says where only it can do the job: a GPU device, `preset:NAME`
(random weights, nothing worth caching), and no-prompt (automatic) prediction with a model whose
export would have no automatic head (PyTorch then says what the model can do). A model with an
automatic head (the bundled default has one) is exported with it, so `--prompt none` follows the rule.
OpenVINO fp32 is not picked: faster than onnxruntime on that Xeon (208 ms) but unmeasured elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

from uniultra import __version__
from uniultra.atomic import file_sha256
from uniultra.export.onnx_export import export_onnx
from uniultra.export.openvino_int8 import quantize_encoder
from uniultra.inference import onnx_format as md
from uniultra.inference.cpu import has_bf16_units
from uniultra.inference.loading import EXPORT_PREFIXES, TORCH_BF16_PREFIX, bundled_default_path
from uniultra.inference.openvino_predictor import int8_encoder_current
from uniultra.models.auto_checkpoint import is_auto_checkpoint

RUNTIMES = ("torch", "torch-bf16", "onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-int8", "auto")
CACHE_ENV = "UNIULTRA_CACHE_DIR"
EXPORT_HINT = "pip install 'uniultra[export]'"
OPENVINO_HINT = "pip install 'uniultra[openvino]'"
# The packages each runtime needs to run an export (exporting also needs EXPORT_PACKAGES).
RUNTIME_PACKAGES = {"onnx": ("onnxruntime",), "onnx-int8": ("onnxruntime",), "openvino": ("openvino",),
                    "openvino-bf16": ("openvino",), "openvino-int8": ("openvino", "nncf")}
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class RuntimeUnavailable(ValueError):
    """The runtime asked for cannot run here; the message says what to install or use instead."""


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def auto_runtime(model: str, device: str = "cpu", automatic: bool = False) -> tuple[str, str]:
    """(runtime, why) by the rule in the module docstring."""
    if device != "cpu" or model.startswith("preset:"):
        return "torch", "only PyTorch runs on a GPU or with random weights"
    if automatic and not has_automatic_head(model):
        return "torch", "no automatic head to export: PyTorch reports what this model can do without a prompt"
    exported = export_dir_of(model) is not None
    can_export = exported or all(installed(p) for p in EXPORT_PACKAGES)
    if can_export and installed("openvino") and has_bf16_units():
        return "openvino-bf16", "openvino is installed and the CPU has bf16 units"
    if can_export and installed("onnxruntime"):
        return "onnx", "no OpenVINO with bf16 units here; onnxruntime is installed"
    if exported:
        raise RuntimeUnavailable(f"{model} is an ONNX export but neither onnxruntime nor openvino is installed: "
                                 f"{EXPORT_HINT}")
    return "torch", "neither the export extra nor OpenVINO is installed"


def has_automatic_head(model: str) -> bool:
    """Whether `model` (an export, `default`, or a checkpoint path) answers without a prompt."""
    export_dir = export_dir_of(model)
    if export_dir is not None:
        try:
            return "auto_decoder" in md.read_metadata(export_dir, verify=False)["files"]
        except (OSError, ValueError):
            return False
    return is_auto_checkpoint(bundled_default_path() if model == "default" else model)


def runtime_spec(model: str, runtime: str | None, image_size: int | None = None, device: str = "cpu",
                 automatic: bool = False, log: Callable[[str], None] = print) -> str:
    """The model spec that runs `model` on `runtime` (None: `model` as it is)."""
    if runtime is None:
        return model
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime, why = auto_runtime(model, device, automatic)
        log(f"runtime auto: {runtime} ({why})")
    runtime = _bf16_or_fallback(runtime, log)
    export_dir = export_dir_of(model)
    if runtime in ("torch", "torch-bf16"):
        if export_dir is not None:
            raise ValueError(f"{model} is an ONNX export: PyTorch runs checkpoints; choose an ONNX or OpenVINO runtime")
        return model if runtime == "torch" else TORCH_BF16_PREFIX + model
    _require(runtime, device)
    if export_dir is None:
        export_dir = cached_export(model, image_size, int8=runtime == "onnx-int8", log=log)
    elif runtime == "onnx-int8" and "encoder_int8" not in md.read_metadata(export_dir, verify=False)["files"]:
        raise ValueError(f"{export_dir}: no INT8 encoder in this export (export it with --int8)")
    if runtime == "openvino-int8" and not int8_encoder_current(export_dir):
        quantize_encoder(export_dir, log=log)
    return f"{runtime}:{export_dir}"


def _bf16_or_fallback(runtime: str, log: Callable[[str], None]) -> str:
    if runtime.endswith("-bf16") and not has_bf16_units():
        fp32 = runtime.removesuffix("-bf16")
        log(f"--runtime {runtime}: this CPU has no bf16 units (avx512_bf16 / amx_bf16), so bf16 would be emulated "
            f"(slower) or ignored; running {fp32} (fp32) instead")
        return fp32
    return runtime


def _require(runtime: str, device: str) -> None:
    if device != "cpu":
        raise ValueError(f"--runtime {runtime} runs on the CPU; use torch for --device {device}")
    missing = [p for p in RUNTIME_PACKAGES[runtime] if not installed(p)]
    if missing:
        hint = OPENVINO_HINT if runtime.startswith("openvino") else EXPORT_HINT
        raise RuntimeUnavailable(f"--runtime {runtime} needs {', '.join(missing)}, not installed: {hint} "
                                 "(or --runtime torch / auto)")


def export_dir_of(model: str) -> Path | None:
    """The export directory `model` names (`onnx:DIR`, `openvino:DIR`, ..., or a bare DIR), else None."""
    for prefix in EXPORT_PREFIXES:
        if model.startswith(prefix):
            return Path(model[len(prefix):])
    path = Path(model)
    return path if (path / md.METADATA_FILE).is_file() else None


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "uniultra"


def cached_export(model: str, image_size: int | None, int8: bool = False,
                  log: Callable[[str], None] = print) -> Path:
    """The ONNX export of checkpoint `model` in the cache, made first if missing (or without INT8 when needed)."""
    if model.startswith("preset:"):
        raise ValueError(f"{model} has random weights: export it yourself (uniultra export onnx) to run it on "
                         "ONNX or OpenVINO")
    missing = [p for p in EXPORT_PACKAGES if not installed(p)]
    if missing:
        raise RuntimeUnavailable(f"exporting {model} to ONNX needs {', '.join(missing)}: {EXPORT_HINT}")
    source = bundled_default_path() if model == "default" else Path(model)
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint not found: {model}")
    out = cache_root() / "onnx" / f"{file_sha256(source)[:16]}-{image_size or 'own'}px-{__version__}"
    if _usable(out, int8):
        return out
    log(f"exporting {model} to ONNX once, into {out}")
    export_onnx(model, out, image_size=image_size, int8=int8)
    return out


def _usable(out: Path, int8: bool) -> bool:
    try:
        meta = md.read_metadata(out, verify=True)
    except (OSError, ValueError):
        return False
    files = meta["files"]
    # Made before box_decoder.onnx existed: it still works, but every prompt would take the slower
    # decoder.onnx, so the cache makes it again (models with the box prior never get a box decoder).
    box_prior = meta.get("model", {}).get("config", {}).get("decoder", {}).get("box_prior", False)
    if "box_decoder" not in files and not box_prior:
        return False
    return not int8 or "encoder_int8" in files
