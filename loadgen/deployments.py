"""The deployment and recording side of a live replay: the run clock and the run directory's writer,
the GPU-load and deployment listeners, registering, deploying and undeploying models.
:class:`~iserve.loadgen.replay.Replayer` adds the client side (sending the trace's requests)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.console import Console

from iserve import errors, quality, subjects
from iserve import slo as slo_mod
from iserve.client import Client
from iserve.messages import ConfigEstimate, DeploymentChanged, DeploymentRecord, GpuLoad, Intent, decoder

from .config import LoadgenConfig
from .records import DeploymentEvent, GpuSample, RunWriter
from .traces import fit_lengths


class Interrupted(Exception):
    """The run was stopped (Ctrl-C) before it finished setting up."""


@dataclass
class ModelSlot:
    """A ready deployment that requests can be sent to."""

    model: str
    deployment_id: str
    context_tokens: int
    gpu_type: str
    config: str
    reference: ConfigEstimate | None = None  # for --slo-scale: minimum parallelism, fp16
    ours: bool = True  # deployed by this run (undeployed at the end)


def config_key(d: DeploymentRecord) -> str:
    return d.config.key()


def gpu_list(d: DeploymentRecord) -> list[str]:
    return [f"{g.agent_id}/{g.gpu_index}:{g.num_layers}" for g in d.gpus]


class DeploymentSide:
    """A live run's clock, records and deployments; ``stop`` (an event) ends the run early."""

    def __init__(self, cfg: LoadgenConfig, *, stop: asyncio.Event | None = None, console: Console | None = None):
        self.cfg = cfg
        self.stop = stop or asyncio.Event()
        self.err = console or Console(stderr=True)
        self.client: Client | None = None
        self.writer: RunWriter | None = None
        self.t0_mono: float | None = None
        self.t0_unix: float | None = None
        self._pending: list[tuple[str, msgspec.Struct, float]] = []  # written once the clock starts
        self.ready_names: list[str] = []  # models in the order they became ready
        self.slots: dict[str, list[ModelSlot]] = {}
        self.deployed: list[str] = []  # deployment ids this run made
        self._seen_status: dict[str, str] = {}
        self._gpu_latest: dict[tuple[str, int], tuple[GpuLoad, float]] = {}
        self._gpu_written: dict[tuple[str, int], float] = {}
        self._subs: list = []
        self._background: list[asyncio.Task] = []
        self._awaiting_reply: set[str] = set()  # deployment ids whose deploy request has not been answered
        self._intent_recorded = False  # meta.json holds the first deployment's intent
        self.intent_prompt = 512  # lengths the intent's latency is estimated for (set by run())
        self.intent_output = 128

    # ------------------------------------------------------------------ clock and output

    def now_s(self) -> float:
        """Seconds on the run clock (0 = start of the replay)."""
        assert self.t0_mono is not None
        return time.monotonic() - self.t0_mono

    def _now_unix(self) -> float:
        """The current Unix time on the run's clock: once the clock runs, ``t0_unix`` plus monotonic
        seconds, so event times agree exactly with the replay's (monotonic) schedule."""
        if self.t0_unix is None or self.t0_mono is None:
            return time.time()
        return self.t0_unix + (time.monotonic() - self.t0_mono)

    def _emit(self, kind: str, rec: msgspec.Struct, unix: float) -> None:
        """Write a GPU sample or deployment event; before the clock starts it waits in memory and gets
        its (negative) time when the clock starts."""
        if self.writer is None:
            return
        if self.t0_unix is None:
            self._pending.append((kind, rec, unix))
            return
        rec.t_s = unix - self.t0_unix  # type: ignore[attr-defined]
        getattr(self.writer, kind)(rec)

    def _start_clock(self) -> None:
        self.t0_mono = time.monotonic()
        self.t0_unix = time.time()
        pending, self._pending = self._pending, []
        for kind, rec, unix in pending:
            self._emit(kind, rec, unix)
        assert self.writer is not None
        self.writer.update_meta(t0_unix=self.t0_unix)

    async def _guard(self, coro):
        """Await ``coro`` unless the run is stopped first (then raise ``Interrupted``)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise Interrupted()

    async def _sleep_until(self, t_s: float) -> bool:
        """Sleep until run time ``t_s``; False if the run was stopped meanwhile."""
        delay = t_s - self.now_s()
        if self.stop.is_set():
            return False
        if delay <= 0:
            return True
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=delay)
            return False
        except asyncio.TimeoutError:
            return True

    # ------------------------------------------------------------------ listeners

    def _on_gpu_load(self, msg) -> None:
        try:
            g = decoder(GpuLoad).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self._gpu_latest[(g.agent_id, g.gpu_index)] = (g, g.ts or self._now_unix())

    async def _gpu_sampler(self) -> None:
        """Every ``sample_s``, write the newest report of every GPU that sent a new one."""
        while True:
            for key, (g, ts) in list(self._gpu_latest.items()):
                if self._gpu_written.get(key) == ts:
                    continue
                self._gpu_written[key] = ts
                sample = GpuSample(
                    t_s=0.0,
                    agent_id=g.agent_id,
                    gpu_index=g.gpu_index,
                    total_bytes=g.total_bytes,
                    used_bytes=g.used_bytes,
                    busy_fraction=g.busy_fraction,
                    util_percent=g.util_percent,
                    workers=len(g.workers),
                    gpu_type=g.gpu_type,
                    free_bytes=g.free_bytes,
                    window_s=g.window_s,
                    simulated=g.simulated,
                )
                self._emit("gpu", sample, ts)
            await asyncio.sleep(self.cfg.sample_s)

    def _deployment_event(self, d: DeploymentRecord, status: str = "", *, reason: str = "", **extra) -> None:
        """Record a deployment's state (once per deployment and status)."""
        status = status or d.status
        if self._seen_status.get(d.deployment_id) == status:
            return
        self._seen_status[d.deployment_id] = status
        ev = DeploymentEvent(
            t_s=0.0,
            model=d.model,
            deployment_id=d.deployment_id,
            config=config_key(d),
            gpus=gpu_list(d),
            total_bytes=d.estimate.total_bytes,
            status=status,
            reason=reason or d.reason,
            gpu_type=d.gpu_type,
            context_tokens=d.context_tokens,
            **extra,
        )
        self._emit("deployment", ev, self._now_unix())

    def _on_deploy_changed(self, msg) -> None:
        try:
            ev = decoder(DeploymentChanged).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        d = ev.deployment
        if d.status == "launching" and d.deployment_id in self._awaiting_reply:
            return  # _deploy writes it from the reply
        self._deployment_event(d)

    async def _listen(self) -> None:
        assert self.client is not None
        nc = self.client.nc

        async def gpu_cb(msg):
            self._on_gpu_load(msg)

        async def dep_cb(msg):
            self._on_deploy_changed(msg)

        self._subs.append(await nc.subscribe(subjects.GPU_LOAD_ALL, cb=gpu_cb))
        self._subs.append(await nc.subscribe(subjects.DEPLOYMENT_CHANGED, cb=dep_cb))
        self._background.append(asyncio.create_task(self._gpu_sampler()))

    # ------------------------------------------------------------------ models and deployments

    async def _resolve_models(self) -> list[str]:
        """Register the checkpoint folders among ``--models``; wait until every model is profiled."""
        assert self.client is not None
        resolved: dict[str, str] = {}  # --models entry -> model name (an entry may repeat: one more replica)
        for m in self.cfg.models:
            if m in resolved:
                continue
            p = Path(m)
            if p.is_dir():
                info = await self._guard(self.client.register(str(p.resolve()), timeout=120.0))
                self.err.print(
                    f"[dim]registered {info.record.name} ({'new' if info.created else 'already registered'})[/]"
                )
            else:
                info = await self._guard(self.client.model(m))
            resolved[m] = info.record.name
        names = [resolved[m] for m in self.cfg.models]
        for n in dict.fromkeys(names):
            if (await self.client.model(n)).record.status != "profiled":
                self.err.print(f"[dim]waiting for {n} to be profiled…[/]")
            await self._guard(self.client.wait_profiled(n, timeout=self.cfg.ready_timeout_s))
        return names

    async def _reference(self, model: str, gpu_type: str) -> ConfigEstimate:
        assert self.client is not None
        cmap = await self.client.profile(model, gpu_type)
        return slo_mod.reference_estimate(cmap.estimates)

    async def _intent(self, model: str) -> Intent:
        """The deployment intent; with ``--slo-scale`` and ``latency-slo`` its SLO is the scale times
        the model's reference latency for the intent's lengths."""
        assert self.client is not None
        cmap = await self.client.profile(model)
        # the replayed requests' median lengths, fitted into the context the model was profiled for
        fitted = fit_lengths(self.intent_prompt, self.intent_output, max_context=0, model_context=cmap.context_tokens)
        intent = self.cfg.intent_for(fitted.prompt_tokens, fitted.output_tokens)
        if intent.kind == "latency-slo" and intent.slo_ms is None and self.cfg.slo_scale:
            ref = slo_mod.reference_estimate(cmap.estimates)
            try:
                intent.slo_ms = slo_mod.slo_ms(ref, intent.prompt_tokens, intent.output_tokens, self.cfg.slo_scale)
            except ValueError as e:
                raise errors.BadRequest(f"cannot set the latency-slo intent of {model}: {e}") from None
        return intent

    def _add_slot(self, slot: ModelSlot) -> None:
        self.slots.setdefault(slot.model, []).append(slot)
        if slot.model not in self.ready_names:
            self.ready_names.append(slot.model)

    async def _deploy(self, model: str) -> ModelSlot | None:
        """Deploy ``model`` (or reuse a ready deployment with ``--reuse-deployments``), wait until it is
        ready, and make it available to requests. A refused or failed deployment is recorded and
        reported, and returns None."""
        assert self.client is not None
        c = self.client
        if self.cfg.reuse_deployments:
            for d in (await c.deployments(model)).deployments:
                if d.status == "ready":
                    ref = await self._reference(model, d.gpu_type) if self.cfg.slo_scale else None
                    slot = ModelSlot(
                        model, d.deployment_id, d.context_tokens, d.gpu_type, config_key(d), ref, ours=False
                    )
                    self._add_slot(slot)
                    self._deployment_event(d, "ready", why="reused an existing deployment")
                    return slot
        # our own id (same form as the deployer's), so the deploy.changed "launching" event can be
        # told apart: the reply's record is written instead, with the decision's details
        dep_id = f"{model}-{uuid.uuid4().hex[:8]}"
        self._awaiting_reply.add(dep_id)
        self._emit(
            "deployment",
            DeploymentEvent(t_s=0.0, model=model, deployment_id=dep_id, config="", status="requested"),
            self._now_unix(),
        )
        try:
            intent = await self._intent(model)
            if self.writer is not None and not self._intent_recorded:
                self._intent_recorded = True
                self.writer.update_meta(intent=intent)
            pending = asyncio.ensure_future(
                c.deploy(
                    model, intent, placement=self.cfg.placement, deployment_id=dep_id, max_batch=self.cfg.max_batch
                )
            )
            try:
                rep = await asyncio.shield(pending)
            except asyncio.CancelledError:
                # Interrupted (Ctrl-C) while the deployer decides: wait for its answer, so that what it
                # deploys is known and undeployed with the rest, then stop.
                with contextlib.suppress(Exception):
                    self.deployed.append((await asyncio.wait_for(pending, timeout=60.0)).deployment.deployment_id)
                raise
        except errors.IServeError as e:
            self._emit(
                "deployment",
                DeploymentEvent(t_s=0.0, model=model, deployment_id=dep_id, config="", status="failed", reason=str(e)),
                self._now_unix(),
            )
            self.err.print(f"[yellow]deploying {model} failed:[/] {e}")
            return None
        finally:
            self._awaiting_reply.discard(dep_id)
        d = rep.deployment
        self.deployed.append(d.deployment_id)
        self._deployment_event(
            d,
            "launching",
            why=rep.why,
            decision_ms=rep.decision_ms,
            latency_ms=rep.latency_ms,
            quality=quality.short_of(rep.quality_cost, d.config),
        )
        self.err.print(f"[dim]deploying {model}: {d.config.key()} on {', '.join(gpu_list(d))} ({rep.why})[/]")
        try:
            ready = await c.wait_ready(d.deployment_id, timeout=self.cfg.ready_timeout_s)
        except errors.IServeError as e:
            self._deployment_event(d, "failed", reason=str(e))
            self.err.print(f"[yellow]deployment {d.deployment_id} of {model} did not become ready:[/] {e}")
            return None
        self._deployment_event(ready, "ready")
        await self._await_scheduler(ready.deployment_id)
        ref = await self._reference(model, ready.gpu_type) if self.cfg.slo_scale else None
        slot = ModelSlot(model, ready.deployment_id, ready.context_tokens, ready.gpu_type, config_key(ready), ref)
        self._add_slot(slot)
        return slot

    async def _await_scheduler(self, deployment_id: str, timeout_s: float = 30.0) -> None:
        """Wait until the scheduler routes to a deployment the deployer reports ready (it learns of it
        from the same event, possibly a moment later), so no request is refused in between."""
        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if any(q.deployment_id == deployment_id for q in (await self.client.scheduler_stats()).queues):
                    return
            except errors.IServeError:
                pass
            await asyncio.sleep(0.1)
        self.err.print(
            f"[yellow]the scheduler does not list deployment {deployment_id} {timeout_s:.0f} s after it became "
            "ready; requests to it may be refused[/]"
        )

    async def _deploy_later(self, model: str, at_s: float) -> None:
        if await self._sleep_until(at_s):
            await self._deploy(model)

    async def _undeploy_ours(self) -> None:
        assert self.client is not None
        for dep_id in self.deployed:
            try:
                rep = await asyncio.wait_for(self.client.undeploy(dep_id), timeout=30.0)
                self.err.print(f"[dim]undeployed {dep_id}: {rep.status}[/]")
            except (errors.IServeError, asyncio.TimeoutError) as e:
                self.err.print(f"[yellow]undeploying {dep_id} failed:[/] {e}")
