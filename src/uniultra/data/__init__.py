"""Data contract: reading images and masks, dataset folders, splits and prompts."""

from uniultra.data.image_io import ImageReadError, normalize_intensity, read_image, read_mask, to_rgb_float

__all__ = ["ImageReadError", "normalize_intensity", "read_image", "read_mask", "to_rgb_float"]
