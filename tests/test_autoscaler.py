"""The autoscaler's pure decisions (``services/deployer/autoscaler.py``): examples, then properties
over random load sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iserve.deployer.autoscaler import ModelView, Policy, ReplicaView, decide, drained, totals
from iserve.messages import AutoscaleState, ReplicaLoad

POLICY = Policy(min_replicas=1, max_replicas=3, up_windows=2, down_windows=3, min_dwell_s=10.0, low_load=0.3)


def view(
    queue: int = 0,
    running: int = 0,
    *,
    n: int = 1,
    added: int = 0,
    p95: float = 0.0,
    load: float = 0.0,
    free: int = 4,
    slo: float = 0.0,
    launching: bool = False,
) -> ModelView:
    reps = [
        ReplicaView(f"d{i}", serving=True, slots=2, added=i >= n - added, created_at=float(i), outstanding=0)
        for i in range(n)
    ]
    if launching:
        reps.append(ReplicaView("new", serving=False, launching=True, slots=2, added=True))
    return ModelView(
        model="m",
        replicas=tuple(reps),
        service_ms=100.0,
        slo_ms=slo,
        queue_depth=queue,
        in_flight=running,
        e2e_p95_ms=p95,
        gpu_load=load,
        free_gpus=free,
    )


def run(views: list[ModelView], policy: Policy = POLICY, dt: float = 1.0, state: AutoscaleState | None = None):
    s = state or AutoscaleState(model="m")
    out = []
    for i, v in enumerate(views):
        d = decide(v, s, policy, 1000.0 + i * dt)
        s = d.state
        out.append(d)
    return out


def test_a_sustained_queue_adds_a_replica_after_the_up_windows_only():
    ds = run([view(queue=6, running=2)] * 3)  # predicted 100 * (1 + 6/2) = 400 ms > 2 x 100 ms
    assert [d.action for d in ds] == ["hold", "add", "hold"]
    assert "predicted 400" in ds[1].reason and "over the target 200 ms" in ds[1].reason
    assert ds[1].state.last_action == "add" and ds[1].state.last_action_at == 1001.0
    assert "minimum dwell" in ds[2].reason


def test_an_slo_is_the_target_and_observed_latency_counts():
    assert [d.action for d in run([view(p95=150.0, slo=120.0)] * 2)] == ["hold", "add"]
    assert [d.action for d in run([view(p95=150.0)] * 4)] == ["hold"] * 4  # under 2 x 100 ms without an SLO


def test_no_add_without_free_gpus_or_at_the_maximum_or_while_one_launches():
    d = run([view(queue=9, free=0)] * 2)[-1]
    assert d.action == "hold" and "no free GPU" in d.reason
    d = run([view(queue=9, n=3, added=2)] * 2)[-1]
    assert d.action == "hold" and "maximum of 3" in d.reason
    d = run([view(queue=9, launching=True)] * 3)[-1]
    assert d.action == "hold" and "launching" in d.reason


def test_low_load_removes_the_added_replica_after_the_down_windows():
    ds = run([view(n=2, added=1)] * 3)
    assert [d.action for d in ds] == ["hold", "hold", "remove"]
    assert ds[2].deployment_id == "d1" and "low load for 3 evaluations" in ds[2].reason
    # a replica the user deployed is never removed; the GPU load of the others counts
    assert {d.action for d in run([view(n=2, added=0)] * 6)} == {"hold"}
    assert {d.action for d in run([view(n=2, added=1, load=0.2)] * 6)} == {"hold"}  # 0.4 on one replica


def test_removes_the_least_busy_added_replica():
    reps = (
        ReplicaView("user", serving=True, slots=2),
        ReplicaView("a", serving=True, slots=2, added=True, outstanding=1, created_at=5.0),
        ReplicaView("b", serving=True, slots=2, added=True, outstanding=0, created_at=1.0),
    )
    v = ModelView(model="m", replicas=reps, service_ms=100.0, in_flight=1)
    assert run([v] * 3)[-1].deployment_id == "b"


def test_the_policy_refuses_nonsense():
    with pytest.raises(ValueError):
        Policy(min_replicas=0)
    with pytest.raises(ValueError):
        Policy(latency_factor=1.0)


def test_drained_needs_a_report_that_says_so_and_none_against():
    a = ReplicaLoad(deployment_id="x", model="m", draining=True)
    busy = ReplicaLoad(deployment_id="x", model="m", draining=True, in_flight=1)
    other = ReplicaLoad(deployment_id="y", model="m")
    assert drained("x", [[a, other]])
    assert not drained("x", [[other]])  # nobody has seen it draining yet
    assert not drained("x", [[a], [busy]])
    assert not drained("x", [[ReplicaLoad(deployment_id="x", model="m")]])


def test_totals_sum_over_schedulers():
    r1 = ReplicaLoad(deployment_id="x", model="m", queue_depth=2, in_flight=1)
    r2 = ReplicaLoad(deployment_id="y", model="m", queue_depth=1, in_flight=2)
    t = totals([[r1], [r2]], {"y": 300.0})
    assert (t["m"].queue_depth, t["m"].in_flight, t["m"].e2e_p95_ms) == (3, 3, 300.0)


# ---------------------------------------------------------------------------------------------------
# properties

loads = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 4), st.floats(0, 1)), min_size=1, max_size=60)


def views_of(seq, n: int, added: int, free: int = 4) -> list[ModelView]:
    return [view(queue=q, running=r, load=g, n=n, added=added, free=free) for q, r, g in seq]


@settings(max_examples=200, deadline=None)
@given(loads, st.integers(1, 3), st.integers(0, 2))
def test_never_acts_within_the_minimum_dwell(seq, n, added):
    added = min(added, n)
    last = None
    for i, d in enumerate(run(views_of(seq, n, added))):
        if d.action in ("add", "remove"):
            assert last is None or i - last >= POLICY.min_dwell_s
            last = i


@settings(max_examples=200, deadline=None)
@given(loads, st.integers(1, 3))
def test_never_removes_the_last_replica_nor_adds_without_a_free_gpu(seq, n):
    for d in run(views_of(seq, n, added=n, free=0)):
        assert d.action != "add"
        if d.action == "remove":
            assert n > POLICY.min_replicas
    for d in run(views_of(seq, 1, added=1)):
        assert d.action != "remove"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=2, max_size=60), st.integers(1, 3))
def test_an_oscillating_load_never_acts(phases, n):
    """Busy and idle in turn, never twice the same in a row: no count reaches its window."""
    seq = [(8, 2, 0.9) if i % 2 else (0, 0, 0.0) for i in range(len(phases))]
    assert {d.action for d in run(views_of(seq, n, added=n))} == {"hold"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3)), min_size=1, max_size=60))
def test_a_load_inside_the_band_never_acts(seq):
    """Latency at most the target and too much load to remove one: inside the hysteresis band."""
    views = [view(queue=q, running=4, n=2, added=1, load=0.5) for q, _ in seq]  # q/4 slots: <= 1.75x
    assert {d.action for d in run(views)} == {"hold"}


# ---------------------------------------------------------------------------------------------------
# the scheduler's side: a draining replica takes nothing new, and what it reports


def test_a_draining_replica_takes_no_new_request_and_finishes_what_it_holds():
    from iserve.scheduler.queues import FcfsQueues, Queued

    q: FcfsQueues[None] = FcfsQueues()
    q.add_replica("a", "m", 1)
    q.add_replica("b", "m", 1)
    for i in range(3):
        q.enqueue(Queued(f"r{i}", "m", float(i), 100.0, None))
    assert [len(r.queue) for r in (q.replicas["a"], q.replicas["b"])] == [2, 1]
    q.add_replica("b", "m", 1, draining=True)
    assert q.enqueue(Queued("r3", "m", 3.0, 100.0, None)).deployment_id == "a"
    assert q.choose("m", "b") is None  # not even when named
    assert q.start_next("b").request_id == "r1"  # what it holds still runs
    q.finish("b", "r1")
    assert q.replicas["b"].outstanding == 0
    q.add_replica("a", "m", 1, draining=True)
    assert q.choose("m") is None


def test_the_load_report_counts_since_the_previous_one():
    from iserve.scheduler.load_report import Window, replica_loads
    from iserve.scheduler.queues import FcfsQueues, Queued

    q: FcfsQueues[None] = FcfsQueues()
    q.add_replica("a", "m", 2)
    for i in range(3):
        q.enqueue(Queued(f"r{i}", "m", float(i), 100.0, None))
    q.start_next("a")
    w = Window(arrived=3)
    for ms in (100.0, 200.0, 300.0):
        w.complete(ms)
    (r,) = replica_loads(q, {"a": w}, now=4.0)
    assert (r.queue_depth, r.in_flight, r.slots, r.arrived, r.completed) == (2, 1, 2, 3, 3)
    assert r.oldest_wait_ms == 3000.0 and r.e2e_ms_p95 == pytest.approx(290.0)
    assert replica_loads(q, {}, now=4.0)[0].e2e_ms_p95 == 0.0


def test_spare_gpus_are_free_idle_and_not_already_serving_the_model():
    from iserve.deployer.autoscaler import spare_gpus
    from iserve.deployer.placement import GpuState

    def g(i, free, load, kind="H100"):
        return GpuState(agent_id="a", gpu_index=i, gpu_type=kind, total_bytes=80, free_bytes=free, load=load)

    gpus = [g(0, 70, 0.0), g(1, 70, 0.9), g(2, 10, 0.0), g(3, 70, 0.1, "A6000"), g(4, 70, 0.2), g(5, 70, 0.0)]
    spare = spare_gpus(gpus, "H100", 40, {("a", 5)}, 0.5)
    assert [x.gpu_index for x in spare] == [0, 4]  # 1 busy, 2 short, 3 another type, 5 serves the model
