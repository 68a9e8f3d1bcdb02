"""A synthetic trace with fluctuating load (pure; the placement experiment, the paper's Fig. 10).

The paper compares its placement policies on "a 30-minute synthetic trace with fluctuating load
using a Poisson process", deploying a model every 2-3 minutes, so that each policy meets load
spikes and valleys. ``fluctuating_trace`` is that process: arrivals of a Poisson process whose
rate swings as a sine around ``mean_rate`` (thinning of a process at the peak rate), each request's
prompt and output lengths those of a random row of an Azure trace, all from one seed.
"""

from __future__ import annotations

import math
import random

from .traces import TraceRequest, load_trace

FLUCTUATING = "fluctuating"  # the trace name a sweep gives it


def rate_at(t_s: float, mean_rate: float, period_s: float, swing: float) -> float:
    """Requests per second at ``t_s``: ``mean_rate * (1 + swing * sin(2 pi t / period))``."""
    return mean_rate * (1.0 + swing * math.sin(2.0 * math.pi * t_s / period_s))


def fluctuating_trace(
    duration_s: float,
    mean_rate: float,
    *,
    seed: int = 0,
    period_s: float = 600.0,
    swing: float = 0.8,
    lengths_from: str = "code",
) -> list[TraceRequest]:
    """Arrivals over ``[0, duration_s)`` of a Poisson process at ``rate_at``; lengths of random rows of
    the ``lengths_from`` trace (its ``index`` kept, so a record can be traced to its row)."""
    if duration_s <= 0 or mean_rate <= 0:
        raise ValueError(f"duration_s and mean_rate must be positive, not {duration_s} and {mean_rate}")
    if not 0.0 <= swing <= 1.0 or period_s <= 0:
        raise ValueError(f"swing must be in [0, 1] and period_s positive, not {swing} and {period_s}")
    rows = load_trace(lengths_from)
    rng = random.Random(seed)
    peak = mean_rate * (1.0 + swing)
    out: list[TraceRequest] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() * peak <= rate_at(t, mean_rate, period_s, swing):
            row = rows[rng.randrange(len(rows))]
            out.append(
                TraceRequest(
                    arrival_s=t,
                    context_tokens=row.context_tokens,
                    generated_tokens=row.generated_tokens,
                    index=row.index,
                )
            )
