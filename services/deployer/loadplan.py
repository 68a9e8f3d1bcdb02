"""The deployment decision at an expected load (pure; see docs/deployment.md#load): each configuration
that fits the free GPUs gets the replicas its intent needs (:mod:`.replicas`), the configurations are
ordered by the intent's metric at that load, and the first whose replicas all fit is placed, replica
by replica, with the placement policy.

Metrics at a load, for ``n`` replicas with predicted mean latency ``W`` (:mod:`.capacity`):
``min-latency`` and ``cost-budget`` order by ``W``; ``min-cost`` and ``latency-slo`` by ``n`` times the
cost of one request of latency ``W`` (the fleet's cost); ``min-memory`` by ``n`` times the memory;
``min-gpu-hours`` by ``n x tp x pp x W``. A configuration whose count cannot meet the intent (``met``
False) comes after every one that can.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from iserve.fingerprint.estimator.batching import StepModel
from iserve.messages import Configuration, Intent

from .capacity import Load, Replica, batch_limit
from .feasibility import ClusterView
from .placement import GpuState, Placement
from .ranking import Ranked, _cost
from .replicas import UTILIZATION_CAP, ReplicaCount, explain, replicas_needed


@dataclass(frozen=True)
class LoadSpec:
    """What the decision needs to size replicas: the load, every configuration's step model
    (:func:`~iserve.fingerprint.estimator.batching.step_models`), the replica's batch and KV pool in
    tokens (0: no limit) and the intent's percentile."""

    load: Load
    steps: Callable[[Configuration], StepModel]
    max_batch: int
    kv_tokens: int = 0
    percentile: float = 95.0


@dataclass(slots=True)
class Sized:
    """A configuration with its replica count at the load and the metrics it is ordered by."""

    ranked: Ranked
    replica: Replica
    count: ReplicaCount
    latency_ms: float  # predicted mean latency at the load
    cost: float  # the fleet's: n times one request's cost at that latency
    key: tuple

    def why(self, intent: Intent, spec: LoadSpec) -> str:
        return explain(
            self.count, self.replica, spec.load, intent.kind, slo_ms=intent.slo_ms, percentile=spec.percentile
        )


def load_of(intent: Intent) -> Load | None:
    """The expected load an intent states, or None (rate 0: none)."""
    if intent.rate <= 0:
        return None
    return Load(intent.rate, intent.prompt_tokens, intent.output_tokens, intent.output_cv2)


def replica_for(step: StepModel, max_batch: int, kv_tokens: int, load: Load) -> Replica:
    """The capacity model of a replica with this step model, batch and KV pool (tokens, 0: no limit)
    at the load's request size; e.g. of a running deployment (its record's ``max_batch`` and
    ``kv_tokens``, the step model from its profile: ``batching.step_models(map, context)(config)``)."""
    batch = batch_limit(max_batch, kv_tokens, load.prompt_tokens, load.output_tokens)
    return Replica(step, batch, load.prompt_tokens, load.output_tokens)


def replica_of(r: Ranked, spec: LoadSpec) -> Replica:
    """``r``'s replica at the load's request size."""
    return replica_for(spec.steps(r.est.config), spec.max_batch, spec.kv_tokens, spec.load)


def size(r: Ranked, intent: Intent, spec: LoadSpec, free_bytes: int, rep: Replica | None = None) -> Sized:
    """``r``'s replica count and metrics at the load, with at most as many replicas as ``free_bytes``
    (the free memory of every GPU of the type) could hold."""
    load = spec.load
    rep = rep or replica_of(r, spec)
    count = replicas_needed(
        rep,
        load,
        intent.kind,
        slo_ms=intent.slo_ms,
        percentile=spec.percentile,
        max_replicas=free_bytes // max(1, r.est.total_bytes),
    )
    n, w = count.replicas, count.point.mean_ms
    cost = n * _cost(r.est, w, intent.cost_model)
    miss = not count.met
    kind = intent.kind
    if kind in ("min-latency", "cost-budget"):
        key: tuple = (miss, w, cost, r.key)
    elif kind == "min-memory":
        key = (miss, n * r.est.total_bytes, w, r.key)
    elif kind == "min-gpu-hours":
        key = (miss, n * r.est.config.gpus * w, w, r.key)
    else:  # min-cost, latency-slo
        key = (miss, cost, w, r.key)
    return Sized(r, rep, count, w, cost, key)


