"""The deployer: answers ``deploy.request`` with the best feasible configuration for the intent on the
GPUs free now (``planner.plan_gpu_types``), launches its worker through the GPU agent, and keeps every
deployment's record durable in JetStream (bucket ``iserve_deployments``).

GPU state comes from the agents' per-second ``gpu.load`` reports. Between a launch and the first
report that shows the new worker, the deployer counts the worker's memory as pending so that two
quick deployments never plan onto the same free memory. Decisions are serialized by one lock.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, errors, subjects
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
    LaunchWorker,
    ListDeployments,
    ModelRecord,
    StageSpec,
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

from . import planner
from .config import DeployerConfig
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
        self._replacements: dict[str, list[float]] = {}

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

    async def subscribe(self) -> None:
        await self.serve(subjects.DEPLOY_REQUEST, DeployRequest, self.handle_deploy, queue="deployer")
        await self.serve(subjects.UNDEPLOY_REQUEST, UndeployRequest, self.handle_undeploy, queue="deployer")
        await self.serve(subjects.DEPLOYMENT_LIST, ListDeployments, self.handle_list, queue="deployer")
        await self.listen(subjects.GPU_LOAD_ALL, self._on_gpu_load)
        await self.listen(subjects.WORKER_READY, self._on_worker_ready)
        await self.listen(subjects.WORKER_EXITED, self._on_worker_exited)
        await self.listen(subjects.WORKER_HEARTBEAT + ".>", self._on_heartbeat)

    async def started(self) -> None:
        self._started = time.monotonic()
        self.spawn(self._reconcile_loop())
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

    async def _deploy(self, req: DeployRequest) -> DeployReply:
        if req.deployment_id and not bus.valid_key(req.deployment_id):
            raise errors.BadRequest(
                f"deployment id {req.deployment_id!r} is not usable: use letters, digits, '-', '_' and single dots; "
                "or leave it empty for one made up."
            )
        if req.deployment_id:
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
        gpus = self.gpu_states()
        arch = record.arch
        t0 = time.perf_counter()
        profiles = {t: await self.profiles.get(bus.kv_key(req.model, t)) for t in types}

        def plan_with(batch: int) -> planner.TypeChoice:
            return planner.plan_gpu_types(
                profiles,
                req.intent,
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
        worker_id = f"w-{dep_id}-{uuid.uuid4().hex[:4]}"  # a re-placed deployment gets a new worker
        agent_id = decision.assignments[0].agent_id
        ts = now()
        dep = DeploymentRecord(
            deployment_id=dep_id,
            model=req.model,
            model_path=record.path,
            gpu_type=cmap.gpu_type,
            config=decision.estimate.config,
            estimate=decision.estimate,
            intent=req.intent,
            placement_policy=policy,
            gpus=decision.assignments,
            agent_id=agent_id,
            worker_id=worker_id,
            context_tokens=context,
            status="launching",
            created_at=ts,
            updated_at=ts,
            max_batch=max_batch,
            kv_tokens=kv_tokens,
        )
        await self.deployments.put(dep_id, dep)
        self.pending[worker_id] = {(a.agent_id, a.gpu_index): a.memory_bytes for a in decision.assignments}
        launch = LaunchWorker(
            worker_id=worker_id,
            deployment_id=dep_id,
            model=req.model,
            model_path=record.path,
            config=dep.config,
            stages=[
                StageSpec(
                    gpu_index=a.gpu_index,
                    first_layer=a.first_layer,
                    num_layers=a.num_layers,
                    memory_bytes=a.memory_bytes,
                )
                for a in decision.assignments
            ],
            context_tokens=context,
            max_batch=max_batch,
            kv_tokens=kv_tokens,
        )
        try:
            await bus.request(
                self.nc, subjects.agent_launch(agent_id), launch, LaunchReply, timeout=self.cfg.launch_timeout_s
            )
        except errors.IServeError as e:
            self.pending.pop(worker_id, None)
            dep.status = "failed"
            dep.reason = f"launch on agent {agent_id} failed: {e.message}"
            dep.updated_at = now()
            await self.deployments.delete(dep_id)
            raise errors.Unavailable(f"{dep.reason}; nothing was deployed, try again.") from None
        await self._changed(dep)
        log.info(
            "deployed",
            deployment_id=dep_id,
            config=dep.config.key(),
            gpus=[(a.agent_id, a.gpu_index, a.num_layers) for a in decision.assignments],
            decision_ms=round(decision_ms, 3),
            max_batch=max_batch,
            kv_tokens=kv_tokens,
            why=decision.why,
        )
        return DeployReply(
            deployment=dep,
            why=decision.why,
            rejected=decision.rejected,
            latency_ms=decision.latency_ms,
            cost=decision.cost,
            decision_ms=decision_ms,
            filtered=decision.filtered,
        )

    async def _changed(self, dep: DeploymentRecord) -> None:
        await self.nc.publish(subjects.DEPLOYMENT_CHANGED, encode(DeploymentChanged(deployment=dep)))

    async def _set_status(
        self, deployment_id: str, status: str, reason: str = "", *, only_from: tuple[str, ...] = ()
    ) -> None:
        dep = await self.deployments.get(deployment_id)
        if (
            dep is None
            or (only_from and dep.status not in only_from)
            or (dep.status == status and dep.reason == reason)
        ):
            return  # (a failed deployment that could not be re-placed keeps "failed" and gets the longer reason)
        dep.status = status  # type: ignore[assignment]
        dep.reason = reason
        dep.updated_at = now()
        await self.deployments.put(deployment_id, dep)
        await self._changed(dep)
        log.info("deployment status", deployment_id=deployment_id, status=status, reason=reason)

    async def _on_worker_ready(self, msg: Msg) -> None:
        try:
            ev = decoder(WorkerReady).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        await self._set_status(ev.deployment_id, "ready", only_from=("launching",))

    async def _on_heartbeat(self, msg: Msg) -> None:
        # A heartbeat of a serving worker also proves readiness (covers a missed worker.ready).
        try:
            hb = decoder(WorkerHeartbeat).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        if hb.state in ("idle", "busy") and hb.deployment_id:
            dep = await self.deployments.get(hb.deployment_id)
            if dep is not None and dep.status == "launching":
                await self._set_status(hb.deployment_id, "ready", only_from=("launching",))

    async def _on_worker_exited(self, msg: Msg) -> None:
        try:
            ev = decoder(WorkerExited).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.pending.pop(ev.worker_id, None)
        if ev.expected or not ev.deployment_id:
            return
        dep = await self.deployments.get(ev.deployment_id)
        if dep is None or dep.worker_id != ev.worker_id:
            return  # an older worker of a deployment that was re-placed already
        reason = f"worker exited with code {ev.exit_code}: {ev.reason}"
        await self._set_status(ev.deployment_id, "failed", reason, only_from=("launching", "ready"))
        if self.cfg.replace_failed:
            self.spawn(self._replace(ev.deployment_id, reason))

    async def _replace(self, deployment_id: str, why: str) -> None:
        """Re-place a deployment whose worker died: same model, intent and id, decided afresh on the
        GPUs free now. After ``max_replacements`` tries in ten minutes it stays failed."""
        now_m = time.monotonic()
        tries = [t for t in self._replacements.get(deployment_id, []) if now_m - t < 600] + [now_m]
        self._replacements[deployment_id] = tries
        if len(tries) > self.cfg.max_replacements:
            await self._set_status(
                deployment_id, "failed", f"{why}; not re-placed: {len(tries) - 1} re-placements in 10 minutes already"
            )
            return
        dep = await self.deployments.get(deployment_id)
        if dep is None or dep.status != "failed":
            return
        req = DeployRequest(
            model=dep.model,
            intent=dep.intent,
            placement=dep.placement_policy,
            deployment_id=deployment_id,
            context_tokens=dep.context_tokens,
            max_batch=dep.max_batch,
            kv_tokens=dep.kv_tokens,
        )
        try:
            async with self.lock:
                rep = await self._deploy(req)
        except errors.IServeError as e:
            await self._set_status(deployment_id, "failed", f"{why}; could not re-place: {e.message}")
            return
        log.info("deployment re-placed", deployment_id=deployment_id, config=rep.deployment.config.key(), after=why)

    async def _reconcile_loop(self) -> None:
        """Deployments whose worker no agent reports (the deployer or an agent restarted, a worker
        vanished) are marked failed, so that the cluster view and the records agree."""
        while True:
            await asyncio.sleep(self.cfg.reconcile_s)
            if time.monotonic() - self._started < 3 * self.cfg.gpu_stale_s:
                continue  # let the agents report first
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconcile failed")

    async def _reconcile(self) -> None:
        fresh = time.monotonic() - self.cfg.gpu_stale_s
        live_agents = {k[0] for k, s in self.gpus.items() if s.at >= fresh}
        workers = {w for s in self.gpus.values() if s.at >= fresh for w in s.load.workers}
        for dep in await self.deployments.values():
            if dep.status not in ("launching", "ready"):
                continue
            age = now() - dep.updated_at
            if dep.agent_id not in live_agents:
                if age > 3 * self.cfg.gpu_stale_s:
                    await self._set_status(dep.deployment_id, "failed", f"agent {dep.agent_id} stopped reporting")
            elif dep.worker_id not in workers and dep.worker_id not in self.pending and age > 3 * self.cfg.gpu_stale_s:
                await self._set_status(
                    dep.deployment_id, "failed", f"worker {dep.worker_id} is no longer running on agent {dep.agent_id}"
                )

    # ------------------------------------------------------------------ undeploy and list

    async def handle_undeploy(self, req: UndeployRequest, _msg: Msg) -> UndeployReply:
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
        await self.deployments.delete(req.deployment_id)
        dep.status = "stopped"
        dep.updated_at = now()
        await self._changed(dep)
        log.info("undeployed", deployment_id=req.deployment_id, worker_stopped=stopped)
        return UndeployReply(deployment_id=req.deployment_id, status="stopped")

    async def handle_list(self, req: ListDeployments, _msg: Msg) -> DeploymentList:
        deps = [d for d in await self.deployments.values() if not req.model or d.model == req.model]
        deps.sort(key=lambda d: d.created_at)
        return DeploymentList(deployments=deps)
