"""`--presence-gate` of predict and evaluate: one definition, one help text.

Not a command. The option is applied by uniultra.inference.auto_predictor.set_presence_gate once the
model is loaded; registering it imports nothing heavy.
"""

from __future__ import annotations

import argparse

PRESENCE_GATE_HELP = (
    "automatic head: the presence probability below which it answers 'nothing here' (an empty mask). "
    "'calibrated' (default): the checkpoint's gate, chosen on the val splits; 'off': always answer; a number in "
    "[0, 1]: higher empties more normal scans and misses more faint objects (the bundled model's trade-off on "
    "BUSI test: BENCHMARKS.md, 'The presence gate's operating points')"
)


def presence_gate(text: str) -> float | str:
    """argparse type: 'calibrated', 'off' or a probability in [0, 1]."""
    if text in ("calibrated", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'calibrated', 'off' or a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a presence gate is a probability in [0, 1], got {value}")
    return value


def add_presence_gate_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presence-gate", type=presence_gate, default="calibrated", metavar="GATE",
                        help=PRESENCE_GATE_HELP)
