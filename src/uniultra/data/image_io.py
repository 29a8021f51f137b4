"""Reading ultrasound images and masks from disk, and turning them into model input.

`read_image` keeps the file's own dtype and values (uint8, uint16, float32, bool); only
`normalize_intensity` (called by `to_rgb_float`) decides how they map to [0, 1], so training,
evaluation, prediction, serving and the ONNX predictor all see the same conversion.

Conventions (documented in docs/data.md):

- Shapes: HxW for single-channel images, HxWx3 (RGB) or HxWx4 (RGBA) otherwise. Palette
  images become RGB/RGBA, gray+alpha becomes gray (alpha carries no anatomy).
- DICOM: one frame per call. A multi-frame file raises `ImageReadError` unless `frame=` is
  given; frames are taken along pydicom's first axis (frames, rows, cols[, samples]), never
  along rows or columns (the axis-order bug of MONAI #8265).
- DICOM samples stored in fewer bits than their container (e.g. BitsStored 12 in uint16) are
  rescaled to the container's full range, so 4095 becomes 65535. MONOCHROME1 (0 = white) is
  inverted to MONOCHROME2.
- Intensity (docs/data.md): 8-bit, bool and float images keep their values (uint8 / 255, float
  as [0, 1]). Integer images wider than 8 bits (16-bit PNG/TIFF, DICOM) are mapped to [0, 1]:
  a grayscale DICOM with a VOI LUT or WindowCenter/WindowWidth by that window (pydicom's
  `apply_modality_lut` + `apply_voi_lut`; `read_image` then returns float32), anything else by
  the bit depth its values use (max 4095 -> / 4095), so 12-bit data in a 16-bit file is not
  shown almost black and gives the model the same input as the same picture in 8 bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
MASK_EXTENSIONS: tuple[str, ...] = (".png",)

# Float images are taken as already in [0, 1]; small excursions come from interpolation
# overshoot and are clipped, but a float image on a 0-255 scale is a caller's mistake.
_FLOAT_TOLERANCE = 0.5


class ImageReadError(ValueError):
    """A file that cannot be read as an image or mask; the message names the file."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def read_image(path: str | Path, frame: int | None = None) -> np.ndarray:
    """Read one image in its native dtype: HxW, HxWx3 or HxWx4.

    `frame` selects a frame of a multi-frame DICOM or TIFF; without it such files are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        supported = ", ".join(IMAGE_EXTENSIONS)
        raise ImageReadError(path, f"unsupported extension {suffix!r} (supported: {supported})")
    if suffix == ".dcm":
        return _read_dicom(path, frame)
    return _read_pillow(path, frame)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a binary mask (values 0/255 or 0/1, or a bool image) as an HxW bool array."""
    path = Path(path)
    mask = read_image(path)
    if mask.ndim == 3:
        mask = _single_channel_mask(path, mask)
    if mask.dtype == bool:
        return mask
    values = _distinct_values(mask)
    if set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}:
        return mask > 0
    shown = ", ".join(str(v) for v in values[:10].tolist()) + (", ..." if values.size > 10 else "")
    raise ImageReadError(path, f"mask is not binary: expected values 0/255 or 0/1, found {values.size} "
                               f"distinct values ({shown})")


