"""How many replicas of one configuration an intent needs at an expected load (pure; see
docs/deployment.md#replicas). The load is spread evenly over the replicas (the scheduler sends each
request to the replica with the least outstanding work, which is never worse than an even split).

* ``min-cost``, ``min-memory``, ``min-gpu-hours``, ``cost-budget``: the fewest replicas that hold the
  load, each at most :data:`UTILIZATION_CAP` of its throughput (a replica near 1 has an unbounded queue).
* ``min-latency``: from there, more until the predicted mean latency is within :data:`LATENCY_SLACK` of
  the unloaded one (beyond it, another replica buys less than the slack).
* ``latency-slo``: from there, more until the predicted latency at the intent's percentile meets the SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .capacity import Load, Point, Replica

UTILIZATION_CAP = 0.8
LATENCY_SLACK = 1.10
LATENCY_KINDS = ("min-latency", "latency-slo")


@dataclass(frozen=True)
class ReplicaCount:
    """``replicas`` of one configuration, ``point`` what one of them sees at its share of the load, and
    ``met``: whether that count meets the intent (False: even ``max_replicas`` does not)."""

    replicas: int
    point: Point
    met: bool


def replicas_needed(
    replica: Replica,
    load: Load,
    kind: str,
    *,
    slo_ms: float | None = None,
    percentile: float = 95.0,
    max_replicas: int = 64,
) -> ReplicaCount:
    """The fewest replicas (at most ``max_replicas``) with which ``replica`` meets intent ``kind`` at
    ``load`` (``slo_ms`` for ``latency-slo``). Latency falls as replicas are added, so the count is found
    by doubling then bisection: ``O(log max_replicas)`` evaluations of the capacity model."""
    cap = max(1, max_replicas)
    floor = max(1, math.ceil(load.rate / (UTILIZATION_CAP * replica.throughput) - 1e-9))

    def at(n: int) -> Point:
        return replica.at(load.rate / n, load.cv2, percentile)

    if kind == "min-latency":
        target = LATENCY_SLACK * replica.at(0.0, load.cv2, percentile).mean_ms

        def ok(n: int) -> bool:
            return at(n).mean_ms <= target
    elif kind == "latency-slo":
        if slo_ms is None:
            raise ValueError("latency-slo needs slo_ms")
        limit = slo_ms

        def ok(n: int) -> bool:
            return at(n).p_ms <= limit
    else:

        def ok(n: int) -> bool:
            return True

    if floor > cap:
        return ReplicaCount(cap, at(cap), False)
    if ok(floor):
        return ReplicaCount(floor, at(floor), True)
    lo, hi = floor, floor  # ok(lo) is False; find hi with ok(hi), then the least such
    while not ok(hi):
        if hi >= cap:
            return ReplicaCount(cap, at(cap), False)
        lo, hi = hi, min(cap, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return ReplicaCount(hi, at(hi), True)


def explain(
    count: ReplicaCount, replica: Replica, load: Load, kind: str, *, slo_ms: float | None, percentile: float
) -> str:
    """One sentence: how many replicas and why."""
    n, pt = count.replicas, count.point
    size = f"{load.rate:g} req/s of {load.prompt_tokens}+{load.output_tokens} tokens"
    one = f"one replica completes at most {replica.throughput:.2f} req/s (batch {replica.batch})"
    if math.isfinite(pt.mean_ms):
        each = (
            f"with {n} each runs at {100 * pt.utilization:.0f}% and the predicted mean latency is {pt.mean_ms:.0f} ms"
        )
    else:
        each = f"with {n} each gets {100 * pt.utilization:.0f}% of what it can serve and its queue grows without bound"
    head = f"{n} replica{'s' if n != 1 else ''}: at {size}, {one}; {each}"
    if kind == "latency-slo":
        rel = "<=" if count.met else ">"
        tail = f", p{percentile:g} {pt.p_ms:.0f} ms {rel} the {slo_ms:.0f} ms SLO" if math.isfinite(pt.p_ms) else ""
    elif kind == "min-latency":
        tail = (
            f" (within {100 * (LATENCY_SLACK - 1):.0f}% of the unloaded {replica.solo_ms:.0f} ms)" if count.met else ""
        )
    else:
        tail = f" (the fewest that keep each at most {100 * UTILIZATION_CAP:.0f}% busy)" if count.met else ""
    if not count.met:
        tail += f"; {n} is the most the free GPUs could hold, and it does not meet the {kind} intent at this load"
    return head + tail
