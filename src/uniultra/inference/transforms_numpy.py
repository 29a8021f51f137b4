"""The numpy twin of uniultra.inference.transforms, for the ONNX path (no torch).

The same steps (RGB in [0, 1], antialiased bilinear resize to the model input; bilinear
upsampling of the logits), re-implemented to match torch.nn.functional.interpolate; a test
checks every function against its torch counterpart.
"""

from __future__ import annotations

import numpy as np

from uniultra.data.image_io import to_rgb_float


def image_to_model(image: np.ndarray, size: int) -> np.ndarray:
    """Any image -> (C, size, size) float32 in [0, 1]; C = 1 for gray (three identical channels
    are resized once), else 3."""
    image = np.asarray(image)
    rgb = to_rgb_float(image)  # validates the layout and scales by dtype
    gray = image.ndim == 2 or image.shape[2] == 1
    planes = rgb[None, :, :, 0] if gray else np.ascontiguousarray(rgb.transpose(2, 0, 1))
    return resize_antialiased(planes, (size, size))


def upsample_logits(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(..., h, w) decoder logits -> (..., H, W) float32 at the original image size."""
    return resize_bilinear(logits, hw)




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
