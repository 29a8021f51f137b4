"""Data contract: reading images and masks, dataset folders, splits and prompts."""

from uniultra.data.image_io import ImageReadError, read_image, read_mask, to_rgb_float

__all__ = ["ImageReadError", "read_image", "read_mask", "to_rgb_float"]