def _bound(r: Ranked, intent: Intent, n: int = 1) -> tuple:
    """A lower bound of :func:`size`'s key from the unloaded metrics, for at least ``n`` replicas."""
    kind, lat = intent.kind, r.latency_ms
    if kind in ("min-latency", "cost-budget"):
        return (False, lat, n * r.cost, r.key)
    if kind == "min-memory":
        return (False, n * r.est.total_bytes, lat, r.key)
    if kind == "min-gpu-hours":
        return (False, n * r.est.config.gpus * lat, lat, r.key)
    return (False, n * r.cost, lat, r.key)


def load_order(fitting: Sequence[Ranked], intent: Intent, spec: LoadSpec, free_bytes: int) -> Iterator[Sized]:
    """``fitting`` (in the unloaded rank order) sized and yielded in the order of the load metrics.
    Lazy, in two steps: the unloaded metric bounds the loaded one from below (a replica never gets
    faster under load, and ``n >= 1``), the same with the fewest replicas that can hold the load
    (one evaluation of the replica's throughput) more tightly; a configuration is sized fully only
    once no better one can still come."""
    bounded = sorted(fitting, key=lambda r: _bound(r, intent))
    rate = spec.load.rate
    heap: list[tuple[tuple, int, Ranked, Replica, Sized | None]] = []
    for i, r in enumerate(bounded):
        bound = _bound(r, intent)
        while heap and heap[0][0] <= bound:
            yield from _advance(heap, intent, spec, free_bytes)
        rep = replica_of(r, spec)
        n = max(1, math.ceil(rate / (UTILIZATION_CAP * rep.throughput) - 1e-9))  # replicas_needed's least
        heapq.heappush(heap, (_bound(r, intent, n), i, r, rep, None))
    while heap:
        yield from _advance(heap, intent, spec, free_bytes)


def _advance(heap: list, intent: Intent, spec: LoadSpec, free_bytes: int) -> Iterator[Sized]:
    """Pop the best entry: yield it if sized, else size it and push it back under its exact key."""
    key, i, r, rep, sized = heapq.heappop(heap)
    if sized is not None:
        yield sized
        return
    s = size(r, intent, spec, free_bytes, rep)
    heapq.heappush(heap, (s.key, i, r, rep, s))


def replica_bound(free_bytes: int, s: Sized) -> int:
    """At most how many replicas of ``s`` fit ``free_bytes`` of free memory."""
    return free_bytes // max(1, s.ranked.est.total_bytes)


def place_replicas(
    view: ClusterView, gpus: Sequence[GpuState], s: Sized, *, policy: str, theta: float
) -> list[Placement]:
    """Up to ``s.count.replicas`` placements of ``s``'s configuration, one after the other with the
    policy, each on the memory the previous ones left free (fewer when the GPUs run out). A placed
    replica's GPUs count as busy at its predicted utilization, so that a load-aware policy puts the
    next one where it does not share a GPU's time with it (two replicas on one GPU take turns)."""
    est = s.ranked.est
    out: list[Placement] = []
    left = list(gpus)
    where = {(g.agent_id, g.gpu_index): i for i, g in enumerate(left)}
    while len(out) < s.count.replicas:
        placed = view.place(est, policy, theta)
        if placed is None:
            break
        out.append(placed)
        if len(out) == s.count.replicas:
            break
        busy = s.count.point.utilization
        for a in placed.assignments:
            i = where[(a.agent_id, a.gpu_index)]
            g = left[i]
            left[i] = dataclasses.replace(g, free_bytes=g.free_bytes - a.memory_bytes, load=min(1.0, g.load + busy))
        view = ClusterView(left)
    return out
