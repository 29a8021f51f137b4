"""Uploaded bytes -> image array, with the server's type and size rules (no web framework here).

The format is taken from the file's first bytes, not from its name: a PNG called `scan.dcm`
is read as PNG. The declared type (content type, else the extension) only decides whether a
file that is none of PNG / JPEG / DICOM is refused as an unsupported type (415) or as
undecodable bytes (400).
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uniultra.data.image_io import ImageReadError, read_image, to_rgb_float
from uniultra.data.spacing import Spacing, dicom_pixel_spacing

SUPPORTED = ("png", "jpeg", "dicom")
SUFFIX = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}
_CONTENT_TYPES = {
    "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/pjpeg": "jpeg",
    "application/dicom": "dicom", "application/dicom+file": "dicom",
}
_EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom", ".dicom": "dicom"}
# Content types that say nothing about the format (then the extension decides).
_GENERIC_TYPES = {"", "application/octet-stream", "binary/octet-stream", "application/x-download"}
# Formats recognised only to be refused by name.
_OTHER_MAGIC = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"),
)


class UploadError(ValueError):
    """An upload the server refuses; `status` is the HTTP status code to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class DecodedUpload:
    image: np.ndarray
    kind: str  # one of SUPPORTED
    spacing: Spacing | None = None  # (row_mm, col_mm) from a DICOM header
    frames: list[np.ndarray] | None = None  # every frame of a cine loop (`image` is frames[0])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def sniff(data: bytes) -> str | None:
    """The supported format the bytes start with, or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def declared_kind(content_type: str | None, filename: str | None) -> tuple[str | None, str | None]:
    """(supported kind, unsupported description) the client claims; both None when it claims nothing."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in _CONTENT_TYPES:
        return _CONTENT_TYPES[ctype], None
    suffix = Path(filename or "").suffix.lower()
    if ctype in _GENERIC_TYPES:
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix], None
        return None, (f"files ending in {suffix!r}" if suffix else None)
    return None, f"content type {ctype!r}"


def decode_upload(
    data: bytes,
    content_type: str | None = None,
    filename: str | None = None,
    *,
    max_bytes: int,
    max_pixels: int,
    frame: int | None = None,
    all_frames: bool = False,
) -> DecodedUpload:
    """Check and decode an uploaded file; raises `UploadError` with the HTTP status to answer.

    With `all_frames` and no `frame`, a multi-frame DICOM gives all its frames (a cine loop; the
    pixel limit then counts every frame) instead of an error asking for a frame."""
    if len(data) > max_bytes:
        raise UploadError(413, f"upload of {len(data)} bytes exceeds the limit of {max_bytes} bytes "
                               f"({max_bytes / 2**20:g} MB)")
    if not data:
        raise UploadError(400, "the uploaded file is empty")
    kind = sniff(data)
    claimed, unsupported = declared_kind(content_type, filename)
    if kind is None:
        other = next((name for magic, name in _OTHER_MAGIC if data.startswith(magic)), None)
        if other is not None or (claimed is None and unsupported is not None):
            what = f"{other} image" if other else unsupported
            raise UploadError(415, f"unsupported file type ({what}): upload a PNG, JPEG or DICOM image")
        if claimed is None:
            raise UploadError(400, "the uploaded bytes are not a PNG, JPEG or DICOM image")
        kind = claimed  # let the decoder say what is wrong with it
    _check_pixel_count(data, kind, max_pixels)
    with tempfile.TemporaryDirectory(prefix="uniultra-upload-") as tmp:
        path = Path(tmp) / f"upload{SUFFIX[kind]}"
        path.write_bytes(data)
        count = _dicom_frame_count(data) if kind == "dicom" and frame is None and all_frames else 1
        try:
            frames = _read_frames(path, count, max_pixels) if count > 1 else None
            image = frames[0] if frames else read_image(path, frame=frame)
        except ImageReadError as exc:
            problem = exc.problem.replace(str(path), repr(filename or "upload"))  # no server paths
            raise UploadError(400, f"cannot decode the upload as {kind.upper()}: {problem}") from exc
        spacing = dicom_pixel_spacing(path)
    if image.ndim < 2 or min(image.shape[:2]) < 1:
        raise UploadError(400, f"the decoded image has no pixels (shape {image.shape})")
    if image.shape[0] * image.shape[1] > max_pixels:  # headers that under-report their size
        raise UploadError(413, _too_many_pixels(image.shape[1], image.shape[0], max_pixels))
    try:
        to_rgb_float(image[:1, :1])  # layout and dtype are accepted by the model's conversion
    except ValueError as exc:
        raise UploadError(400, f"unsupported image layout: {exc}") from exc
    return DecodedUpload(image, kind, spacing, frames)


