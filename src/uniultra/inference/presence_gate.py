"""The presence gate of the automatic mode: the presence probability below which an image is
answered "nothing here" (an empty mask).

A checkpoint carries its own gate (chosen on the val splits by `uniultra auto calibrate`); a caller
may hold one request to another (`predict_auto(..., presence_gate=...)`, the web API's field of the
same name, `--presence-gate` of predict and evaluate). Torch-free, so that the exported (numpy)
predictors apply the same rule.
"""

from __future__ import annotations

import math

# Words a gate may be given as, besides a probability: the checkpoint's own gate, or none at all.
CALIBRATED_GATE, NO_GATE = "calibrated", "off"
PresenceGate = float | str


def gate_in_force(gate: PresenceGate, calibrated: float | None) -> float | None:
    """The probability `gate` stands for (None: no gate), given the checkpoint's `calibrated` one."""
    if gate == CALIBRATED_GATE:
        return calibrated
    if gate == NO_GATE:
        return None
    if isinstance(gate, str | bool) or not isinstance(gate, int | float) or math.isnan(gate) \
            or not 0.0 <= gate <= 1.0:
        raise ValueError(f"a presence gate is {CALIBRATED_GATE!r}, {NO_GATE!r} or a probability in [0, 1], "
                         f"got {gate!r}")
    return float(gate)


def answers_empty(presence: float, threshold: float | None) -> bool:
    """Whether an image with this presence probability is answered "nothing here"."""
    return threshold is not None and presence < threshold


def set_presence_gate(predictor: object, gate: PresenceGate) -> float | None:
    """Hold every later automatic answer of `predictor` (or of the predictor a wrapper such as
    `ZoomPredictor` holds) to `gate`; returns the gate now in force (None: none)."""
    setter = getattr(predictor, "set_presence_gate", None)  # a wrapper forwards it
    if setter is not None:
        return setter(gate)
    raise ValueError("--presence-gate applies to a model with an automatic head (a checkpoint from `uniultra auto "
                     "train`, or its export); this one answers prompts only")
