"""Across-seed statistics of a benchmark: mean with a Student-t interval, and paired differences.

Seeded runs of two methods that share a seed saw the same batches and prompts, so their per-seed
difference is the quantity to test; its interval excluding 0 is what "holds" means in BENCHMARKS.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t interval (nan for a single value)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if array.size < 2:
        return float(array.mean()), math.nan
    half = stats.t.ppf(0.5 + level / 2, array.size - 1) * array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean()), float(half)


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean and interval half-width of a[seed] - b[seed] over the seeds both have, and their number."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, 0
    mean, half = mean_ci([a[s] - b[s] for s in seeds], level)
    return mean, half, len(seeds)


def verdict(mean: float, half: float) -> str:
    """'holds' / 'reversed' when the interval excludes 0, else 'inconclusive'."""
    if math.isnan(half):
        return "inconclusive"
    if mean - half > 0:
        return "holds"
    if mean + half < 0:
        return "reversed"
    return "inconclusive"
