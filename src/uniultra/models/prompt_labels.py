"""SAM's prompt-point labels, torch-free so that the numpy (ONNX) path shares them."""

PADDING, NEGATIVE, POSITIVE = -1, 0, 1
# Box corners enter the prompt encoder as two points with these labels.
BOX_TOP_LEFT, BOX_BOTTOM_RIGHT = 2, 3
BOX_CORNER_LABELS = (BOX_TOP_LEFT, BOX_BOTTOM_RIGHT)
# UniUltra's own: corners of a box said to touch the object (a reference mask's box, a detector's),
# for models built with `decoder.exact_box_tokens`. A plain box may be loose, so a model trained
# on loose boxes learns to stay inside it; only a separate token lets it learn both meanings.
EXACT_BOX_TOP_LEFT, EXACT_BOX_BOTTOM_RIGHT = 4, 5
EXACT_BOX_CORNER_LABELS = (EXACT_BOX_TOP_LEFT, EXACT_BOX_BOTTOM_RIGHT)
