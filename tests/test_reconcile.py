"""The deployer's reconciliation decisions (pure, table-driven): what it does for each combination of
a deployment record, what agents and workers report, the time and the retry history."""

from __future__ import annotations

import pytest
from planner_factories import est

from iserve.deployer.reconcile import Action, AgentSeen, HeartbeatSeen, Observed, Policy, backoff, reconcile
from iserve.messages import DeploymentRecord, GpuAssignment, Intent

NOW = 10_000.0
POLICY = Policy(agent_stale_s=5, heartbeat_stale_s=5, launch_grace_s=10, startup_grace_s=3, max_attempts=3)


def record(status: str = "ready", **kw) -> DeploymentRecord:
    e = est()
    base = dict(
        deployment_id="d1",
        model="m",
        model_path="/m",
        gpu_type="sim",
        config=e.config,
        estimate=e,
        intent=Intent(),
        placement_policy="hybrid",
        gpus=[GpuAssignment(agent_id="a0", gpu_index=1, first_layer=0, num_layers=4, memory_bytes=1)],
        agent_id="a0",
        worker_id="w1",
        context_tokens=256,
        status=status,
        updated_at=NOW - 100,
    )
    base.update(kw)
    return DeploymentRecord(**base)  # type: ignore[arg-type]


def agent(at: float = NOW - 1, workers: tuple[str, ...] = (), gpus: dict[int, str] | None = None) -> AgentSeen:
    return AgentSeen(at=at, gpus=gpus if gpus is not None else {0: "sim", 1: "sim"}, workers=frozenset(workers))


def seen(**kw) -> Observed:
    kw.setdefault("since", NOW - 60)
    return Observed(**kw)


LIVE_AGENT = {"a0": agent(workers=("w1",))}
EMPTY_AGENT = {"a0": agent()}

