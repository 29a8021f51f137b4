"""Deployment: ONNX export of the image model, and the torch-free ONNX Runtime predictor.

`OnnxPredictor` (numpy + onnxruntime only) lives in uniultra.inference.onnx_predictor (beside the
other predictors); it is importable from here as docs/deployment.md shows. It and `export_onnx`
(needs torch) are imported lazily, so `from uniultra.export import OnnxPredictor` never pulls torch in.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OnnxPredictor", "export_onnx", "ExportResult"]


def __getattr__(name: str) -> Any:
    if name == "OnnxPredictor":
        from uniultra.inference.onnx_predictor import OnnxPredictor

        return OnnxPredictor
    if name in ("export_onnx", "ExportResult"):
        from uniultra.export import onnx_export

        return getattr(onnx_export, name)
    raise AttributeError(f"module 'uniultra.export' has no attribute {name!r}")
