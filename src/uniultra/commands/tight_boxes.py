"""`--tight-boxes` of predict, demo and evaluate: one definition, one help text.

Not a command. The option is applied by uniultra.inference.zoom.answer_tight_boxes when the model is
loaded; registering it imports nothing heavy.
"""

from __future__ import annotations

import argparse

TIGHT_BOXES_HELP = (
    "the boxes touch the object (drawn from a reference mask or by a detector, as with --jitter 0): a zoomed "
    "model with exact-box tokens (decoder.exact_box_tokens) is given them; one without, trained on boxes "
    "loosened by 0-30 px, answers each box pushed outward by a few px first "
    "(uniultra.inference.zoom.TIGHT_BOX_PADDING); either way the answer is cut to the box as drawn, since nothing "
    "of the object lies outside it. Leave it off for hand-drawn boxes: on loose boxes it costs Dice"
)


def add_tight_boxes_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tight-boxes", action="store_true", help=TIGHT_BOXES_HELP)