def to_rgb_float(image: np.ndarray) -> np.ndarray:
    """Convert any image `read_image` returns to float32 HxWx3 in [0, 1].

    Gray is replicated to three channels, alpha is dropped. Scaling: integers wider than 8 bits
    by `normalize_intensity`; bool as 0/1, 8-bit integers by their full range (uint8 / 255),
    floats are taken as already in [0, 1] (clipped; far outside that range is an error).
    """
    image = np.asarray(image)
    channels = _check_layout(image)
    scaled = _scale_to_unit(normalize_intensity(image))
    if channels == 1:
        gray = scaled if scaled.ndim == 2 else scaled[..., 0]
        return np.repeat(gray[..., None], 3, axis=2)
    return np.ascontiguousarray(scaled[..., :3])


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Integer images wider than 8 bits -> float32 in [0, 1]; any other image is returned as is.

    Unsigned data is divided by the full range of the bit depth its maximum needs (at least 8:
    max 4095 -> / 4095, max 200 -> / 255), signed data with negative values is stretched between
    its minimum and maximum. Not by percentiles: a contrast stretch changes the brightness an
    8-bit-trained model relies on (Dice 0.97 instead of 1.0 between a phantom's 8-bit and 12-bit
    copies). A stray pixel above the data's bit depth darkens the image: use a DICOM window then.

    Idempotent. Call it on the whole image before cropping (as the zoomed predictor and its
    training data do): a signed crop's own range would give it a different contrast.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "ui" or image.dtype.itemsize == 1 or image.size == 0:
        return image
    low, high = _intensity_range(image)
    return np.clip((image.astype(np.float32) - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    low, high = int(image.min()), int(image.max())
    if low < 0:  # signed data has no natural black
        return float(low), float(max(high, low + 1))
    return 0.0, float(2 ** max(8, high.bit_length()) - 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool HxW mask to `size` = (height, width)."""
    from PIL import Image

    height, width = size
    resized = Image.fromarray(np.asarray(mask, dtype=bool)).resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=bool)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float HxWx3 image (from `to_rgb_float`) to `size` = (height, width)."""
    from PIL import Image

    height, width = size
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                   .resize((width, height), Image.Resampling.BILINEAR))
        for c in range(image.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2), 0.0, 1.0)


# --- readers -------------------------------------------------------------------------------

def _read_pillow(path: Path, frame: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            _seek_frame(path, img, frame)
            img.load()  # decoding errors (truncated/corrupt data) surface here, not at open
            return _pillow_to_array(path, img)
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from exc


def _seek_frame(path: Path, img, frame: int | None) -> None:
    n_frames = getattr(img, "n_frames", 1)
    if frame is None:
        if n_frames > 1:
            raise ImageReadError(path, f"file has {n_frames} frames; pass frame=<index> to choose one")
        return
    if not 0 <= frame < n_frames:
        raise ImageReadError(path, f"frame {frame} out of range (file has {n_frames} frames)")
    img.seek(frame)


def _pillow_to_array(path: Path, img) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "LA":
        img = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    array = np.asarray(img)
    if mode == "I":
        array = _narrow_int32(path, array)
    # Big-endian 16-bit (mode I;16B) arrives as >u2; hand out native byte order.
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))


def _narrow_int32(path: Path, array: np.ndarray) -> np.ndarray:
    # Pillow uses 32-bit "I" for some 16-bit files; keep uint16 when the values allow it.
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise ImageReadError(path, "32-bit integer image with values outside 0-65535 is not supported")
    return array.astype(np.uint16)


def _read_dicom(path: Path, frame: int | None) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise ImageReadError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no pixel data")
    n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    array = _dicom_frame(path, ds, n_frames, frame)
    array = _apply_window(path, ds, array) if _has_voi_window(ds, array) else _rescale_bits_stored(array, ds)
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        array = _invert(array)
    return np.ascontiguousarray(array)


