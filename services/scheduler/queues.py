"""FCFS queues, one per deployment (paper section 6, "Scheduling"). Pure: no I/O, no clock; the
caller passes times in. The scheduler service and the trace simulator both use this.

* A request joins the model's replica with the least outstanding work (queued + running), ties
  broken by deployment id, and never moves after that.
* Each replica runs up to ``slots`` requests at once (its deployment's ``max_batch``; the worker
  batches them), started in arrival order as slots free up. ``slots=1`` is the paper's one request at
  a time.
* A request still queued past its deadline is dropped with a timeout; a cancelled one is removed.
* A draining replica takes no new request; what it holds runs to the end (then it can be removed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

P = TypeVar("P")


@dataclass
class Queued(Generic[P]):
    request_id: str
    model: str
    arrived: float
    deadline: float
    payload: P


@dataclass
class Replica(Generic[P]):
    deployment_id: str
    model: str
    queue: deque[Queued[P]] = field(default_factory=deque)
    running: dict[str, Queued[P]] = field(default_factory=dict)  # request id -> item, in start order
    slots: int = 1  # requests that may run at once
    draining: bool = False  # takes no new request

    @property
    def outstanding(self) -> int:
        return len(self.queue) + len(self.running)

    @property
    def free_slots(self) -> int:
        return max(0, self.slots - len(self.running))


class FcfsQueues(Generic[P]):
    def __init__(self) -> None:
        self.replicas: dict[str, Replica[P]] = {}
        self._where: dict[str, str] = {}  # request id -> deployment id

    # replicas come and go as deployments become ready or stop
    def add_replica(self, deployment_id: str, model: str, slots: int = 1, *, draining: bool = False) -> None:
        """Add a replica running up to ``slots`` requests at once (a known one takes the new ``slots``;
        a smaller value lets its running requests finish and starts no more until they have). A
        ``draining`` one takes no new request and keeps running what it holds."""
        if slots < 1:
            raise ValueError(f"a replica needs at least one slot, not {slots}")
        r = self.replicas.setdefault(deployment_id, Replica(deployment_id, model))
        r.slots = slots
        r.draining = draining

    def remove_replica(self, deployment_id: str) -> list[Queued[P]]:
        """Forget a replica; returns the requests it still held, queued ones first (oldest first),
        then every running one (in start order), for the caller to fail or re-queue."""
        r = self.replicas.pop(deployment_id, None)
        if r is None:
            return []
        orphans = list(r.queue) + list(r.running.values())
        for q in orphans:
            self._where.pop(q.request_id, None)
        return orphans

    def replicas_of(self, model: str) -> list[Replica[P]]:
        return [r for r in self.replicas.values() if r.model == model]

    def choose(self, model: str, deployment_id: str = "") -> Replica[P] | None:
        if deployment_id:
            r = self.replicas.get(deployment_id)
            return r if r is not None and r.model == model and not r.draining else None
        cands = [r for r in self.replicas_of(model) if not r.draining]
        if not cands:
            return None
        return min(cands, key=lambda r: (r.outstanding, r.deployment_id))

    def full(self, model: str, deployment_id: str, max_queued: int) -> bool:
        """Whether a request for ``model`` would wait behind ``max_queued`` others already (0: never):
        the replica it would join is the least busy, so then every replica is that full."""
        r = self.choose(model, deployment_id)
        return max_queued > 0 and r is not None and len(r.queue) >= max_queued

    def enqueue(self, item: Queued[P], deployment_id: str = "") -> Replica[P] | None:
        """Put ``item`` at the back of the chosen replica's queue; None if the model has none."""
        r = self.choose(item.model, deployment_id)
        if r is None:
            return None
        r.queue.append(item)
        self._where[item.request_id] = r.deployment_id
        return r

    def start_next(self, deployment_id: str) -> Queued[P] | None:
        """The replica has a free slot: take the oldest queued request and mark it running. None
        when every slot is taken or nothing waits; call again while it returns a request."""
        r = self.replicas.get(deployment_id)
        if r is None or len(r.running) >= r.slots or not r.queue:
            return None
        item = r.queue.popleft()
        r.running[item.request_id] = item
        return item

    def finish(self, deployment_id: str, request_id: str) -> None:
        """A running request ended (completed, failed or cancelled): its slot is free."""
        r = self.replicas.get(deployment_id)
        if r is not None:
            r.running.pop(request_id, None)
        self._where.pop(request_id, None)

    def cancel(self, request_id: str) -> tuple[str, Queued[P] | None, bool]:
        """Remove a request. Returns (deployment id, the item, whether it was running)."""
        dep = self._where.get(request_id)
        if dep is None:
            return "", None, False
        r = self.replicas.get(dep)
        if r is None:
            return dep, None, False
        running = r.running.get(request_id)
        if running is not None:
            # stays running until the worker ends it (``finish``)
            return dep, running, True
        for q in r.queue:
            if q.request_id == request_id:
                r.queue.remove(q)
                self._where.pop(request_id, None)
                return dep, q, False
        return dep, None, False

    def expire(self, now: float) -> list[Queued[P]]:
        """Drop queued (not running) requests whose deadline passed."""
        return [q for _, q in self.expire_by_replica(now)]

    def expire_by_replica(self, now: float) -> list[tuple[str, Queued[P]]]:
        """:meth:`expire`, with the deployment id each dropped request was queued on."""
        out: list[tuple[str, Queued[P]]] = []
        for r in self.replicas.values():
            keep: deque[Queued[P]] = deque()
            for q in r.queue:
                if q.deadline <= now:
                    out.append((r.deployment_id, q))
                    self._where.pop(q.request_id, None)
                else:
                    keep.append(q)
            r.queue = keep
        return out

    def depth(self, deployment_id: str) -> int:
        r = self.replicas.get(deployment_id)
        return len(r.queue) if r else 0
