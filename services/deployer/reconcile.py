"""Reconciliation, pure: compare the desired deployments (the JetStream records) with what the agents
and workers report, and return what to do. No I/O, no clock; the deployer passes everything in.

A deployment's worker is **alive** when it heartbeats (within ``heartbeat_stale_s``), when its agent
still lists its process, or when it was launched a moment ago (``launch_grace_s``). It is **gone**
when its agent reported it exited, or when none of those hold and the deployer has been observing
without a break for ``startup_grace_s`` (a deployer that just started, or just got its NATS
connection back, concludes nothing from silence). A gone worker is relaunched with a new worker id:
on the same agent and GPUs while that agent reports them, else re-placed on the GPUs free now. After
``max_attempts`` relaunches within ``window_s`` the deployer gives up, with the reason in the record;
a given-up record is deleted ``failed_ttl_s`` after its last change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from iserve.messages import DeploymentRecord

ActionKind = Literal["ready", "fail", "relaunch", "replace", "give_up", "delete"]


@dataclass(frozen=True)
class AgentSeen:
    """An agent's latest ``gpu.load`` reports: when, its GPUs (index -> type) and the workers it runs."""

    at: float
    gpus: Mapping[int, str]
    workers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HeartbeatSeen:
    at: float
    state: str  # "loading", "idle" or "busy"


@dataclass(frozen=True)
class Observed:
    """What the deployer has seen, all times on one clock."""

    agents: Mapping[str, AgentSeen] = field(default_factory=dict)
    heartbeats: Mapping[str, HeartbeatSeen] = field(default_factory=dict)  # worker id -> latest
    exited: Mapping[str, str] = field(default_factory=dict)  # worker id -> why it exited (worker.exited)
    launched: Mapping[str, float] = field(default_factory=dict)  # worker id -> when this deployer launched it
    since: float = 0.0  # observing without a break since then


@dataclass(frozen=True)
class Policy:
    agent_stale_s: float = 5.0
    heartbeat_stale_s: float = 5.0
    launch_grace_s: float = 10.0
    startup_grace_s: float = 3.0
    relaunch: bool = True  # False: mark gone workers' deployments failed, nothing more
    max_attempts: int = 3
    window_s: float = 600.0
    backoff_s: float = 1.0  # before the second attempt; doubles, up to backoff_max_s
    backoff_max_s: float = 30.0
    failed_ttl_s: float = 3600.0


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    deployment_id: str
    reason: str = ""  # what the record's ``reason`` becomes
    cause: str = ""  # why its worker went (the record's ``cause``)


def backoff(attempts: int, policy: Policy) -> float:
    """Seconds to wait after the latest of ``attempts`` recent attempts before the next one."""
    if attempts <= 0:
        return 0.0
    return min(policy.backoff_s * 2 ** (attempts - 1), policy.backoff_max_s)


def worker_gone(dep: DeploymentRecord, obs: Observed, now: float, policy: Policy) -> str | None:
    """Why the deployment's worker is gone; None while it is alive or nothing can be concluded yet."""
    wid = dep.worker_id
    if wid in obs.exited:
        return obs.exited[wid] or f"worker {wid} exited"
    hb = obs.heartbeats.get(wid)
    if hb is not None and now - hb.at <= policy.heartbeat_stale_s:
        return None
    agent = obs.agents.get(dep.agent_id)
    agent_fresh = agent is not None and now - agent.at <= policy.agent_stale_s
    if agent_fresh and agent is not None and wid in agent.workers:
        return None  # its process runs (loading, or its heartbeats are late)
    launched = obs.launched.get(wid)
    if launched is not None and now - launched <= policy.launch_grace_s:
        return None
    if dep.status == "launching" and now - dep.updated_at <= policy.launch_grace_s:
        return None
    if now - obs.since < policy.startup_grace_s:
        return None
    if not agent_fresh:
        return f"agent {dep.agent_id} stopped reporting"
    return f"worker {wid} is no longer running on agent {dep.agent_id}"


def decide(
    dep: DeploymentRecord, obs: Observed, attempts: Sequence[float], now: float, policy: Policy
) -> Action | None:
    """The action for one deployment, or None. ``attempts``: when its recent relaunches were made."""
    did = dep.deployment_id
    if dep.status == "stopped":
        return None
    if dep.given_up:
        expired = now - dep.updated_at > policy.failed_ttl_s
        return Action("delete", did, f"given up more than {policy.failed_ttl_s:.0f} s ago") if expired else None
    gone = worker_gone(dep, obs, now, policy)
    if gone is None:
        hb = obs.heartbeats.get(dep.worker_id)
        serving = hb is not None and hb.state in ("idle", "busy") and now - hb.at <= policy.heartbeat_stale_s
        if dep.status in ("launching", "failed") and serving and dep.worker_id not in obs.exited:
            return Action("ready", did, "its worker heartbeats")
        return None
    cause = dep.cause if dep.status == "failed" and dep.cause else gone
    if not policy.relaunch:
        return None if dep.status == "failed" else Action("fail", did, cause, cause)
    recent = [t for t in attempts if now - t < policy.window_s]
    if len(recent) >= policy.max_attempts:
        return Action(
            "give_up",
            did,
            f"{cause}; gave up after {len(recent)} relaunches within {policy.window_s:.0f} s "
            f"(deploy it again with `iserve deploy {dep.model} --deployment-id {did}`)",
            cause,
        )
    if recent and now < max(recent) + backoff(len(recent), policy):
        return None if dep.status == "failed" else Action("fail", did, cause, cause)
    agent = obs.agents.get(dep.agent_id)
    fresh = agent is not None and now - agent.at <= policy.agent_stale_s
    if fresh and agent is not None and all(g.gpu_index in agent.gpus for g in dep.gpus):
        return Action("relaunch", did, cause, cause)
    if any(now - a.at <= policy.agent_stale_s and dep.gpu_type in a.gpus.values() for a in obs.agents.values()):
        return Action("replace", did, cause, cause)
    waiting = f"{cause}; waiting for an agent with {dep.gpu_type} GPUs"
    return None if dep.status == "failed" and dep.reason == waiting else Action("fail", did, waiting, cause)


def reconcile(
    deployments: Iterable[DeploymentRecord],
    obs: Observed,
    history: Mapping[str, Sequence[float]],
    now: float,
    policy: Policy,
) -> list[Action]:
    """Every deployment's action, in deployment id order."""
    out = []
    for dep in sorted(deployments, key=lambda d: d.deployment_id):
        a = decide(dep, obs, history.get(dep.deployment_id, ()), now, policy)
        if a is not None:
            out.append(a)
    return out
