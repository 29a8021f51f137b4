"""`set_image` once, then many `predict` calls, on ONNX Runtime with numpy only (no torch).

Same API, prompts and return shapes as `uniultra.predictor.Predictor`; runs an export directory
written by `uniultra export onnx`. Pre-processing (RGB in [0, 1], antialiased bilinear resize,
ImageNet normalisation) and post-processing (bilinear upsampling of the low-res logits to the
original size) are re-implemented in numpy to match the torch predictor; see
`resize_antialiased` and `resize_bilinear` for what exactly is reproduced.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from uniultra.data.image_io import to_rgb_float
from uniultra.export import metadata as md
from uniultra.image_session import ImageSession, require_pixels
from uniultra.prompt_validation import LOGIT_CLAMP, PromptSet

BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3


class OnnxPredictor(ImageSession):
    """Interactive segmentation with an exported model.

    Args:
        export_dir: directory written by `uniultra export onnx` (holds uniultra-onnx.json).
        int8: use the dynamically quantised encoder (encoder.int8.onnx; export with --int8).
        threads: intra-op threads of both sessions (None: onnxruntime's default, all cores).
        mask_threshold: logit above which a pixel is foreground.
        spinning: let idle onnxruntime threads busy-wait (see `session_options`).
        verify: check each file's sha256 against the metadata (detects mixed or partial exports).
        providers: onnxruntime execution providers (default CPU).
    """

    def __init__(
        self,
        export_dir: str | os.PathLike,
        *,
        int8: bool = False,
        threads: int | None = None,
        mask_threshold: float = 0.0,
        spinning: bool = False,
        verify: bool = True,
        providers: Sequence[str] | None = None,
    ) -> None:
        import onnxruntime as ort

        super().__init__()
        self.export_dir = Path(export_dir)
        self.metadata = md.read_metadata(self.export_dir, verify=verify)
        files = self.metadata["files"]
        encoder_key = "encoder_int8" if int8 else "encoder"
        if encoder_key not in files:
            raise FileNotFoundError(f"{self.export_dir}: no INT8 encoder in this export (export it with --int8)")
        self.image_size = int(self.metadata["image_size"])
        self.low_res_size = int(self.metadata["low_res_size"])
        pre = self.metadata["preprocessing"]
        self.pixel_mean = np.asarray(pre["pixel_mean"], dtype=np.float32).reshape(3, 1, 1)
        self.pixel_std = np.asarray(pre["pixel_std"], dtype=np.float32).reshape(3, 1, 1)
        self.mask_threshold = mask_threshold
        self.int8 = int8
        options = session_options(threads, spinning=spinning)
        providers = list(providers or ["CPUExecutionProvider"])
        self.encoder = ort.InferenceSession(str(self.export_dir / files[encoder_key]["path"]), options,
                                            providers=providers)
        self.decoder = ort.InferenceSession(str(self.export_dir / files["decoder"]["path"]), options,
                                            providers=providers)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Any accepted image -> normalised (1, 3, S, S) float32 model input."""
        image = np.asarray(image)
        require_pixels(image)
        rgb = to_rgb_float(image)  # validates the layout and scales by dtype
        size = (self.image_size, self.image_size)
        gray = image.ndim == 2 or image.shape[2] == 1  # three identical channels: resize one
        planes = rgb[None, :, :, 0] if gray else np.ascontiguousarray(rgb.transpose(2, 0, 1))
        resized = resize_antialiased(planes, size)
        out = (resized - self.pixel_mean) / self.pixel_std  # gray broadcasts to three channels
        return out[None].astype(np.float32, copy=False)

    def set_image(self, image: np.ndarray | str | os.PathLike) -> None:
        """Compute the image embedding once. Accepts an array (gray, RGB, RGBA; 8/16-bit, float) or a path."""
        image = self.load_image(image)
        x = self.preprocess(image)
        names = [o.name for o in self.encoder.get_outputs()]
        self._remember(dict(zip(names, self.encoder.run(None, {"image": x}), strict=True)), image)

    def predict(
        self,
        box: np.ndarray | list | None = None,
        points: np.ndarray | list | None = None,
        labels: np.ndarray | list | None = None,
        mask_input: np.ndarray | None = None,
        multimask: bool = False,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for box and/or point prompts on the current image (see `Predictor.predict`).

        box: (4,) or (N, 4) xyxy; points: (P, 2) or (N, P, 2) xy; labels: 1 positive, 0 negative,
        -1 padding; mask_input: (1 or N, 1, S/4, S/4) or (1, S/4, S/4) low-res logits.
        Returns (masks (C, H, W) or (N, C, H, W), scores (C,) or (N, C), low-res logits clamped
        to +-32), C = 3 with `multimask` else 1.
        """
        self._require_image()
        prompts = PromptSet.from_user(box, points, labels, self.orig_hw)
        coords, point_labels = self.prompt_arrays(prompts)
        n = coords.shape[0]
        mask, has_mask = self._mask_arrays(mask_input, n)
        feeds = {
            **self._features,
            "point_coords": coords,
            "point_labels": point_labels,
            "mask_input": mask,
            "has_mask_input": has_mask,
        }
        wanted = ["multimask_masks", "multimask_iou_scores"] if multimask else ["masks", "iou_scores"]
        logits, scores = self.decoder.run(wanted, feeds)
        masks = resize_bilinear(logits, self.orig_hw)
        if not return_logits:
            masks = masks > self.mask_threshold
        result = (masks, scores, np.clip(logits, -LOGIT_CLAMP, LOGIT_CLAMP))
        return result if prompts.batched else tuple(r[0] for r in result)

    def prompt_arrays(self, prompts: PromptSet) -> tuple[np.ndarray, np.ndarray]:
        """Validated prompts -> decoder inputs: (N, P, 2) float32 model-input coords, (N, P) int32 labels.

        Box corners come first (labels 2, 3), then clicks, as the torch predictor merges them.
        """
        parts_xy, parts_lbl = [], []
        if prompts.boxes is not None:
            corners = prompts.boxes.reshape(-1, 2, 2)
            parts_xy.append(self._to_model_coords(corners))
            parts_lbl.append(np.broadcast_to(np.array([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT], np.int32), (len(corners), 2)))
        if prompts.points is not None:
            parts_xy.append(self._to_model_coords(prompts.points))
            parts_lbl.append(prompts.labels.astype(np.int32))
        coords = np.ascontiguousarray(np.concatenate(parts_xy, axis=1), dtype=np.float32)
        return coords, np.ascontiguousarray(np.concatenate(parts_lbl, axis=1), dtype=np.int32)

    def _to_model_coords(self, xy: np.ndarray) -> np.ndarray:
        """Original-image pixels -> model-input pixels, in float32 and in the torch predictor's order."""
        h, w = self.orig_hw
        t = np.asarray(xy, dtype=np.float32)
        return (t / np.array([w, h], dtype=np.float32)) * np.float32(self.image_size)

    def _mask_arrays(self, mask_input: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
        low = self.low_res_size
        if mask_input is None:
            return np.zeros((n, 1, low, low), np.float32), np.zeros(1, np.float32)
        mask = np.asarray(mask_input, dtype=np.float32)
        if mask.ndim == 3:
            mask = mask[None]
        if mask.ndim != 4 or mask.shape[1:] != (1, low, low) or mask.shape[0] not in (1, n):
            raise ValueError(f"mask_input must be (1 or {n}, 1, {low}, {low}) low-res logits, got {mask.shape}")
        return np.ascontiguousarray(np.broadcast_to(mask, (n, 1, low, low))), np.ones(1, np.float32)


def session_options(threads: int | None = None, optimization: str = "all", spinning: bool = False) -> Any:
    """onnxruntime session options used by the predictor and the benchmark.

    Full graph optimisation (constant folding, MatMul+Add / Conv+activation fusions, NCHWc
    convolutions), sequential execution (a single-image graph has little inter-op parallelism;
    the threads are better spent inside the big ops), a fixed intra-op thread count, and no
    busy-waiting between ops: with spinning on, the mini encoder at 1024 px ran 25-35% SLOWER
    on a 2-core machine shared with other work (spinning threads steal the cores the work
    needs). Not measured on an idle machine, where spinning usually helps a little.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


# ---------------------------------------------------------------------------------------------
# Resizing in numpy, matching torch.nn.functional.interpolate


def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and normalised weights (out_size, K) of torch's bilinear antialias filter.

    The triangle filter is widened by the scale factor when shrinking (PIL's and torch's
    `antialias=True`); when enlarging it is plain bilinear with align_corners=False.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size) + 0.5)
    # int() truncation as in the C++ code; the max(.., 0) makes truncation and floor agree.
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    k = int((xmax - xmin).max())
    idx = xmin[:, None] + np.arange(k)[None, :]
    weights = np.maximum(0.0, 1.0 - np.abs((idx - centers[:, None] + 0.5) * invscale))
    weights[idx >= xmax[:, None]] = 0.0
    weights /= weights.sum(axis=1, keepdims=True)
    return np.minimum(idx, in_size - 1), weights.astype(np.float32)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and weights (out_size, 2) of torch's bilinear interpolation, align_corners=False."""
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    # One rounding of scale * (i + 0.5) - 0.5, as torch's compiled kernel (a fused multiply-add).
    src = np.maximum((np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(np.float32)
    return np.stack([i0, i1], axis=1), np.stack([1 - frac, frac], axis=1).astype(np.float32)


def _apply_taps(x: np.ndarray, axis: int, idx: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[..., i, ...] = sum_k weights[i, k] * x[..., idx[i, k], ...] along `axis`."""
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out = None
    for k in range(idx.shape[1]):
        w = weights[:, k].reshape(shape)
        term = np.take(x, idx[:, k], axis=axis)
        term *= w
        out = term if out is None else np.add(out, term, out=out)
    return out


def resize_antialiased(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) float32 -> (..., h, w): `F.interpolate(mode="bilinear", antialias=True)`.

    Separable: rows first, then columns (the columns pass runs on the transposed array so both
    passes gather along a leading, contiguous axis). Agrees with torch to ~1e-6.
    """
    h, w = size
    x = np.asarray(planes, dtype=np.float32)
    rows = _apply_taps(x, x.ndim - 2, *_aa_taps(x.shape[-2], h))
    cols = _apply_taps(np.ascontiguousarray(np.swapaxes(rows, -1, -2)), x.ndim - 2, *_aa_taps(x.shape[-1], w))
    return np.ascontiguousarray(np.swapaxes(cols, -1, -2))


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(..., H, W) float32 -> (..., h, w): `F.interpolate(mode="bilinear", align_corners=False)`."""
    h, w = size
    x = np.asarray(x, dtype=np.float32)
    rows = _apply_taps(x, x.ndim - 2, *_bilinear_taps(x.shape[-2], h))
    return _apply_taps(rows, x.ndim - 1, *_bilinear_taps(x.shape[-1], w))
