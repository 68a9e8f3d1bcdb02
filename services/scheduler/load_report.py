"""What the scheduler publishes on ``scheduler.load`` every ``--publish-load-s``: each replica's
queue now, and what arrived and completed on it since the previous report. Pure: the caller passes
the time in (the queues' clock, monotonic) and resets the windows after publishing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iserve.messages import ReplicaLoad
from iserve.stats import percentile

from .queues import FcfsQueues


@dataclass
class Window:
    """Counts since the previous report, one per replica."""

    arrived: int = 0
    completed: int = 0
    e2e_ms: list[float] = field(default_factory=list)

    def complete(self, e2e_ms: float, keep: int = 10_000) -> None:
        self.completed += 1
        if len(self.e2e_ms) < keep:
            self.e2e_ms.append(e2e_ms)


def replica_loads(queues: FcfsQueues[Any], windows: Mapping[str, Window], now: float) -> list[ReplicaLoad]:
    out = []
    for dep_id, r in sorted(queues.replicas.items()):
        w = windows.get(dep_id, Window())
        out.append(
            ReplicaLoad(
                deployment_id=dep_id,
                model=r.model,
                queue_depth=len(r.queue),
                in_flight=len(r.running),
                slots=r.slots,
                draining=r.draining,
                oldest_wait_ms=max(now - r.queue[0].arrived, 0.0) * 1000.0 if r.queue else 0.0,
                arrived=w.arrived,
                completed=w.completed,
                e2e_ms_p95=percentile(w.e2e_ms, 95, empty=0.0),
            )
        )
    return out
