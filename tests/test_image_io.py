"""image_io: every supported layout read in its native dtype and converted the same way."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from uniultra.data.image_io import (
    ImageReadError,
    normalize_intensity,
    read_image,
    read_mask,
    resize_image,
    resize_mask,
    to_rgb_float,
)


def write_dicom(path, frames: np.ndarray, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                **elements):
    """Minimal uncompressed DICOM; `frames` is HxW, HxWx3 or FxHxW; `elements` are set on the dataset
    (e.g. WindowCenter=..., PixelSpacing=[...])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    rgb = photometric == "RGB"
    if frames.ndim == 3 and not rgb:
        ds.NumberOfFrames = frames.shape[0]
    ds.Rows, ds.Columns = frames.shape[-3:-1] if rgb else frames.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def gray8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)


def test_gray8_png_round_trip_and_float(tmp_path, gray8):
    Image.fromarray(gray8).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.dtype == np.uint8 and np.array_equal(image, gray8)
    rgb = to_rgb_float(image)
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.float32
    assert np.allclose(rgb[..., 1], gray8 / 255.0) and np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_gray16_keeps_uint16_and_divides_by_its_bit_depth(tmp_path, suffix):
    values = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)  # max 59950: 16 bits
    Image.fromarray(values).save(tmp_path / f"a{suffix}")
    image = read_image(tmp_path / f"a{suffix}")
    assert image.dtype == np.uint16 and np.array_equal(image, values)
    assert np.allclose(to_rgb_float(image)[..., 0], values / 65535.0)


def test_12_bit_data_in_16_bits_maps_like_its_8_bit_original(tmp_path, gray8):
    gray8 = gray8.copy()
    gray8[0, 0] = 255
    for wide in (gray8.astype(np.uint16) * 16, np.rint(gray8 * (4095 / 255)).astype(np.uint16)):
        Image.fromarray(wide).save(tmp_path / "w.png")
        image = read_image(tmp_path / "w.png")
        assert image.dtype == np.uint16
        assert np.allclose(to_rgb_float(image), to_rgb_float(gray8), atol=16 / 4095)


def test_normalize_intensity_rules():
    gray8 = np.array([[0, 200]], np.uint8)
    assert normalize_intensity(gray8) is gray8  # 8-bit data keeps its values (existing models unchanged)
    floats = np.array([[0.2, 0.4]], np.float32)
    assert normalize_intensity(floats) is floats
    ten_bit = np.array([[0, 1023, 512]], np.uint16)
    assert np.allclose(normalize_intensity(ten_bit), [[0, 1, 512 / 1023]])
    assert np.allclose(normalize_intensity(np.array([[0, 200]], np.uint16)), [[0, 200 / 255]])  # at least 8 bits
    signed = np.array([[-1000, 0, 1000]], np.int16)
    assert np.allclose(normalize_intensity(signed), [[0, 0.5, 1]])
    once = normalize_intensity(ten_bit)
    assert np.array_equal(normalize_intensity(once), once)  # idempotent


def test_rgb_and_rgba(tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (20, 25, 4), dtype=np.uint8)
    Image.fromarray(rgba[..., :3]).save(tmp_path / "rgb.bmp")
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgb.bmp"), rgba[..., :3])
    image = read_image(tmp_path / "rgba.png")
    assert image.shape == (20, 25, 4)
    assert np.allclose(to_rgb_float(image), rgba[..., :3] / 255.0)  # alpha dropped


def test_jpeg_reads_as_uint8(tmp_path, gray8):
    Image.fromarray(gray8).save(tmp_path / "a.jpg", quality=95)
    image = read_image(tmp_path / "a.jpg")
    assert image.shape == gray8.shape and image.dtype == np.uint8


def test_dicom_single_frame_and_bits_stored(tmp_path):
    values = (np.arange(30 * 40).reshape(30, 40) % 4096).astype(np.uint16)
    values[0, 1] = 4095
    image = read_image(write_dicom(tmp_path / "a.dcm", values, bits_stored=12))
    assert image.shape == (30, 40) and image.dtype == np.uint16
    # 12 stored bits are stretched to the uint16 range: 4095 -> 65535, 0 -> 0, 1000 -> 16004.
    assert image[0, 1] == 65535 and image[0, 0] == 0 and image[25, 0] == round(1000 * 65535 / 4095)
    assert np.allclose(to_rgb_float(image)[..., 0], values / 4095.0, atol=1e-4)


