"""The deployer's autoscaling loop: a thin adapter around ``autoscaler.decide``.

Every ``--autoscale-interval-s`` it builds each deployed model's view from the schedulers' latest
``scheduler.load`` reports, the agents' per-second ``gpu.load`` and the deployment records, and acts:

* **add**: one more deployment of the model through the deployer's own deploy path, with the same
  intent, configuration, GPU type, batch and placement policy, placed on the GPUs free now;
* **remove**: the replica is marked ``draining`` (record and ``deploy.changed``): the schedulers send
  it no new request and let it finish what it holds; once every scheduler that reports it says it
  is draining and holds nothing, it is undeployed. No accepted request is failed for it.

Its state (per model: the replicas it added, those draining, the counts, the last action and its
reason) is kept in the JetStream bucket ``iserve_autoscaler``, so a restarted deployer carries on;
``deploy.list`` returns it (``iserve status`` shows it).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, errors, subjects
from iserve.messages import (
    AutoscaleState,
    DeploymentRecord,
    DeployReply,
    DeployRequest,
    ReplicaLoad,
    SchedulerLoad,
    UndeployReply,
    UndeployRequest,
    decoder,
    now,
)

from .autoscaler import ModelView, ReplicaView, decide, drained, spare_gpus, totals
from .config import DeployerConfig, autoscale_policy
from .placement import GpuState

log = structlog.get_logger()


class Host(Protocol):
    """What the loop uses of the deployer service."""

    @property
    def nc(self) -> NATS: ...

    @property
    def lock(self) -> asyncio.Lock: ...

    @property
    def deployments(self) -> bus.TypedKV[DeploymentRecord]: ...

    @property
    def gpus(self) -> Mapping[Any, Any]: ...  # (agent, index) -> SeenGpu (``load``: GpuLoad, ``at``: monotonic)

    def gpu_states(self) -> list[GpuState]: ...

    async def _deploy(
        self, req: DeployRequest, previous: DeploymentRecord | None = None, *, only: set[tuple[str, int]] | None = None
    ) -> DeployReply: ...

    async def _undeploy(self, req: UndeployRequest) -> UndeployReply: ...

    async def _changed(self, dep: DeploymentRecord) -> None: ...


def service_ms(dep: DeploymentRecord) -> float:
    """The estimated latency of one request alone, for the lengths its intent names."""
    return dep.estimate.latency_ms(dep.intent.prompt_tokens, dep.intent.output_tokens)


class AutoscaleLoop:
    def __init__(self, host: Host, cfg: DeployerConfig):
        self.host = host
        self.cfg = cfg
        self.policy = autoscale_policy(cfg)
        self.reports: dict[str, tuple[float, SchedulerLoad]] = {}  # scheduler id -> (monotonic, latest)
        self.p95s: dict[str, float] = {}  # deployment id -> largest p95 reported since the last evaluation
        self.states: dict[str, AutoscaleState] = {}  # model -> state, as stored
        self.kv: bus.TypedKV[AutoscaleState] | None = None

    async def setup(self) -> None:
        self.kv = await bus.TypedKV.open(
            self.host.nc, subjects.BUCKET_AUTOSCALER, AutoscaleState, replicas=self.cfg.kv_replicas
        )
        self.states = {s.model: s for s in await self.kv.values()}

    def listing(self) -> list[AutoscaleState]:
        return [self.states[m] for m in sorted(self.states)]

    async def on_load(self, msg: Msg) -> None:
        try:
            rep = decoder(SchedulerLoad).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.reports[rep.scheduler_id] = (time.monotonic(), rep)
        for r in rep.replicas:
            if r.completed:
                self.p95s[r.deployment_id] = max(self.p95s.get(r.deployment_id, 0.0), r.e2e_ms_p95)

    def fresh_reports(self) -> list[list[ReplicaLoad]]:
        t = time.monotonic()
        for sid in [s for s, (at, rep) in self.reports.items() if t - at > max(3.0 * rep.window_s, 3.0)]:
            del self.reports[sid]
        return [rep.replicas for _, rep in self.reports.values()]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.autoscale_interval_s)
            try:
                await self.step(time.time())
            except Exception:
                log.exception("autoscaling step failed")

    async def step(self, wall: float) -> None:
        deps = [d for d in await self.host.deployments.values() if not d.given_up]
        reports = self.fresh_reports()
        p95s, self.p95s = self.p95s, {}
        by_model: dict[str, list[DeploymentRecord]] = {}
        for d in deps:
            by_model.setdefault(d.model, []).append(d)
        for model in [m for m in self.states if m not in by_model]:
            await self._forget(model)
        if not reports:
            return  # no scheduler reports: nothing is known about the load
        sums = totals(reports, p95s)
        for model, ds in sorted(by_model.items()):
            state = self.states.get(model) or AutoscaleState(model=model)
            ids = {d.deployment_id for d in ds}
            state = msgspec.structs.replace(
                state,
                added=[i for i in state.added if i in ids],
                draining=[i for i in state.draining if i in ids],
            )
            state = await self._finish_drains(state, ds, reports)
            view = self._view(model, ds, state, reports, sums)
            if view is None:
                await self._save(state)
                continue
            choice = decide(view, state, self.policy, wall)
            st = choice.state
            if choice.action == "add":
                st = await self._add(st, ds, choice.reason)
            elif choice.action == "remove":
                st = await self._drain(st, choice.deployment_id, choice.reason)
            else:
                log.debug("autoscaler holds", model=model, reason=choice.reason)
            await self._save(st)

    # ------------------------------------------------------------------ observations

    def _view(
        self,
        model: str,
        ds: list[DeploymentRecord],
        state: AutoscaleState,
        reports: list[list[ReplicaLoad]],
        sums: Mapping[str, Any],
    ) -> ModelView | None:
        serving = [d for d in ds if d.status == "ready" and not d.draining]
        tmpl = self._template(ds, state)
        if tmpl is None:
            return None
        outstanding: dict[str, int] = {}
        for report in reports:
            for r in report:
                outstanding[r.deployment_id] = outstanding.get(r.deployment_id, 0) + r.queue_depth + r.in_flight
        replicas = tuple(
            ReplicaView(
                deployment_id=d.deployment_id,
                serving=d.status == "ready" and not d.draining,
                launching=d.status == "launching",
                outstanding=outstanding.get(d.deployment_id, 0),
                slots=d.max_batch,
                added=d.deployment_id in state.added,
                created_at=d.created_at,
            )
            for d in ds
        )
        t = sums.get(model)
        free = len(self._spare(ds, tmpl))
        slo = tmpl.intent.slo_ms or 0.0
        return ModelView(
            model=model,
            replicas=replicas,
            service_ms=service_ms(tmpl),
            slo_ms=slo if tmpl.intent.kind == "latency-slo" else 0.0,
            queue_depth=t.queue_depth if t else 0,
            in_flight=t.in_flight if t else 0,
            e2e_p95_ms=t.e2e_p95_ms if t else 0.0,
            gpu_load=self._gpu_load(serving),
            free_gpus=free,
            gpus_per_replica=len(tmpl.gpus),
        )

    def _spare(self, ds: list[DeploymentRecord], tmpl: DeploymentRecord) -> list[GpuState]:
        """The GPUs a new replica of ``tmpl``'s model may take (``autoscaler.spare_gpus``)."""
        need = max((g.memory_bytes for g in tmpl.gpus), default=0)
        taken = {(g.agent_id, g.gpu_index) for d in ds if d.status in ("ready", "launching") for g in d.gpus}
        return spare_gpus(self.host.gpu_states(), tmpl.gpu_type, need, taken, self.policy.spare_load)

    @staticmethod
    def _template(ds: list[DeploymentRecord], state: AutoscaleState) -> DeploymentRecord | None:
        """The deployment a new replica copies: the oldest the user made, else the oldest."""
        live = sorted((d for d in ds if d.status in ("ready", "launching")), key=lambda d: d.created_at)
        own = [d for d in live if d.deployment_id not in state.added]
        return (own or live)[0] if live else None

    def _gpu_load(self, serving: list[DeploymentRecord]) -> float:
        """Mean busy fraction over the last second of the serving replicas' GPUs."""
        fresh = time.monotonic() - self.cfg.gpu_stale_s
        loads = []
        for d in serving:
            for g in d.gpus:
                seen = self.host.gpus.get((g.agent_id, g.gpu_index))
                if seen is not None and seen.at >= fresh:
                    loads.append(min(max(seen.load.util_percent / 100.0, 0.0), 1.0))
        return sum(loads) / len(loads) if loads else 0.0

    # ------------------------------------------------------------------ actions

    async def _add(self, st: AutoscaleState, ds: list[DeploymentRecord], why: str) -> AutoscaleState:
        tmpl = self._template(ds, st)
        assert tmpl is not None  # _view returned None otherwise
        req = DeployRequest(
            model=tmpl.model,
            intent=msgspec.structs.replace(tmpl.intent, rate=0.0),  # one replica: the set is sized here
            placement=tmpl.placement_policy,
            deployment_id=f"{tmpl.model}-as-{uuid.uuid4().hex[:6]}",
            context_tokens=tmpl.context_tokens,
            gpu_type=tmpl.gpu_type,
            max_batch=tmpl.max_batch,
            kv_tokens=tmpl.kv_tokens,
            config=tmpl.config.key(),
        )
        only = {(g.agent_id, g.gpu_index) for g in self._spare(ds, tmpl)}
        try:
            async with self.host.lock:
                rep = await self.host._deploy(req, only=only)
        except errors.IServeError as e:
            st.last_reason = f"{why}; adding failed: {e.message}"
            log.warning("autoscaler could not add a replica", model=tmpl.model, reason=st.last_reason)
            return st
        st.added = [*st.added, rep.deployment.deployment_id]
        log.info("autoscaler added a replica", model=tmpl.model, deployment_id=req.deployment_id, reason=why)
        return st

    async def _drain(self, st: AutoscaleState, deployment_id: str, why: str) -> AutoscaleState:
        async with self.host.lock:
            dep = await self.host.deployments.get(deployment_id)
            if dep is None:
                return st
            dep.draining = True
            dep.reason = f"draining: {why}"
            dep.updated_at = now()
            await self.host.deployments.put(deployment_id, dep)
            await self.host._changed(dep)
        st.draining = [*st.draining, deployment_id]
        log.info("autoscaler draining a replica", model=st.model, deployment_id=deployment_id, reason=why)
        return st

    async def _finish_drains(
        self, st: AutoscaleState, ds: list[DeploymentRecord], reports: list[list[ReplicaLoad]]
    ) -> AutoscaleState:
        """Undeploy each draining replica that holds no request (one that is no longer ready holds
        none: the scheduler serves only ready ones)."""
        recs = {d.deployment_id: d for d in ds}
        for dep_id in list(st.draining):
            d = recs.get(dep_id)
            if d is not None and d.status == "ready" and not d.draining:  # re-placed meanwhile: drain it again
                await self._drain(st, dep_id, st.last_reason)
                st.draining = [i for i in st.draining if i != dep_id] + [dep_id]
                continue
            if d is not None and d.status == "ready" and not drained(dep_id, reports):
                continue
            try:
                async with self.host.lock:
                    await self.host._undeploy(UndeployRequest(deployment_id=dep_id))
            except errors.NotFound:
                pass
            except errors.IServeError as e:
                log.warning("autoscaler could not undeploy a drained replica", deployment_id=dep_id, error=str(e))
                continue
            st.draining = [i for i in st.draining if i != dep_id]
            st.added = [i for i in st.added if i != dep_id]
            log.info("autoscaler removed a replica", model=st.model, deployment_id=dep_id, reason=st.last_reason)
        return st

    async def _save(self, st: AutoscaleState) -> None:
        if self.states.get(st.model) == st:
            return
        self.states[st.model] = st
        assert self.kv is not None
        await self.kv.put(st.model, st)

    async def _forget(self, model: str) -> None:
        self.states.pop(model, None)
        assert self.kv is not None
        await self.kv.delete(model)