CASES = [
    # (name, record kwargs, observed, attempts, expected action kind or None, reason fragment)
    ("heartbeating worker is alive", {}, seen(heartbeats={"w1": HeartbeatSeen(NOW - 1, "idle")}), [], None, ""),
    ("listed by its agent is alive", {}, seen(agents=LIVE_AGENT), [], None, ""),
    (
        "late heartbeat but listed is alive",
        {},
        seen(agents=LIVE_AGENT, heartbeats={"w1": HeartbeatSeen(NOW - 30, "busy")}),
        [],
        None,
        "",
    ),
    (
        "just launched is alive",
        {"status": "launching"},
        seen(agents=EMPTY_AGENT, launched={"w1": NOW - 2}),
        [],
        None,
        "",
    ),
    (
        "launching record just written is alive",
        {"status": "launching", "updated_at": NOW - 2},
        seen(agents=EMPTY_AGENT),
        [],
        None,
        "",
    ),
    (
        "launching and serving turns ready",
        {"status": "launching"},
        seen(heartbeats={"w1": HeartbeatSeen(NOW - 1, "idle")}),
        [],
        "ready",
        "",
    ),
    (
        "failed but heartbeating again turns ready",
        {"status": "failed", "cause": "x"},
        seen(heartbeats={"w1": HeartbeatSeen(NOW, "busy")}),
        [],
        "ready",
        "",
    ),
    (
        "loading heartbeat does not make ready",
        {"status": "launching"},
        seen(heartbeats={"w1": HeartbeatSeen(NOW - 1, "loading")}),
        [],
        None,
        "",
    ),
    ("silence right after start proves nothing", {}, seen(agents=EMPTY_AGENT, since=NOW - 1), [], None, ""),
    ("worker gone, agent has its GPUs: relaunch", {}, seen(agents=EMPTY_AGENT), [], "relaunch", "no longer running"),
    (
        "exited worker is gone even if heartbeat fresh",
        {},
        seen(
            agents=LIVE_AGENT,
            heartbeats={"w1": HeartbeatSeen(NOW, "idle")},
            exited={"w1": "worker exited with code -9"},
        ),
        [],
        "relaunch",
        "code -9",
    ),
    (
        "failed record keeps its cause",
        {"status": "failed", "cause": "worker exited: boom", "reason": "worker exited: boom"},
        seen(agents=EMPTY_AGENT),
        [],
        "relaunch",
        "boom",
    ),
    (
        "agent lost the GPU: re-place",
        {},
        seen(agents={"a0": agent(gpus={0: "sim"})}),
        [],
        "replace",
        "no longer running",
    ),
    (
        "agent gone, another agent of the type: re-place",
        {},
        seen(agents={"a0": agent(at=NOW - 20), "a1": agent()}),
        [],
        "replace",
        "stopped reporting",
    ),
    (
        "agent never seen since start: re-place elsewhere",
        {},
        seen(agents={"a1": agent()}),
        [],
        "replace",
        "stopped reporting",
    ),
    (
        "agent gone, no GPUs of the type: wait",
        {},
        seen(agents={"a1": agent(gpus={0: "other"})}),
        [],
        "fail",
        "waiting for an agent with sim GPUs",
    ),
    (
        "already waiting with that reason: nothing",
        {
            "status": "failed",
            "cause": "agent a0 stopped reporting",
            "reason": "agent a0 stopped reporting; waiting for an agent with sim GPUs",
        },
        seen(),
        [],
        None,
        "",
    ),
    ("in back-off: mark failed only", {}, seen(agents=EMPTY_AGENT), [NOW - 0.5], "fail", "no longer running"),
    ("in back-off and failed already: nothing", {"status": "failed"}, seen(agents=EMPTY_AGENT), [NOW - 0.5], None, ""),
    ("back-off over: relaunch again", {"status": "failed"}, seen(agents=EMPTY_AGENT), [NOW - 5], "relaunch", ""),
    (
        "too many attempts: give up with the reason",
        {"status": "failed", "cause": "worker exited: oom"},
        seen(agents=EMPTY_AGENT),
        [NOW - 100, NOW - 50, NOW - 20],
        "give_up",
        "gave up after 3 relaunches",
    ),
    (
        "old attempts do not count",
        {"status": "failed"},
        seen(agents=EMPTY_AGENT),
        [NOW - 900, NOW - 800, NOW - 700],
        "relaunch",
        "",
    ),
    ("given up and fresh: kept", {"status": "failed", "given_up": True, "updated_at": NOW - 60}, seen(), [], None, ""),
    (
        "given up past the TTL: deleted",
        {"status": "failed", "given_up": True, "updated_at": NOW - 4000},
        seen(),
        [],
        "delete",
        "given up",
    ),
]


@pytest.mark.parametrize("name,kw,obs,attempts,kind,fragment", CASES, ids=[c[0] for c in CASES])
def test_reconcile_decides(name, kw, obs, attempts, kind, fragment):
    dep = record(**kw)
    actions = reconcile([dep], obs, {"d1": attempts}, NOW, Policy(**{**POLICY.__dict__, "failed_ttl_s": 3600}))
    if kind is None:
        assert actions == [], name
        return
    assert [a.kind for a in actions] == [kind], (name, actions)
    assert fragment in actions[0].reason, (name, actions[0])


def test_relaunch_disabled_only_marks_failed():
    no = Policy(**{**POLICY.__dict__, "relaunch": False})
    obs = seen(agents=EMPTY_AGENT)
    assert reconcile([record()], obs, {}, NOW, no) == [
        Action("fail", "d1", "worker w1 is no longer running on agent a0", "worker w1 is no longer running on agent a0")
    ]
    assert reconcile([record(status="failed")], obs, {}, NOW, no) == []


def test_stopped_records_and_several_deployments():
    obs = seen(agents=EMPTY_AGENT, heartbeats={"w2": HeartbeatSeen(NOW, "idle")})
    deps = [
        record(deployment_id="d3"),
        record(status="stopped", deployment_id="d0"),
        record(deployment_id="d2", worker_id="w2"),
    ]
    assert [(a.kind, a.deployment_id) for a in reconcile(deps, obs, {}, NOW, POLICY)] == [("relaunch", "d3")]


def test_backoff_doubles_up_to_its_cap():
    assert [backoff(n, POLICY) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]
