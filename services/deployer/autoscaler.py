"""Autoscaling decisions, pure: no I/O, no clock (times are passed in). The deployer's loop
(``autoscale_loop.py``) and a simulator call the same functions.

For one model, every evaluation compares the latency its requests see now with a target: the
intent's SLO, else ``latency_factor`` times the estimated latency of one request alone. The latency
is the larger of the observed p95 end-to-end latency (the scheduler's latest reports) and a
prediction from the queue: a request that arrives now waits for the ``queue_depth`` requests ahead
of it to drain through the replicas' slots, ``service_ms * (1 + queue_depth / slots)``.

* Over the target for ``up_windows`` evaluations in a row: add a replica, if fewer than
  ``max_replicas`` run and GPUs for one are spare (``spare_gpus``: free memory, not already serving
  the model, not busy: a replica that shares a GPU's time adds no capacity).
* Low load for ``down_windows`` evaluations in a row (nothing waits, and without one of the replicas
  the requests in flight and the per-second GPU load would still stay under ``low_load`` of what
  the others can take): remove a replica the autoscaler added, the least busy (newest on a tie);
  never the last one, never below ``min_replicas``.
* Between the two (the hysteresis band) both counts restart, and nothing happens within
  ``min_dwell_s`` of the previous action, so an oscillating load does not make it flap.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from iserve.deployer.placement import GpuState
from iserve.messages import AutoscaleState, ReplicaLoad, ScaleAction


@dataclass(frozen=True)
class Policy:
    min_replicas: int = 1
    max_replicas: int = 4
    up_windows: int = 2  # evaluations in a row over the target before adding
    down_windows: int = 5  # evaluations in a row of low load before removing
    min_dwell_s: float = 30.0  # no action this soon after the previous one
    latency_factor: float = 2.0  # the target without an SLO: this times the estimate of one request alone
    low_load: float = 0.3  # what the remaining replicas would carry, as a share of their capacity
    spare_load: float = 0.5  # a GPU busier than this is not spare for a new replica (``spare_gpus``)

    def __post_init__(self) -> None:
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if self.up_windows < 1 or self.down_windows < 1:
            raise ValueError("up_windows and down_windows must be at least 1")
        if not 0.0 <= self.low_load < 1.0 or self.latency_factor <= 1.0 or self.min_dwell_s < 0:
            raise ValueError("need 0 <= low_load < 1, latency_factor > 1 and min_dwell_s >= 0")
        if not 0.0 < self.spare_load <= 1.0:
            raise ValueError("need 0 < spare_load <= 1")


def spare_gpus(
    gpus: Iterable[GpuState], gpu_type: str, need_bytes: int, taken: Collection[tuple[str, int]], max_load: float
) -> list[GpuState]:
    """The GPUs a new replica may take: of the type, with ``need_bytes`` free, not holding one of the
    model's replicas (``taken``: (agent, index)) and less busy than ``max_load``. A replica on a GPU that
    already serves the model, or is busy, only shares its time: it adds no capacity."""
    return [
        g
        for g in gpus
        if g.gpu_type == gpu_type
        and g.free_bytes >= need_bytes
        and (g.agent_id, g.gpu_index) not in taken
        and g.load < max_load
    ]


@dataclass(frozen=True)
class ReplicaView:
    deployment_id: str
    serving: bool  # ready and not draining
    launching: bool = False
    outstanding: int = 0  # waiting + running
    slots: int = 1
    added: bool = False  # the autoscaler added it (only these are removed)
    created_at: float = 0.0


@dataclass(frozen=True)
class ModelView:
    """What is known about one model at one evaluation."""

    model: str
    replicas: tuple[ReplicaView, ...]
    service_ms: float  # the estimated latency of one request alone (the intent's lengths)
    slo_ms: float = 0.0  # the intent's SLO; 0: none
    queue_depth: int = 0  # waiting, over all replicas
    in_flight: int = 0  # running, over all replicas
    e2e_p95_ms: float = 0.0  # observed recently; 0: nothing completed
    gpu_load: float = 0.0  # mean per-second busy fraction of the serving replicas' GPUs (0..1)
    free_gpus: int = 0  # GPUs a new replica could take now
    gpus_per_replica: int = 1


@dataclass(frozen=True)
class Decision:
    action: ScaleAction
    reason: str
    state: AutoscaleState  # the state to keep (counters updated; on an action, its time and reason)
    deployment_id: str = ""  # the replica to remove


def target_ms(view: ModelView, policy: Policy) -> float:
    """The latency the model's requests should stay under (0: none known)."""
    if view.slo_ms > 0:
        return view.slo_ms
    return policy.latency_factor * view.service_ms if view.service_ms > 0 else 0.0


def predicted_ms(view: ModelView) -> float:
    slots = sum(r.slots for r in view.replicas if r.serving)
    if view.service_ms <= 0 or slots <= 0:
        return 0.0
    return view.service_ms * (1.0 + view.queue_depth / slots)


