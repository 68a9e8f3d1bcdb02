"""Summary statistics shared by the services, the load generator and the benches (no numpy, no torch)."""

from __future__ import annotations

import math
from collections.abc import Iterable


def percentile(values: Iterable[float], q: float, *, empty: float = math.nan) -> float:
    """The ``q``-th percentile of ``values``, ``q`` in [0, 100] (50 is the median, 99 the p99).

    Linear interpolation between the two nearest ranks, as numpy's default (``method="linear"``):
    the sorted values ``s`` at position ``(len(s) - 1) * q / 100``. No input gives ``empty``
    (``math.nan`` unless the caller names another value, e.g. 0.0 for a counter-like statistic).
    A ``q`` outside [0, 100] raises ``ValueError``."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q!r}")
    s = sorted(float(v) for v in values)
    if not s:
        return empty
    k = (len(s) - 1) * (q / 100.0)
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    t = k - lo
    a, b = s[lo], s[hi]
    if t == 0.0 or a == b:  # on a rank: exact, infinities included
        return a
    if math.isinf(a) or math.isinf(b):  # inf - inf and inf * 0 would give nan
        return a + (b - a) * t
    # numpy's lerp: from the nearer end, so q=100 gives the maximum exactly
    return b - (b - a) * (1.0 - t) if t >= 0.5 else a + (b - a) * t
