"""Work run in a fresh process by `measure_peak_rss`: load a model, segment one image, exit.

This module imports numpy only, so the ONNX Runtime and OpenVINO workers' peak memory is that of a
torch-free deployment; torch is imported inside the PyTorch worker (and counted there).
"""

from __future__ import annotations

import numpy as np


def torch_predict_once(preset_name: str, image_size: int, threads: int, image: np.ndarray, box: list[float],
                       bf16: bool = False) -> None:
    import torch

    from uniultra.inference.predictor import Predictor
    from uniultra.models.image_model import SAM2ImageModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    predictor = Predictor(SAM2ImageModel.from_preset(preset_name, image_size), cpu_bf16=bf16)
    predictor.set_image(image)
    predictor.predict(box=box)


def onnx_predict_once(export_dir: str, int8: bool, threads: int, image: np.ndarray, box: list[float]) -> None:
    from uniultra.inference.onnx_predictor import OnnxPredictor

    predictor = OnnxPredictor(export_dir, int8=int8, threads=threads, verify=False)
    predictor.set_image(image)
    predictor.predict(box=box)


def openvino_predict_once(export_dir: str, precision: str, int8: bool, threads: int, image: np.ndarray,
                          box: list[float]) -> None:
    from uniultra.inference.openvino_predictor import OpenVinoPredictor

    predictor = OpenVinoPredictor(export_dir, precision=precision, int8=int8, threads=threads, verify=False)
    predictor.set_image(image)
    predictor.predict(box=box)
