"""OpenVINO INT8 encoder: NNCF post-training quantisation of an export's encoder.onnx.

Calibrated on a few images (default: synthetic B-mode phantoms, which cover the grey-level and
speckle statistics of ultrasound well enough to set activation ranges; pass real images for a
closer fit). Writes OV_INT8_ENCODER (+ its .bin) and OV_INT8_RECORD, which ties it to the sha256
of the encoder.onnx it came from, into the export directory; read by
`OpenVinoPredictor(export_dir, int8=True)`. Needs the `openvino` extra (openvino, nncf).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from uniultra.atomic import atomic_write_text
from uniultra.inference.onnx_predictor import ExportedPredictor
from uniultra.inference.openvino_predictor import INSTALL_HINT, OV_INT8_ENCODER, OV_INT8_RECORD, source_record

DEFAULT_CALIBRATION_IMAGES = 8


def quantize_encoder(export_dir: str | os.PathLike, images: Sequence[np.ndarray] | None = None,
                     n_images: int = DEFAULT_CALIBRATION_IMAGES,
                     log: Callable[[str], None] | None = None) -> Path:
    """Quantise `export_dir`'s encoder to INT8 with NNCF; returns the path of the written .xml."""
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise ImportError(f"the OpenVINO INT8 encoder needs openvino and nncf: {INSTALL_HINT}") from exc
    export_dir = Path(export_dir)
    reader = ExportedPredictor(export_dir)
    images = list(images) if images is not None else calibration_phantoms(n_images)
    if log:
        log(f"quantising {export_dir / reader.metadata['files']['encoder']['path']} to INT8 (NNCF, "
            f"{len(images)} calibration images)")
    encoder_onnx = export_dir / reader.metadata["files"]["encoder"]["path"]
    inputs = [reader.preprocess(image) for image in images]
    # NNCF draws progress bars on stdout, where commands print their results: sent to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        quantized = nncf.quantize(ov.Core().read_model(str(encoder_onnx)), nncf.Dataset(inputs),
                                  subset_size=len(inputs), model_type=nncf.ModelType.TRANSFORMER)
    _save_atomically(ov, quantized, export_dir)
    atomic_write_text(export_dir / OV_INT8_RECORD, json.dumps(source_record(export_dir, encoder_onnx)) + "\n")
    return export_dir / OV_INT8_ENCODER


def calibration_phantoms(n: int) -> list[np.ndarray]:
    from uniultra.data.phantom import make_phantom

    # Seeds far from the bundled model's training phantoms (0..239) and the demo's (1000+).
    return [make_phantom(seed, size=(480, 640), kind="mixed").image for seed in range(5000, 5000 + n)]


def _save_atomically(ov, model, export_dir: Path) -> None:
    # .xml and .bin written in a temporary folder beside the export, then moved in (.bin first:
    # an .xml is only ever found with its weights). fp32 weights kept as they are (no fp16 compression).
    tmp = Path(tempfile.mkdtemp(prefix=".ov-int8-", dir=export_dir))
    try:
        ov.save_model(model, str(tmp / OV_INT8_ENCODER), compress_to_fp16=False)
        weights = Path(OV_INT8_ENCODER).with_suffix(".bin").name
        os.replace(tmp / weights, export_dir / weights)
        os.replace(tmp / OV_INT8_ENCODER, export_dir / OV_INT8_ENCODER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
