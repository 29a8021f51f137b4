"""Across-seed statistics used by the seeded benchmarks (uniultra.evaluation.seeds)."""

import math

import numpy as np
import pytest
from scipy import stats

from uniultra.evaluation.seeds import mean_ci, paired_difference, verdict


def test_mean_ci_matches_the_student_t_interval():
    values = [84.1, 85.9, 86.7]
    mean, half = mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert half == pytest.approx((high - low) / 2)


def test_mean_ci_of_one_value_has_no_interval_and_of_none_fails():
    mean, half = mean_ci([3.0])
    assert mean == 3.0 and math.isnan(half)
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_paired_difference_uses_only_shared_seeds():
    a = {0: 10.0, 1: 12.0, 2: 11.0, 5: 99.0}
    b = {0: 9.0, 1: 10.0, 2: 10.0, 7: -99.0}
    mean, half, n = paired_difference(a, b)
    assert n == 3 and mean == pytest.approx(4.0 / 3)
    assert half == pytest.approx(mean_ci([1.0, 2.0, 1.0])[1])
    assert paired_difference({0: 1.0}, {1: 1.0})[2] == 0


@pytest.mark.parametrize(("mean", "half", "expected"), [
    (1.5, 0.8, "holds"), (-1.5, 0.8, "reversed"), (0.5, 0.8, "inconclusive"), (2.0, math.nan, "inconclusive")])
def test_verdict_needs_an_interval_that_excludes_zero(mean, half, expected):
    assert verdict(mean, half) == expected
