"""SAM's prompt-point labels, torch-free so that the numpy (ONNX) path shares them."""

PADDING, NEGATIVE, POSITIVE = -1, 0, 1
# Box corners enter the prompt encoder as two points with these labels.
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3
BOX_CORNER_LABELS = (BOX_TOP_LEFT, BOX_BOTTOM_RIGHT)
