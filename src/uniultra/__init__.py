"""UniUltra: universal ultrasound segmentation on a SAM2 image model."""

__version__ = "0.1.0"
