"""Automatic (no-prompt) segmentation head and its training command (SPEC 5)."""
