"""The ONNX export run by OpenVINO (CPU plugin): same API and numpy pre/post-processing as `OnnxPredictor`.

OpenVINO reads the `uniultra export onnx` graphs as they are (the onnxruntime attention op too). Every
graph is compiled with an explicit precision hint, fp32 or bf16: OpenVINO would otherwise pick bf16
by itself on CPUs with bf16 units, and `openvino` must mean fp32 everywhere. With bf16 the decoders
(prompt and automatic) run bf16 too: on an Intel Xeon with AMX the one-box decoder at 1024 px took
26 ms against 50 ms in fp32, its logits within 0.008, and the bundled default's test Dice did not
move (BENCHMARKS.md, runtime parity). `int8` runs the encoder quantised by NNCF
(`uniultra.export.openvino_int8`), stored beside the export as OV_INT8_ENCODER; its decoders stay fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from uniultra.atomic import file_sha256
from uniultra.inference.onnx_format import AUTO_OUTPUTS, ExportFormatError, read_metadata
from uniultra.inference.onnx_predictor import ExportedPredictor

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
# The NNCF-quantised encoder (OpenVINO IR: .xml graph + .bin weights) and the record of its source.
OV_INT8_ENCODER = "encoder.ov-int8.xml"
OV_INT8_RECORD = "encoder.ov-int8.json"
INSTALL_HINT = "pip install 'uniultra[openvino]'"


class OpenVinoPredictor(ExportedPredictor):
    """Interactive segmentation with an exported model on OpenVINO.

    Args:
        export_dir: directory written by `uniultra export onnx`.
        precision: "fp32" or "bf16", for the encoder and the decoders (bf16 runs as fp32 where the CPU
            has no bf16 units; `self.precision` says what the compiled encoder really uses).
        int8: run the NNCF-quantised encoder (OV_INT8_ENCODER in export_dir) instead of encoder.onnx.
        threads: inference threads (None: OpenVINO's default, all cores).
        mask_threshold, verify: as for `OnnxPredictor`.
    """

    def __init__(self, export_dir: str | os.PathLike, *, precision: str = "fp32", int8: bool = False,
                 threads: int | None = None, mask_threshold: float = 0.0, verify: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise ImportError(f"the OpenVINO runtime needs the openvino package: {INSTALL_HINT}") from exc
        super().__init__(export_dir, mask_threshold=mask_threshold, verify=verify)
        self.int8 = int8
        core = ov.Core()
        files = self.metadata["files"]
        encoder_path = self._int8_encoder_path() if int8 else self.export_dir / files["encoder"]["path"]
        self.encoder = core.compile_model(str(encoder_path), "CPU", _config(precision, threads))
        decoding = _config("fp32" if int8 else precision, threads)
        self.decoder = core.compile_model(str(self.export_dir / files["decoder"]["path"]), "CPU", decoding)
        self.precision = _compiled_precision(self.encoder)
        self.decoder_precision = _compiled_precision(self.decoder)
        self.box_decoder = None
        if self.has_box_decoder:
            self.box_decoder = core.compile_model(str(self.export_dir / files["box_decoder"]["path"]), "CPU",
                                                  decoding)
        self.auto = None
        if "auto_decoder" in files:
            self.auto = core.compile_model(str(self.export_dir / files["auto_decoder"]["path"]), "CPU", decoding)
        self.auto_encoder = None
        if self.has_auto_encoder:  # fp32 or bf16 as the encoder (never the NNCF INT8 one: that is the prompts')
            self.auto_encoder = core.compile_model(str(self.export_dir / files["auto_encoder"]["path"]), "CPU",
                                                   decoding)
        self._make_requests()

    def _make_requests(self) -> None:
        self._encoder_request = self.encoder.create_infer_request()
        self._decoder_request = self.decoder.create_infer_request()
        self._box_request = None if self.box_decoder is None else self.box_decoder.create_infer_request()
        self._auto_request = None if self.auto is None else self.auto.create_infer_request()
        self._auto_encoder_request = None if self.auto_encoder is None else self.auto_encoder.create_infer_request()

    def _int8_encoder_path(self) -> Path:
        path = self.export_dir / OV_INT8_ENCODER
        if not (self.export_dir / OV_INT8_RECORD).is_file() or not path.is_file():
            raise FileNotFoundError(f"{self.export_dir}: no OpenVINO INT8 encoder ({OV_INT8_ENCODER}); make it with "
                                    "uniultra.export.openvino_int8.quantize_encoder (--runtime openvino-int8 does)")
        if not int8_encoder_current(self.export_dir, self.metadata):
            raise ExportFormatError(f"{path}: quantised from another encoder.onnx than this export's; quantise again")
        return path

    def _encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        # `infer` copies its outputs (share_outputs=False), so the next image cannot overwrite them.
        return _by_name(self._encoder_request.infer({"image": x}))

    def _decode(self, wanted: list[str], feeds: dict[str, np.ndarray], box: bool = False) -> list[np.ndarray]:
        outputs = _by_name((self._box_request if box else self._decoder_request).infer(feeds))
        return [outputs[name] for name in wanted]

    def _run_auto(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = _by_name(self._auto_request.infer(feeds))
        return [outputs[name] for name in AUTO_OUTPUTS]

    def _encode_auto(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return _by_name(self._auto_encoder_request.infer({"image": x}))

    def fork(self) -> OpenVinoPredictor:
        twin = super().fork()
        twin._make_requests()  # own infer requests: cheap, and no two predictors share output buffers
        return twin


def _config(precision: str, threads: int | None) -> dict[str, Any]:
    # LATENCY: one stream, all threads on one request (one image at a time is the use here).
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def _compiled_precision(compiled: Any) -> str:
    """What the compiled graph really computes in ("bf16" or "fp32")."""
    hint = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
    return "bf16" if "bf16" in hint or "bfloat16" in hint else "fp32"


def _by_name(result: Any) -> dict[str, np.ndarray]:
    return {port.get_any_name(): np.asarray(value) for port, value in result.items()}


def openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.__version__ if hasattr(ov, "__version__") else ov.get_version()


def int8_encoder_current(export_dir: str | os.PathLike, metadata: dict[str, Any] | None = None) -> bool:
    """Whether export_dir holds an OpenVINO INT8 encoder quantised from its current encoder.onnx."""
    export_dir = Path(export_dir)
    record, path = export_dir / OV_INT8_RECORD, export_dir / OV_INT8_ENCODER
    if not record.is_file() or not path.is_file():
        return False
    metadata = metadata or read_metadata(export_dir, verify=False)
    try:
        source = json.loads(record.read_text(encoding="utf-8")).get("source_sha256")
    except (OSError, ValueError):
        return False
    return source == metadata["files"]["encoder"]["sha256"]


def source_record(export_dir: str | os.PathLike, encoder_onnx: str | os.PathLike) -> dict[str, str]:
    """What OV_INT8_RECORD holds: the sha256 of the encoder.onnx it was quantised from."""
    return {"source_sha256": file_sha256(encoder_onnx), "export_dir": str(export_dir)}
