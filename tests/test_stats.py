"""The one percentile of the project (iserve.stats): q in [0, 100], numpy's linear interpolation, NaN when empty."""

import math

import numpy as np
import pytest

from iserve.stats import percentile


def test_small_inputs_interpolate_linearly():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([10.0, 20.0], 25) == 12.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0  # unsorted input
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile([7.0], 99) == 7.0


def test_scale_is_zero_to_hundred():
    xs = list(range(101))
    assert percentile(xs, 99) == 99.0
    assert percentile(xs, 1) == 1.0  # not the 0-1 scale: q=1 is the first percentile
    with pytest.raises(ValueError):
        percentile(xs, 101)
    with pytest.raises(ValueError):
        percentile(xs, -1)


def test_empty_input_is_nan_unless_told():
    assert math.isnan(percentile([], 50))
    assert percentile([], 99, empty=0.0) == 0.0
    assert percentile(iter(()), 50, empty=-1.0) == -1.0


@pytest.mark.parametrize("n", [1, 2, 3, 7, 20, 101])
@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 99, 99.9, 100])
def test_matches_numpy_default(n, q):
    rng = np.random.default_rng(n)
    xs = list(rng.lognormal(7.0, 1.0, size=n))
    assert percentile(xs, q) == float(np.percentile(np.asarray(xs, dtype=float), q))


def test_infinite_errors_stay_infinite():
    """A measured 0 makes a relative error infinite: the median of the rest must survive it."""
    assert percentile([0.1, 0.2, math.inf], 50) == 0.2
    assert percentile([0.1, 0.2, math.inf], 90) == math.inf
    assert percentile([-math.inf, 1.0], 0) == -math.inf
    assert percentile([1.0, math.inf], 50) == math.inf