def _has_voi_window(ds, array: np.ndarray) -> bool:
    # 8-bit data keeps its values (the contract of every existing model); the window is for wider
    # grayscale data, where the stored range says nothing about what to show.
    if array.ndim != 2 or array.dtype.itemsize == 1:
        return False
    if str(getattr(ds, "PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2"):
        return False
    return ("WindowCenter" in ds and "WindowWidth" in ds) or bool(ds.get("VOILUTSequence"))


def _apply_window(path: Path, ds, array: np.ndarray) -> np.ndarray:
    """Stored values -> float32 in [0, 1] through the modality LUT and the first VOI LUT / window."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        windowed = apply_voi_lut(apply_modality_lut(array, ds), ds).astype(np.float64)
        low, high = _voi_output_range(ds)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise ImageReadError(path, f"invalid DICOM window / VOI LUT ({type(exc).__name__}: {exc})") from exc
    return np.clip((windowed - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _voi_output_range(ds) -> tuple[float, float]:
    """The range pydicom's VOI output spans (it depends on BitsStored, rescale and LUT descriptors)."""
    from pydicom.pixels import apply_voi_lut

    descriptor = ds.VOILUTSequence[0].get("LUTDescriptor") if ds.get("VOILUTSequence") else None
    if descriptor is not None:
        return 0.0, float(2 ** int(descriptor[2]) - 1)
    # A window maps everything far below / above it onto its output's ends: ask pydicom for them.
    with np.errstate(over="ignore"):  # a SIGMOID window's exp() overflows to its exact end
        ends = apply_voi_lut(np.array([-1e12, 1e12]), ds)
    if not ends[1] > ends[0]:
        raise ValueError(f"window output range [{ends[0]}, {ends[1]}] is empty")
    return float(ends[0]), float(ends[1])


def _dicom_frame(path: Path, ds, n_frames: int, frame: int | None) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if frame is None and n_frames > 1:
        raise ImageReadError(path, f"multi-frame DICOM ({n_frames} frames); pass frame=<index> to choose one")
    index = 0 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageReadError(path, f"frame {index} out of range (file has {n_frames} frames)")
    try:
        # index= decodes a single frame, shaped (rows, cols[, samples]); YBR is converted to RGB.
        array = pixel_array(ds, index=index if n_frames > 1 else None)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable data
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from exc
    if array.ndim not in (2, 3):
        raise ImageReadError(path, f"unexpected DICOM pixel array shape {array.shape}")
    return array


def _rescale_bits_stored(array: np.ndarray, ds) -> np.ndarray:
    bits_stored = int(getattr(ds, "BitsStored", 0) or 0)
    if array.dtype.kind != "u" or not 0 < bits_stored < array.dtype.itemsize * 8:
        return array
    stored_max = (1 << bits_stored) - 1
    full_max = np.iinfo(array.dtype).max
    # Integer arithmetic with rounding so stored_max maps exactly onto full_max.
    wide = np.minimum(array.astype(np.uint64), stored_max)
    return ((wide * full_max + stored_max // 2) // stored_max).astype(array.dtype)


def _invert(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":  # a windowed image, in [0, 1]
        return 1.0 - array
    if array.dtype.kind == "u":
        return np.iinfo(array.dtype).max - array
    return array.max() - array


# --- conversion helpers --------------------------------------------------------------------

def _distinct_values(mask: np.ndarray) -> np.ndarray:
    if mask.dtype == np.uint8:
        # A 256-bin histogram is several times faster than np.unique's sort/hash on big masks.
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    return np.unique(mask)


def _single_channel_mask(path: Path, mask: np.ndarray) -> np.ndarray:
    colour = mask[..., :3]
    first = colour[..., 0]
    if not (np.array_equal(first, colour[..., 1]) and np.array_equal(first, colour[..., 2])):
        raise ImageReadError(path, f"mask has {mask.shape[2]} differing channels; save it as 1-channel PNG")
    return colour[..., 0]


def _check_layout(image: np.ndarray) -> int:
    if image.ndim == 2:
        return 1
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        return 1 if image.shape[2] == 1 else 3
    raise ValueError(
        f"expected an image shaped HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}"
        + (" (channels-first? transpose to HxWxC)" if image.ndim == 3 and image.shape[0] in (1, 3, 4) else "")
    )


def _scale_to_unit(image: np.ndarray) -> np.ndarray:
    kind = image.dtype.kind
    if kind == "b":
        return image.astype(np.float32)
    if kind in "ui":
        info = np.iinfo(image.dtype)
        return ((image.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
    if kind == "f":
        return _clip_float(image)
    raise ValueError(f"unsupported image dtype {image.dtype}; expected bool, integer or float")


def _clip_float(image: np.ndarray) -> np.ndarray:
    if image.size:
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float image values span [{low:g}, {high:g}]; float images must be in [0, 1] "
                "(divide by 255 for 8-bit data)"
            )
    return np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