def upload_stem(filename: str | None) -> str:
    """The file name without folders and extension, kept to safe characters (a download name)."""
    stem = Path((filename or "").replace("\\", "/")).stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return safe[:100] or "image"


def decode_label_map(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """An 8-bit gray PNG label map of the given HxW shape -> uint8 array; raises `UploadError` (422)."""
    from PIL import Image

    if sniff(data) != "png":
        raise UploadError(422, "the label map must be a PNG file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.size[0] * img.size[1] != shape[0] * shape[1]:
                raise UploadError(422, f"label map of {img.size[0]} x {img.size[1]} pixels does not match the "
                                       f"image ({shape[1]} x {shape[0]})")
            labels = np.asarray(img.convert("L") if img.mode not in ("L", "P") else img)
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - any undecodable PNG
        raise UploadError(422, f"cannot decode the label map PNG: {exc}") from exc
    if labels.shape != tuple(shape):
        raise UploadError(422, f"label map of shape {labels.shape} does not match the image {tuple(shape)}")
    return labels.astype(np.uint8)


def _dicom_frame_count(data: bytes) -> int:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        return max(int(getattr(ds, "NumberOfFrames", 1) or 1), 1)
    except Exception:  # noqa: BLE001 - read_image reports an undecodable file with a clear message
        return 1


def _read_frames(path: Path, count: int, max_pixels: int) -> list[np.ndarray]:
    """Every frame of a cine loop; all frames together stay within the pixel limit."""
    frames = [read_image(path, frame=0)]
    total = count * frames[0].shape[0] * frames[0].shape[1]
    if total > max_pixels:
        raise UploadError(413, f"cine loop of {count} frames x {frames[0].shape[1]} x {frames[0].shape[0]} = "
                               f"{total} pixels exceeds the limit of {max_pixels} pixels")
    frames += [read_image(path, frame=i) for i in range(1, count)]
    return frames


def display_png(image: np.ndarray) -> bytes:
    """8-bit PNG of any accepted image (16-bit and DICOM included), for showing it in a browser."""
    from PIL import Image

    rgb = np.rint(to_rgb_float(image) * 255).astype(np.uint8)
    gray = image.ndim == 2 or image.shape[2] == 1
    picture = Image.fromarray(rgb[..., 0] if gray else rgb)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    """Binary HxW mask -> 8-bit gray PNG with values 0 and 255."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def _too_many_pixels(width: int, height: int, max_pixels: int) -> str:
    return f"image of {width} x {height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"


def _check_pixel_count(data: bytes, kind: str, max_pixels: int) -> None:
    """Refuse huge images from their header, before decoding them (decompression bombs)."""
    width = height = None
    if kind in ("png", "jpeg"):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Image.DecompressionBombError as exc:
            raise UploadError(413, f"image exceeds the pixel limit ({exc})") from exc
        except Exception:  # noqa: BLE001 - undecodable: read_image reports it with a clear message
            return
    else:
        import pydicom

        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            width, height = int(ds.Columns), int(ds.Rows)
        except Exception:  # noqa: BLE001 - as above
            return
    if width * height > max_pixels:
        raise UploadError(413, _too_many_pixels(width, height, max_pixels))
