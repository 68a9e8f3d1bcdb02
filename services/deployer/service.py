"""The deployer: answers ``deploy.request`` with the best feasible configuration for the intent on the
GPUs free now (``planner.plan_gpu_types``), launches its worker through the GPU agent, and keeps every
deployment's record durable in JetStream (bucket ``iserve_deployments``).

GPU state comes from the agents' per-second ``gpu.load`` reports. Between a launch and the first
report that shows the new worker, the deployer counts the worker's memory as pending so that two
quick deployments never plan onto the same free memory. Decisions are serialized by one lock.

At start, every ``reconcile_s`` and on ``worker.exited`` it reconciles (``reconcile.reconcile``, pure):
a deployment whose worker or agent is gone is relaunched with a new worker id, on the same GPUs or
re-placed, within bounded retries.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, errors, quality, subjects
from iserve.fingerprint.estimator.memory import kv_cache_bytes_per_layer
from iserve.messages import (
    ConfigurationMap,
    DeploymentChanged,
    DeploymentList,
    DeploymentRecord,
    DeployReply,
    DeployRequest,
    GpuLoad,
    LaunchReply,
    ListDeployments,
    ModelRecord,
    StopReply,
    StopWorker,
    UndeployReply,
    UndeployRequest,
    WorkerExited,
    WorkerHeartbeat,
    WorkerReady,
    decoder,
    encode,
    now,
)
from iserve.service import Service

from . import planner, reconcile
from .autoscale_loop import AutoscaleLoop
from .config import DeployerConfig
from .launches import launch_of, new_worker_id, reserved_by
from .memory import kv_pool_tokens
from .placement import GpuState

log = structlog.get_logger()


@dataclass
class SeenGpu:
    load: GpuLoad
    at: float  # monotonic time of the report


class DeployerService(Service):
    def __init__(self, cfg: DeployerConfig, nc: NATS):
        super().__init__(nc)
        self.cfg = cfg
        self.gpus: dict[tuple[str, int], SeenGpu] = {}
        self.pending: dict[str, dict[tuple[str, int], int]] = {}  # worker id -> per-GPU bytes not yet reported
        self.lock = asyncio.Lock()
        self._attempts: dict[str, list[float]] = {}  # deployment id -> wall times of its recent relaunches
        self._beats: dict[str, reconcile.HeartbeatSeen] = {}  # worker id -> latest heartbeat (wall time)
        self._exited: dict[str, tuple[str, float]] = {}  # worker id -> (why, when) for unexpected exits
        self._launched: dict[str, float] = {}  # worker id -> when this deployer launched it
        self._observing_since = time.time()
        self._reconnects = 0
        self.autoscaler = AutoscaleLoop(self, cfg) if cfg.autoscale else None  # autoscale_loop.py

    async def setup(self) -> None:
        self.models = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_MODELS, ModelRecord, replicas=self.cfg.kv_replicas
        )
        self.profiles = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_PROFILES, ConfigurationMap, replicas=self.cfg.kv_replicas
        )
        self.deployments = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_DEPLOYMENTS, DeploymentRecord, replicas=self.cfg.kv_replicas
        )
        if self.autoscaler is not None:
            await self.autoscaler.setup()

    async def subscribe(self) -> None:
        await self.serve(subjects.DEPLOY_REQUEST, DeployRequest, self.handle_deploy, queue="deployer")
        await self.serve(subjects.UNDEPLOY_REQUEST, UndeployRequest, self.handle_undeploy, queue="deployer")
        await self.serve(subjects.DEPLOYMENT_LIST, ListDeployments, self.handle_list, queue="deployer")
        await self.listen(subjects.GPU_LOAD_ALL, self._on_gpu_load)
        await self.listen(subjects.WORKER_READY, self._on_worker_ready)
        await self.listen(subjects.WORKER_EXITED, self._on_worker_exited)
        await self.listen(subjects.WORKER_HEARTBEAT + ".>", self._on_heartbeat)
        if self.autoscaler is not None:
            await self.listen(subjects.SCHEDULER_LOAD, self.autoscaler.on_load)

    async def started(self) -> None:
        self._observing_since = time.time()
        await self.reconcile_now()
        self.spawn(self._reconcile_loop())
        if self.autoscaler is not None:
            self.spawn(self.autoscaler.run())
        log.info(
            "deployer started",
            deployments=len(await self.deployments.values()),
            policy=self.cfg.placement,
            theta=self.cfg.theta,
        )

    # ------------------------------------------------------------------ cluster state

    async def _on_gpu_load(self, msg: Msg) -> None:
        try:
            g = decoder(GpuLoad).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        key = (g.agent_id, g.gpu_index)
        self.gpus[key] = SeenGpu(g, time.monotonic())
        for wid in g.workers:  # the agent now accounts for this worker on this GPU
            p = self.pending.get(wid)
            if p is not None:
                p.pop(key, None)
                if not p:
                    self.pending.pop(wid, None)

    def gpu_states(self) -> list[GpuState]:
        fresh = time.monotonic() - self.cfg.gpu_stale_s
        pending: dict[tuple[str, int], int] = {}
        for per_gpu in self.pending.values():
            for k, b in per_gpu.items():
                pending[k] = pending.get(k, 0) + b
        out = []
        for key, seen in sorted(self.gpus.items()):
            if seen.at < fresh:
                continue
            g = seen.load
            out.append(
                GpuState(
                    agent_id=g.agent_id,
                    gpu_index=g.gpu_index,
                    gpu_type=g.gpu_type,
                    total_bytes=g.total_bytes,
                    free_bytes=max(g.free_bytes - pending.get(key, 0), 0),
                    load=g.busy_fraction,
                )
            )
        return out

    # ------------------------------------------------------------------ deploy

    async def handle_deploy(self, req: DeployRequest, _msg: Msg) -> DeployReply:
        with structlog.contextvars.bound_contextvars(model=req.model, intent=req.intent.kind):
            async with self.lock:
                return await self._deploy(req)

    async def _deploy(
        self, req: DeployRequest, previous: DeploymentRecord | None = None, *, only: set[tuple[str, int]] | None = None
    ) -> DeployReply:
        """Plan and launch. ``previous``: the record of a deployment being re-placed, whose creation
        time and relaunch count carry over and which is put back (not deleted) if the launch fails;
        ``only``: the (agent, GPU) it may use (the autoscaler's spare GPUs; None: any)."""
        if req.deployment_id and not bus.valid_key(req.deployment_id):
            raise errors.BadRequest(
                f"deployment id {req.deployment_id!r} is not usable: use letters, digits, '-', '_' and single dots; "
                "or leave it empty for one made up."
            )
        if req.deployment_id and previous is None:
            existing = await self.deployments.get(req.deployment_id)
            if existing is not None and existing.status in ("launching", "ready"):
                return DeployReply(deployment=existing, why="already deployed (idempotent retry)")
            if existing is not None and existing.model != req.model:
                raise errors.Conflict(
                    f"deployment id {req.deployment_id!r} belongs to model {existing.model!r}; choose another id."
                )
        policy = req.placement or self.cfg.placement
        record = await self.models.get(req.model)
        if record is None:
            raise errors.NotFound(
                f"model {req.model!r} is not registered; register it first with `iserve register PATH`."
            )
        if record.status == "failed":
            raise errors.NotReady(
                f"model {req.model!r} failed to profile ({record.status_reason}); fix the cause and register it again."
            )
        if not record.profiled_gpu_types:
            raise errors.NotReady(
                f"model {req.model!r} is still being profiled; wait for profile.done (see `iserve status`)."
            )
        types = [t for t in record.profiled_gpu_types if not req.gpu_type or t == req.gpu_type]
        if not types:
            raise errors.NotFound(
                f"model {req.model!r} has no profile for GPU type {req.gpu_type!r}; "
                f"profiled: {', '.join(record.profiled_gpu_types)}."
            )
        gpus = [g for g in self.gpu_states() if only is None or (g.agent_id, g.gpu_index) in only]
        arch = record.arch
        t0 = time.perf_counter()
        profiles = {t: await self.profiles.get(bus.kv_key(req.model, t)) for t in types}

        # a re-placed deployment is one replica: the load sized the whole set when it was deployed
        intent = req.intent if previous is None else msgspec.structs.replace(req.intent, rate=0.0)

        def plan_with(batch: int) -> planner.TypeChoice:
            return planner.plan_gpu_types(
                profiles,
                intent,
                gpus,
                policy=policy,
                theta=self.cfg.theta,
                stale_s=self.cfg.gpu_stale_s,
                model=req.model,
                context_tokens=req.context_tokens,
                max_batch=batch,
                kv_tokens=req.kv_tokens,
                kv_bytes=lambda config, tokens: kv_cache_bytes_per_layer(arch, config, tokens),
                config=req.config,
            )

        # The default batch shrinks (halving) until its KV pool fits; an asked-for batch or pool does not.
        choice, max_batch = planner.largest_batch(
            plan_with, req.max_batch or self.cfg.default_max_batch, fixed=bool(req.max_batch or req.kv_tokens)
        )
        decision_ms = (time.perf_counter() - t0) * 1000.0
        decision, cmap = choice.decision, choice.profile
        # the worker's KV cache: the profile's context, or the shorter one asked for (the estimate,
        # made for the profile's context, then over-reserves a little; never under-reserves)
        context = req.context_tokens or cmap.context_tokens
        # ... and the KV pool its batch draws from (the decision's estimate reserves it)
        kv_tokens = kv_pool_tokens(max_batch, req.kv_tokens, context)
        dep_id = req.deployment_id or f"{req.model}-{uuid.uuid4().hex[:8]}"
        ts = now()
        launched: list[DeploymentRecord] = []
        replicas_why = decision.replica_why
        for i, gpus_of in enumerate(decision.replicas or [decision.assignments]):
            dep = DeploymentRecord(
                deployment_id=dep_id if i == 0 else f"{dep_id}-r{i + 1}",
                model=req.model,
                model_path=record.path,
                gpu_type=cmap.gpu_type,
                config=decision.estimate.config,
                estimate=decision.estimate,
                intent=req.intent,
                placement_policy=policy,
                gpus=gpus_of,
                agent_id=gpus_of[0].agent_id,
                worker_id="",
                context_tokens=context,
                status="launching",
                created_at=previous.created_at if previous else ts,
                updated_at=ts,
                max_batch=max_batch,
                kv_tokens=kv_tokens,
                restarts=previous.restarts + 1 if previous else 0,
                cause=previous.cause if previous else "",
                reason=f"re-placed after: {previous.cause}" if previous else "",
            )
            try:
                launched.append(await self._launch(dep, previous if i == 0 else None))
            except errors.Unavailable as e:
                if i == 0:
                    raise
                replicas_why += f"; replica {i + 1} and later were not launched: {e.message}"
                break
        first = launched[0]
        note, cost = quality.choice_note(decision.estimate.config, cmap.quality)
        log.info(
            "deployed",
            deployment_id=dep_id,
            config=first.config.key(),
            gpus=[(a.agent_id, a.gpu_index, a.num_layers) for a in decision.assignments],
            decision_ms=round(decision_ms, 3),
            max_batch=max_batch,
            kv_tokens=kv_tokens,
            replicas=len(launched),
            why=decision.why,
        )
        return DeployReply(
            deployment=first,
            why=decision.why,
            rejected=decision.rejected,
            latency_ms=decision.latency_ms if math.isfinite(decision.latency_ms) else 0.0,
            cost=decision.cost if math.isfinite(decision.cost) else 0.0,
            decision_ms=decision_ms,
            filtered=decision.filtered,
            quality=note,
            quality_cost=cost,
            replicas=len(launched),
            replicas_why=replicas_why,
            others=launched[1:],
        )

    async def _launch(self, dep: DeploymentRecord, previous: DeploymentRecord | None) -> DeploymentRecord:
        """Record ``dep`` with a new worker id and launch its worker; on failure, undo the record (or
        put ``previous`` back) and raise :class:`Unavailable`."""
        dep_id = dep.deployment_id
        dep = msgspec.structs.replace(dep, worker_id=new_worker_id(dep_id))  # a re-placed one gets a new worker
        await self.deployments.put(dep_id, dep)
        self._launched[dep.worker_id] = time.time()
        if previous is None:
            self._attempts.pop(dep_id, None)  # deployed anew: its relaunch budget starts over
        self.pending[dep.worker_id] = reserved_by(dep)
        try:
            await bus.request(
                self.nc, subjects.agent_launch(dep.agent_id), launch_of(dep), LaunchReply,
                timeout=self.cfg.launch_timeout_s,
            )  # fmt: skip
        except errors.IServeError as e:
            self.pending.pop(dep.worker_id, None)
            reason = f"launch on agent {dep.agent_id} failed: {e.message}"
            if previous is None:
                await self.deployments.delete(dep_id)
            else:
                await self.deployments.put(dep_id, previous)
            raise errors.Unavailable(f"{reason}; nothing was deployed, try again.") from None
        await self._changed(dep)
        return dep

    async def _changed(self, dep: DeploymentRecord) -> None:
        await self.nc.publish(subjects.DEPLOYMENT_CHANGED, encode(DeploymentChanged(deployment=dep)))

    async def _set_status(
        self,
        deployment_id: str,
        status: str,
        reason: str = "",
        *,
        only_from: tuple[str, ...] = (),
        cause: str | None = None,
        given_up: bool = False,
    ) -> None:
        dep = await self.deployments.get(deployment_id)
        if (
            dep is None
            or (only_from and dep.status not in only_from)
            or (dep.status == status and dep.reason == reason and dep.given_up == given_up)
        ):
            return
        dep.status = status  # type: ignore[assignment]
        dep.reason = reason
        dep.given_up = given_up
        if cause is not None:
            dep.cause = cause
        dep.updated_at = now()
        await self.deployments.put(deployment_id, dep)
        await self._changed(dep)
        log.info("deployment status", deployment_id=deployment_id, status=status, reason=reason)

    async def _on_worker_ready(self, msg: Msg) -> None:
        try:
            ev = decoder(WorkerReady).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self._launched.pop(ev.worker_id, None)
        dep = await self.deployments.get(ev.deployment_id)
        if dep is not None and dep.worker_id == ev.worker_id:
            await self._set_status(ev.deployment_id, "ready", only_from=("launching",))

    async def _on_heartbeat(self, msg: Msg) -> None:
        # A heartbeat of a serving worker also proves readiness (covers a missed worker.ready).
        try:
            hb = decoder(WorkerHeartbeat).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        before = self._beats.get(hb.worker_id)
        self._beats[hb.worker_id] = reconcile.HeartbeatSeen(time.time(), hb.state)
        first = before is None or before.state == "loading"
        if first and hb.state in ("idle", "busy") and hb.deployment_id:
            dep = await self.deployments.get(hb.deployment_id)
            if dep is not None and dep.status == "launching" and dep.worker_id == hb.worker_id:
                await self._set_status(hb.deployment_id, "ready", only_from=("launching",))

    async def _on_worker_exited(self, msg: Msg) -> None:
        try:
            ev = decoder(WorkerExited).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.pending.pop(ev.worker_id, None)
        self._launched.pop(ev.worker_id, None)
        if ev.expected or not ev.deployment_id:
            return  # stopped on purpose; if its agent stopped, reconciliation notices once it is back
        reason = f"worker exited with code {ev.exit_code}: {ev.reason}"
        self._exited[ev.worker_id] = (reason, time.time())
        dep = await self.deployments.get(ev.deployment_id)
        if dep is None or dep.worker_id != ev.worker_id:
            return  # an older worker of a deployment that was relaunched already
        await self._set_status(ev.deployment_id, "failed", reason, only_from=("launching", "ready"), cause=reason)
        self.spawn(self.reconcile_now())

    def policy(self) -> reconcile.Policy:
        c = self.cfg
        return reconcile.Policy(
            agent_stale_s=c.gpu_stale_s,
            heartbeat_stale_s=c.heartbeat_stale_s,
            launch_grace_s=c.launch_grace_s,
            startup_grace_s=c.startup_grace_s,
            relaunch=c.replace_failed,
            max_attempts=c.max_replacements,
            failed_ttl_s=c.failed_ttl_s,
        )

    def observed(self, wall: float) -> reconcile.Observed:
        """What the deployer saw, on the wall clock (GPU reports are kept on the monotonic one)."""
        to_wall = wall - time.monotonic()
        agents: dict[str, reconcile.AgentSeen] = {}
        for (aid, index), seen in self.gpus.items():
            a = agents.get(aid)
            at = seen.at + to_wall
            gpus = {**(a.gpus if a else {}), index: seen.load.gpu_type}
            workers = (a.workers if a else frozenset()) | frozenset(seen.load.workers)
            agents[aid] = reconcile.AgentSeen(max(at, a.at if a else at), gpus, workers)
        return reconcile.Observed(
            agents=agents,
            heartbeats=dict(self._beats),
            exited={w: why for w, (why, _) in self._exited.items()},
            launched=dict(self._launched),
            since=self._observing_since,
        )

    def _forget_old(self, wall: float) -> None:
        keep = 600.0
        for w in [w for w, (_, at) in self._exited.items() if wall - at > keep]:
            del self._exited[w]
        for w in [w for w, b in self._beats.items() if wall - b.at > keep]:
            del self._beats[w]
        for w in [w for w, at in self._launched.items() if wall - at > keep]:
            del self._launched[w]
        for key in [k for k, s in self.gpus.items() if time.monotonic() - s.at > keep]:
            del self.gpus[key]

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reconcile_s)
            reconnects = self.nc.stats.get("reconnects", 0)
            if not self.nc.is_connected or reconnects != self._reconnects:
                self._reconnects = reconnects
                self._observing_since = time.time()  # what we missed meanwhile proves nothing
            try:
                await self.reconcile_now()
            except Exception:
                log.exception("reconcile failed")

    async def reconcile_now(self) -> None:
        """Compare the records with what agents and workers report, and act (``reconcile.reconcile``)."""
        async with self.lock:
            wall = time.time()
            self._forget_old(wall)
            deps = await self.deployments.values()
            actions = reconcile.reconcile(deps, self.observed(wall), self._attempts, wall, self.policy())
            for a in actions:
                try:
                    await self._act(a, wall)
                except errors.IServeError as e:
                    log.warning("reconcile action failed", action=a.kind, deployment_id=a.deployment_id, error=str(e))

    async def _act(self, a: reconcile.Action, wall: float) -> None:
        did = a.deployment_id
        if a.kind == "ready":
            await self._set_status(did, "ready", only_from=("launching", "failed"))
        elif a.kind == "fail":
            await self._set_status(did, "failed", a.reason, cause=a.cause)
        elif a.kind == "give_up":
            await self._set_status(did, "failed", a.reason, cause=a.cause, given_up=True)
        elif a.kind == "delete":
            await self.deployments.delete(did)
            self._attempts.pop(did, None)
            log.info("deployment deleted", deployment_id=did, reason=a.reason)
        else:
            dep = await self.deployments.get(did)
            if dep is None:
                return
            await self._set_status(did, "failed", a.reason, cause=a.cause)
            dep = await self.deployments.get(did)
            if dep is None:
                return
            self._attempts[did] = [t for t in self._attempts.get(did, []) if wall - t < 600.0] + [wall]
            if a.kind == "relaunch" and await self._relaunch(dep):
                return
            await self._replace(dep)

    async def _relaunch(self, dep: DeploymentRecord) -> bool:
        """Start the deployment's worker again, with a new id, on the same agent and GPUs. False when
        the agent refuses (its GPUs are taken meanwhile): the caller re-places it."""
        old = dep.worker_id
        try:  # a worker that is alive but not heard from (hung, cut off) must not serve twice
            await bus.request(
                self.nc, subjects.agent_stop(dep.agent_id), StopWorker(worker_id=old), StopReply, timeout=15.0
            )
        except errors.IServeError as e:
            log.info("stopping the old worker failed", worker_id=old, error=str(e))
        wid = new_worker_id(dep.deployment_id)
        failed = msgspec.structs.replace(dep)
        dep.worker_id = wid
        dep.status = "launching"
        dep.restarts += 1
        dep.reason = f"relaunched after: {dep.cause}"
        dep.updated_at = now()
        await self.deployments.put(dep.deployment_id, dep)
        self._launched[wid] = time.time()
        self.pending[wid] = reserved_by(dep)
        try:
            await bus.request(
                self.nc,
                subjects.agent_launch(dep.agent_id),
                launch_of(dep),
                LaunchReply,
                timeout=self.cfg.launch_timeout_s,
            )
        except errors.IServeError as e:
            self.pending.pop(wid, None)
            self._launched.pop(wid, None)
            await self.deployments.put(dep.deployment_id, failed)
            log.warning("relaunch refused; re-placing", deployment_id=dep.deployment_id, error=str(e))
            return False
        await self._changed(dep)
        log.info("deployment relaunched", deployment_id=dep.deployment_id, worker_id=wid, after=dep.cause)
        return True

    async def _replace(self, dep: DeploymentRecord) -> None:
        """Re-place a deployment whose worker is gone: same model, intent and id, decided afresh on the
        GPUs free now; if nothing fits, it stays failed with the reason (and is tried again later)."""
        why = dep.cause or dep.reason
        req = DeployRequest(
            model=dep.model,
            intent=dep.intent,
            placement=dep.placement_policy,
            deployment_id=dep.deployment_id,
            context_tokens=dep.context_tokens,
            max_batch=dep.max_batch,
            kv_tokens=dep.kv_tokens,
        )
        try:
            rep = await self._deploy(req, previous=dep)
        except errors.IServeError as e:
            await self._set_status(dep.deployment_id, "failed", f"{why}; could not re-place: {e.message}", cause=why)
            return
        log.info("deployment re-placed", deployment_id=dep.deployment_id, config=rep.deployment.config.key(), after=why)

    # ------------------------------------------------------------------ undeploy and list

    async def handle_undeploy(self, req: UndeployRequest, _msg: Msg) -> UndeployReply:
        async with self.lock:  # never while reconciliation relaunches it
            return await self._undeploy(req)

    async def _undeploy(self, req: UndeployRequest) -> UndeployReply:
        dep = await self.deployments.get(req.deployment_id)
        if dep is None:
            raise errors.NotFound(f"no deployment {req.deployment_id!r}; list them with `iserve status`.")
        stopped = False
        try:
            r = await bus.request(
                self.nc, subjects.agent_stop(dep.agent_id), StopWorker(worker_id=dep.worker_id), StopReply, timeout=30.0
            )
            stopped = r.stopped
        except errors.Unavailable:
            log.warning("agent unavailable on undeploy; removing the record", agent_id=dep.agent_id)
        self.pending.pop(dep.worker_id, None)
        self._attempts.pop(req.deployment_id, None)
        await self.deployments.delete(req.deployment_id)
        dep.status = "stopped"
        dep.updated_at = now()
        await self._changed(dep)
        log.info("undeployed", deployment_id=req.deployment_id, worker_stopped=stopped)
        return UndeployReply(deployment_id=req.deployment_id, status="stopped")

    async def handle_list(self, req: ListDeployments, _msg: Msg) -> DeploymentList:
        deps = [d for d in await self.deployments.values() if not req.model or d.model == req.model]
        deps.sort(key=lambda d: d.created_at)
        scaling = self.autoscaler.listing() if self.autoscaler is not None else []
        return DeploymentList(deployments=deps, autoscaling=scaling)