def test_dicom_window_centre_width_is_applied(tmp_path):
    values = np.array([[0, 1000, 1500, 2000, 4095]], dtype=np.uint16)
    path = write_dicom(tmp_path / "w.dcm", values, bits_stored=12, WindowCenter=1500, WindowWidth=1001)
    image = read_image(path)
    # DICOM LINEAR window (PS3.3 C.11.2.1.2): 999.5 and below -> black, above 1999.5 -> white.
    assert image.dtype == np.float32
    assert np.allclose(image, [[0, 0.0005, 0.5, 1, 1]], atol=1e-3)
    inverted = read_image(write_dicom(tmp_path / "m1.dcm", values, bits_stored=12, photometric="MONOCHROME1",
                                      WindowCenter=1500, WindowWidth=1001))
    assert np.allclose(inverted, 1 - image)


def test_dicom_window_with_rescale_and_8_bit_untouched(tmp_path):
    values = np.array([[0, 100, 200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", values, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100,
                       WindowCenter=100, WindowWidth=201)  # in rescaled units: the values are -100, 100, 300
    assert np.allclose(read_image(path), [[0, 0.5, 1]], atol=0.01)
    gray8 = np.array([[0, 100, 255]], dtype=np.uint8)
    path8 = write_dicom(tmp_path / "8.dcm", gray8, WindowCenter=50, WindowWidth=20)
    assert np.array_equal(read_image(path8), gray8)


def test_dicom_rgb(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    assert np.array_equal(read_image(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")), rgb)


def test_dicom_multi_frame_refused_unless_frame_given(tmp_path):
    frames = np.stack([np.full((10, 14), 10 * k, np.uint8) for k in range(5)])
    frames[3, 2, 7] = 255  # a marker that only the right (frame, row, col) order finds
    path = write_dicom(tmp_path / "cine.dcm", frames)
    with pytest.raises(ImageReadError, match=r"cine\.dcm.*5 frames"):
        read_image(path)
    frame = read_image(path, frame=3)
    assert frame.shape == (10, 14) and frame[0, 0] == 30 and frame[2, 7] == 255
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=5)


def test_dicom_monochrome1_is_inverted(tmp_path):
    values = np.array([[0, 255]], dtype=np.uint8)
    path = write_dicom(tmp_path / "m1.dcm", values, photometric="MONOCHROME1")
    assert read_image(path).tolist() == [[255, 0]]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\nnot really a png", b"hello"])
def test_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=r"broken\.png: corrupt"):
        read_image(path)


def test_truncated_png(tmp_path, gray8):
    Image.fromarray(gray8).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:120])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")


def test_not_dicom_and_unsupported_extension(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(ImageReadError, match=r"x\.dcm: not a readable DICOM"):
        read_image(tmp_path / "x.dcm")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match=r"x\.gif: unsupported extension '\.gif'"):
        read_image(tmp_path / "x.gif")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


@pytest.mark.parametrize("high", [1, 255])
def test_read_mask_accepts_0_1_and_0_255(tmp_path, high):
    values = np.array([[0, high], [high, 0]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[False, True], [True, False]]


def test_read_mask_rejects_other_values_and_lists_them(tmp_path):
    Image.fromarray(np.array([[0, 128], [255, 7]], dtype=np.uint8)).save(tmp_path / "soft.png")
    with pytest.raises(ImageReadError, match=r"soft\.png: mask is not binary.*\(0, 7, 128, 255\)"):
        read_mask(tmp_path / "soft.png")


def test_read_mask_rgb_with_equal_channels(tmp_path):
    mask = np.zeros((6, 6, 3), np.uint8)
    mask[2:4, 2:4] = 255
    Image.fromarray(mask).save(tmp_path / "rgb_mask.png")
    assert read_mask(tmp_path / "rgb_mask.png").sum() == 4


def test_to_rgb_float_bool_float_and_bad_shapes():
    assert to_rgb_float(np.array([[True, False]])).tolist() == [[[1, 1, 1], [0, 0, 0]]]
    assert np.allclose(to_rgb_float(np.full((2, 2, 3), 0.25, np.float32)), 0.25)
    assert to_rgb_float(np.full((2, 2), 1.0001)).max() == 1.0  # interpolation overshoot is clipped
    with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
        to_rgb_float(np.full((2, 2), 200.0))
    with pytest.raises(ValueError, match="channels-first"):
        to_rgb_float(np.zeros((3, 20, 20), np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        to_rgb_float(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="HxW"):
        to_rgb_float(np.zeros(5, np.uint8))


def test_resize_helpers():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    resized = resize_mask(mask, (8, 6))
    assert resized.shape == (8, 6) and resized.dtype == bool and set(np.unique(resized)) <= {False, True}
    image = resize_image(np.full((4, 4, 3), 0.5, np.float32), (7, 9))
    assert image.shape == (7, 9, 3) and np.allclose(image, 0.5)
