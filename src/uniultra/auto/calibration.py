"""Presence-gate calibration: when should the automatic head answer "nothing here"?

The mask decoder rarely outputs an all-background mask by itself, yet many ultrasound images
(BUSI's normal scans) contain no lesion. The presence probability (the presence head's, or the
prompt generator's highest patch probability for a head without one) is a
direct "is it there" score, so after training one threshold on it is chosen on the VALIDATION
split (never the test split): below it the image gets an empty mask. The threshold maximises the
same number that selects the checkpoint: the mean over datasets of the per-image Dice, where an
empty truth answered by an empty mask counts 1 and a missed lesion counts 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageOutcome:
    """One validation image under the ungated head."""

    presence: float  # presence probability (uniultra.models.auto_segmenter.presence)
    dice: float  # Dice of the ungated mask
    truth_empty: bool


@dataclass(frozen=True)
class Calibration:
    threshold: float | None  # None: gating never helped on the validation split
    val_dice_ungated: float
    val_dice_gated: float
    per_dataset: dict[str, dict[str, float]]
    source: str = "val"  # which images the gate was chosen on

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, "val_dice_ungated": self.val_dice_ungated,
                "val_dice_gated": self.val_dice_gated, "per_dataset": self.per_dataset,
                "split": self.source, "rule": "max mean-over-datasets Dice; ties -> the lower threshold"}


def gated_dice(outcome: ImageOutcome, threshold: float | None) -> float:
    if threshold is None or outcome.presence >= threshold:
        return outcome.dice
    return 1.0 if outcome.truth_empty else 0.0


def mean_dice(outcomes: Mapping[str, Sequence[ImageOutcome]], threshold: float | None) -> float:
    """Mean over datasets of the per-image (gated) Dice."""
    return float(np.mean([np.mean([gated_dice(o, threshold) for o in rows]) for rows in outcomes.values()]))


def candidate_thresholds(outcomes: Mapping[str, Sequence[ImageOutcome]]) -> list[float]:
    """Midpoints between consecutive distinct presence values: every distinct gating, no ties at a value."""
    values = np.unique([o.presence for rows in outcomes.values() for o in rows])
    return [float(v) for v in (values[:-1] + values[1:]) / 2]


def choose_threshold(outcomes: Mapping[str, Sequence[ImageOutcome]], source: str = "val") -> Calibration:
    outcomes = {name: rows for name, rows in outcomes.items() if rows}
    if not outcomes:
        raise ValueError("presence calibration needs at least one validation image")
    ungated = mean_dice(outcomes, None)
    best, best_score = None, ungated
    for threshold in candidate_thresholds(outcomes):  # ascending: a tie keeps the lower threshold
        score = mean_dice(outcomes, threshold)
        if score > best_score + 1e-12:
            best, best_score = threshold, score
    per_dataset = {name: {"ungated": float(np.mean([o.dice for o in rows])),
                          "gated": float(np.mean([gated_dice(o, best) for o in rows])),
                          "n": len(rows), "n_empty_truth": sum(o.truth_empty for o in rows),
                          "n_gated": sum(best is not None and o.presence < best for o in rows)}
                   for name, rows in outcomes.items()}
    return Calibration(best, ungated, best_score, per_dataset, source)