def _removable(view: ModelView) -> ReplicaView | None:
    cands = [r for r in view.replicas if r.serving and r.added]
    return min(cands, key=lambda r: (r.outstanding, -r.created_at, r.deployment_id)) if cands else None


def decide(view: ModelView, state: AutoscaleState, policy: Policy, now: float) -> Decision:
    """Add, remove (which replica) or hold, with the reason, and the state to keep."""
    serving = [r for r in view.replicas if r.serving]
    n = len(serving)
    st = msgspec.structs.replace(state, replicas=n)

    def hold(reason: str, *, reset: bool = False) -> Decision:
        if reset:
            st.breach_windows = st.idle_windows = 0
        return Decision("hold", reason, st)

    if any(r.launching for r in view.replicas):
        return hold("a replica is still launching", reset=True)
    if n == 0:
        return hold("no replica is serving", reset=True)
    target = target_ms(view, policy)
    observed, predicted = view.e2e_p95_ms, predicted_ms(view)
    latency = max(observed, predicted)
    slots = sum(r.slots for r in serving)
    victim = _removable(view)
    breach = target > 0 and latency > target
    idle = False
    if not breach and victim is not None and n > policy.min_replicas and view.queue_depth == 0:
        left = slots - victim.slots
        use_after = view.in_flight / left if left > 0 else 1.0
        load_after = view.gpu_load * n / (n - 1)
        idle = max(use_after, load_after) <= policy.low_load
    if breach:
        st.breach_windows, st.idle_windows = st.breach_windows + 1, 0
    elif idle:
        st.breach_windows, st.idle_windows = 0, st.idle_windows + 1
    else:
        st.breach_windows = st.idle_windows = 0
    since = now - state.last_action_at
    if state.last_action in ("add", "remove") and since < policy.min_dwell_s:
        wait = policy.min_dwell_s - since
        return hold(f"within the minimum dwell ({wait:.0f} s left after the last {state.last_action})")
    if breach and st.breach_windows >= policy.up_windows:
        why = (
            f"p95 latency {latency:.0f} ms (observed {observed:.0f}, predicted {predicted:.0f} with "
            f"{view.queue_depth} waiting on {slots} slots) over the target {target:.0f} ms "
            f"for {st.breach_windows} evaluations"
        )
        if n >= policy.max_replicas:
            return hold(f"{why}; already at the maximum of {policy.max_replicas} replicas")
        if view.free_gpus < view.gpus_per_replica:
            need = view.gpus_per_replica
            return hold(f"{why}; no free GPU for another replica ({view.free_gpus} free, {need} needed)")
        return _act("add", f"{why}; {view.free_gpus} GPUs free", st, now)
    if idle and st.idle_windows >= policy.down_windows and victim is not None:
        why = (
            f"low load for {st.idle_windows} evaluations ({view.in_flight} running, none waiting, "
            f"GPU load {view.gpu_load:.0%}): one fewer replica carries it"
        )
        return _act("remove", why, st, now, victim.deployment_id)
    if breach:
        return hold(f"over the target {target:.0f} ms ({latency:.0f} ms), {st.breach_windows} of {policy.up_windows}")
    if idle:
        return hold(f"low load, {st.idle_windows} of {policy.down_windows}")
    return hold("within the target")


def _act(action: ScaleAction, why: str, st: AutoscaleState, now: float, deployment_id: str = "") -> Decision:
    st.breach_windows = st.idle_windows = 0
    st.last_action, st.last_action_at, st.last_reason = action, now, why
    return Decision(action, why, st, deployment_id)


def drained(deployment_id: str, reports: Iterable[Iterable[ReplicaLoad]]) -> bool:
    """Whether a draining replica holds no request: at least one scheduler's fresh report lists it
    draining, and none lists it taking requests or holding one (a scheduler that does not list it
    holds none)."""
    seen = False
    for replicas in reports:
        for r in replicas:
            if r.deployment_id != deployment_id:
                continue
            if not r.draining or r.queue_depth or r.in_flight:
                return False
            seen = True
    return seen


@dataclass
class Totals:
    queue_depth: int = 0
    in_flight: int = 0
    e2e_p95_ms: float = 0.0


def totals(reports: Iterable[Iterable[ReplicaLoad]], p95s: Mapping[str, float]) -> dict[str, Totals]:
    """Per model: waiting and running requests summed over the schedulers' latest reports, and the
    largest p95 seen (``p95s``: deployment id -> the largest since the previous evaluation)."""
    out: dict[str, Totals] = {}
    for replicas in reports:
        for r in replicas:
            t = out.setdefault(r.model, Totals())
            t.queue_depth += r.queue_depth
            t.in_flight += r.in_flight
            t.e2e_p95_ms = max(t.e2e_p95_ms, p95s.get(r.deployment_id, 0.0))
    return out
