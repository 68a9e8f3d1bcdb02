"""The scheduler: accepts streamed inference requests (``infer``), queues them FCFS per deployment
(``queues.FcfsQueues``), sends each to the deployment's worker as soon as one of its ``max_batch``
slots is free (the worker batches the requests it runs) and relays the worker's token stream to the
client's inbox.

Protocol seen by a client: request ``infer`` with an ``InferRequest`` whose ``stream_to`` is an inbox
the client already listens on; the immediate reply is ``Accepted`` (or an ``ErrorReply``); then the
inbox receives ``TokenChunk``s and one ``Completion`` or ``ErrorReply``. While the scheduler holds a
request (queued or running) it also sends an empty keep-alive to the inbox every ``keepalive_s``
(``Accepted.keepalive_s``), so the client fails fast when the scheduler dies; a running request whose
worker stops heartbeating for ``worker_silent_s`` ends with ``worker_died``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, errors, subjects
from iserve.messages import (
    Accepted,
    CancelRequest,
    Completion,
    DeploymentChanged,
    DeploymentList,
    DeploymentRecord,
    ErrorReply,
    GenerateRequest,
    GetSchedulerStats,
    InferRequest,
    ListDeployments,
    ModelRecord,
    QueueStats,
    SchedulerLoad,
    SchedulerStats,
    StreamMessage,
    WorkerHeartbeat,
    decoder,
    encode,
)
from iserve.service import Service
from iserve.stats import percentile

from .config import SchedulerConfig
from .load_report import Window, replica_loads
from .queues import FcfsQueues, Queued

log = structlog.get_logger()


def stream_lost_in_reconnect(last_msg: float, reconnected_at: float | None, now: float, silent_s: float) -> bool:
    """A running request's stream is lost when the bus reconnected after its last message and nothing
    came for ``silent_s`` since: NATS drops what is published to a subscriber while it is disconnected."""
    return reconnected_at is not None and reconnected_at >= last_msg and now - reconnected_at >= silent_s


@dataclass
class ReplicaStats:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)

    def record(self, c: Completion, e2e_ms: float, keep: int = 1000) -> None:
        self.completed += 1
        if c.finish_reason == "cancelled":
            self.cancelled += 1
        for lst, v in ((self.ttft_ms, c.ttft_ms), (self.tpot_ms, c.tpot_ms), (self.e2e_ms, e2e_ms)):
            lst.append(v)
            if len(lst) > keep:
                del lst[: len(lst) - keep]


class SchedulerService(Service):
    def __init__(self, cfg: SchedulerConfig, nc: NATS):
        super().__init__(nc)
        self.cfg = cfg
        self.queues: FcfsQueues[InferRequest] = FcfsQueues()
        self.deployments: dict[str, DeploymentRecord] = {}
        self.stats: dict[str, ReplicaStats] = {}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.runners: dict[str, asyncio.Task] = {}  # deployment id -> its dispatcher
        self.relays: dict[str, set[asyncio.Task]] = {}  # deployment id -> its running requests' relays
        self.heartbeats: dict[str, WorkerHeartbeat] = {}  # worker id -> latest, for deployed workers
        self.beat_at: dict[str, float] = {}  # worker id -> monotonic time of its latest heartbeat
        self.models_kv: bus.TypedKV[ModelRecord] | None = None
        self._missing: dict[str, int] = {}  # deployment id -> listings in a row that lacked it
        self.windows: dict[str, Window] = {}  # deployment id -> since the previous scheduler.load report
        self.scheduler_id = f"s-{uuid.uuid4().hex[:8]}"

    async def setup(self) -> None:
        self.models_kv = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_MODELS, ModelRecord, replicas=self.cfg.kv_replicas
        )

    async def subscribe(self) -> None:
        await self.serve(subjects.INFER, InferRequest, self.handle_infer, queue="scheduler")
        await self.serve(subjects.INFER_CANCEL, CancelRequest, self.handle_cancel)
        await self.serve(subjects.SCHEDULER_STATS, GetSchedulerStats, self.handle_stats)
        await self.listen(subjects.DEPLOYMENT_CHANGED, self._on_deployment_changed)
        await self.listen(subjects.WORKER_HEARTBEAT + ".>", self._on_heartbeat)

    async def started(self) -> None:
        await self.refresh_deployments()
        self.spawn(self._refresh_loop())
        self.spawn(self._expire_loop())
        if self.cfg.keepalive_s > 0:
            self.spawn(self._keepalive_loop())
        if self.cfg.publish_load_s > 0:
            self.spawn(self._publish_load_loop())
        log.info("scheduler started", deployments=len(self.deployments))

    # ------------------------------------------------------------------ deployments

    def _apply(self, d: DeploymentRecord) -> None:
        if d.status == "ready":
            old = self.deployments.get(d.deployment_id)
            if old is not None and old.worker_id != d.worker_id:
                self.heartbeats.pop(old.worker_id, None)
            self.deployments[d.deployment_id] = d
            self.queues.add_replica(d.deployment_id, d.model, d.max_batch, draining=d.draining)
            self.stats.setdefault(d.deployment_id, ReplicaStats())
            ev = self.wakeups.setdefault(d.deployment_id, asyncio.Event())
            if d.deployment_id not in self.runners:
                self.runners[d.deployment_id] = self.spawn(self._runner(d.deployment_id, ev))
            ev.set()
        else:
            self._drop(
                d.deployment_id, f"deployment {d.deployment_id} is {d.status}" + (f": {d.reason}" if d.reason else "")
            )

    def _drop(self, deployment_id: str, why: str) -> None:
        d = self.deployments.pop(deployment_id, None)
        if d is not None:
            self.heartbeats.pop(d.worker_id, None)
            self.beat_at.pop(d.worker_id, None)
        self._missing.pop(deployment_id, None)
        runner = self.runners.pop(deployment_id, None)
        if runner is not None:
            runner.cancel()
        for relay in self.relays.pop(deployment_id, set()):
            relay.cancel()
        self.wakeups.pop(deployment_id, None)
        self.windows.pop(deployment_id, None)
        r = self.queues.replicas.get(deployment_id)
        running = set(r.running) if r is not None else set()
        for q in self.queues.remove_replica(deployment_id):
            if q.request_id in running:
                # it may have streamed tokens already: never run again elsewhere, fail it
                self.stats.setdefault(deployment_id, ReplicaStats()).failed += 1
                self.spawn(
                    self._send_error(
                        q.payload,
                        errors.WorkerDied(
                            f"{why}; the request was running there and is not retried (tokens may have been "
                            "streamed already); send it again."
                        ),
                    )
                )
                continue
            # a queued one: re-queue on another replica of the model if there is one, else fail it
            other = self.queues.enqueue(q)
            if other is not None:
                self.wakeups[other.deployment_id].set()
            else:
                self.spawn(
                    self._send_error(q.payload, errors.Unavailable(f"{why}; no other replica of {q.model} is ready."))
                )

    async def refresh_deployments(self) -> None:
        try:
            lst = await bus.request(self.nc, subjects.DEPLOYMENT_LIST, ListDeployments(), DeploymentList, timeout=5.0)
        except errors.IServeError as e:
            log.debug("deployment list unavailable", error=str(e))
            return
        seen = set()
        for d in lst.deployments:
            seen.add(d.deployment_id)
            self._missing.pop(d.deployment_id, None)
            known = self.deployments.get(d.deployment_id)
            if d.status == "ready" and (known is None or known.draining != d.draining):
                self._apply(d)
            elif d.status != "ready" and d.deployment_id in self.deployments:
                self._apply(d)
        # An undeploy arrives as a deploy.changed event; a listing only removes a replica that two
        # listings in a row lack (a missed event), so one odd listing cannot fail running requests.
        for gone in set(self.deployments) - seen:
            self._missing[gone] = self._missing.get(gone, 0) + 1
            if self._missing[gone] >= 2:
                self._missing.pop(gone, None)
                self._drop(gone, f"deployment {gone} was removed")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.refresh_s)
            await self.refresh_deployments()

    async def _on_deployment_changed(self, msg: Msg) -> None:
        try:
            ev = decoder(DeploymentChanged).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self._apply(ev.deployment)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decoder(WorkerHeartbeat).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        d = self.deployments.get(hb.deployment_id)
        if d is not None and d.worker_id == hb.worker_id:
            self.heartbeats[hb.worker_id] = hb
            self.beat_at[hb.worker_id] = time.monotonic()

    # ------------------------------------------------------------------ requests

    async def handle_infer(self, req: InferRequest, _msg: Msg) -> Accepted:
        if not req.stream_to:
            raise errors.BadRequest(
                "InferRequest.stream_to is empty; subscribe to an inbox and put its subject there.",
                request_id=req.request_id,
            )
        if not req.request_id:
            raise errors.BadRequest("InferRequest.request_id is empty; give each request a unique id.")
        if self.queues.full(req.model, req.deployment_id, self.cfg.max_queued):
            raise errors.Overloaded(
                f"{req.model} already has {self.cfg.max_queued} requests waiting on every replica; retry later, "
                "or deploy another replica.",
                request_id=req.request_id,
            )
        now = time.monotonic()
        item = Queued(req.request_id, req.model, now, now + req.timeout_s, req)
        replica = self.queues.enqueue(item, req.deployment_id)
        if replica is None:
            # a deployment may have turned ready a moment ago (event still in flight): look again
            await self.refresh_deployments()
            replica = self.queues.enqueue(item, req.deployment_id)
        if replica is None:
            await self._explain_no_replica(req)
        assert replica is not None  # _explain_no_replica raised otherwise
        self.windows.setdefault(replica.deployment_id, Window()).arrived += 1
        self.wakeups[replica.deployment_id].set()
        return Accepted(
            request_id=req.request_id,
            deployment_id=replica.deployment_id,
            queue_depth=len(replica.queue),
            keepalive_s=self.cfg.keepalive_s,
        )

    async def _explain_no_replica(self, req: InferRequest) -> None:
        if req.deployment_id:
            raise errors.NotFound(
                f"deployment {req.deployment_id} of {req.model} is not ready; list deployments with `iserve status`.",
                request_id=req.request_id,
            )
        record = await self.models_kv.get(req.model) if self.models_kv else None
        if record is None:
            raise errors.NotFound(
                f"model {req.model!r} is not registered; register it with `iserve register PATH`.",
                request_id=req.request_id,
            )
        raise errors.NotReady(
            f"model {req.model!r} has no ready deployment; deploy it with `iserve deploy {req.model}` (or wait for a "
            "launch in progress).",
            request_id=req.request_id,
        )

    async def handle_cancel(self, req: CancelRequest, _msg: Msg) -> None:
        dep, item, running = self.queues.cancel(req.request_id)
        if item is None:
            return
        if running:
            d = self.deployments.get(dep)
            if d is not None:
                await self.nc.publish(subjects.worker_cancel(d.worker_id), encode(req))
        else:
            self.stats.setdefault(dep, ReplicaStats()).cancelled += 1
            await self._send_error(item.payload, errors.Cancelled("the request was cancelled before it started."))

    async def handle_stats(self, _req: GetSchedulerStats, _msg: Msg) -> SchedulerStats:
        out = []
        for dep_id, d in sorted(self.deployments.items()):
            s = self.stats.get(dep_id, ReplicaStats())
            r = self.queues.replicas.get(dep_id)
            hb = self.heartbeats.get(d.worker_id)
            out.append(
                QueueStats(
                    deployment_id=dep_id,
                    model=d.model,
                    worker_id=d.worker_id,
                    queue_depth=len(r.queue) if r else 0,
                    in_flight=len(r.running) if r else 0,
                    completed=s.completed,
                    failed=s.failed,
                    ttft_ms_p50=statistics.median(s.ttft_ms) if s.ttft_ms else 0.0,
                    tpot_ms_p50=statistics.median(s.tpot_ms) if s.tpot_ms else 0.0,
                    e2e_ms_p50=statistics.median(s.e2e_ms) if s.e2e_ms else 0.0,
                    e2e_ms_p99=percentile(s.e2e_ms, 99, empty=0.0),
                    cancelled=s.cancelled,
                    timed_out=s.timed_out,
                    max_batch=r.slots if r else d.max_batch,
                    kv_blocks_used=hb.kv_blocks_used if hb else 0,
                    kv_blocks_total=hb.kv_blocks_total if hb else 0,
                )
            )
        return SchedulerStats(queues=out)

    async def _send_error(self, req: InferRequest, err: errors.IServeError) -> None:
        err.request_id = req.request_id
        try:
            await self.nc.publish(req.stream_to, encode(err.to_reply()))
        except Exception:
            pass

    async def _keepalive_loop(self) -> None:
        """An empty message to the inbox of every request held, queued or running: the client's proof
        that this scheduler still has its request (it skips empty messages)."""
        while True:
            await asyncio.sleep(self.cfg.keepalive_s)
            inboxes = {
                q.payload.stream_to for r in self.queues.replicas.values() for q in (*r.queue, *r.running.values())
            }
            for inbox in inboxes:
                try:
                    await self.nc.publish(inbox, b"")
                except Exception:
                    pass

    async def _publish_load_loop(self) -> None:
        """Each replica's queue now and what arrived and completed since the previous report
        (``scheduler.load``, read by the deployer's autoscaler)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.publish_load_s)
            t = time.monotonic()
            windows, self.windows = self.windows, {}
            if not self.queues.replicas:
                last = t
                continue
            report = SchedulerLoad(
                scheduler_id=self.scheduler_id,
                window_s=t - last,
                replicas=replica_loads(self.queues, windows, t),
                ts=time.time(),
            )
            last = t
            try:
                await self.nc.publish(subjects.SCHEDULER_LOAD, encode(report))
            except Exception as e:
                log.debug("scheduler.load not published", error=str(e))

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for dep, q in self.queues.expire_by_replica(time.monotonic()):
                st = self.stats.setdefault(dep, ReplicaStats())
                st.failed += 1
                st.timed_out += 1
                await self._send_error(
                    q.payload,
                    errors.Timeout(
                        f"the request waited longer than its timeout of {q.payload.timeout_s:.0f} s in the queue."
                    ),
                )

    # ------------------------------------------------------------------ running requests

    async def _runner(self, deployment_id: str, wake: asyncio.Event) -> None:
        """Dispatches the deployment's queue, oldest first: every request goes to the worker as soon
        as one of the replica's slots is free, each relayed by its own task."""
        relays = self.relays.setdefault(deployment_id, set())
        while True:
            item = self.queues.start_next(deployment_id)
            if item is None:
                wake.clear()
                await wake.wait()
                continue
            relay = self.spawn(self._run_slot(deployment_id, item, wake))
            relays.add(relay)
            relay.add_done_callback(relays.discard)

    async def _run_slot(self, deployment_id: str, item: Queued[InferRequest], wake: asyncio.Event) -> None:
        """One running request, start to end; its slot is freed (and the dispatcher woken) after."""
        try:
            await self._run_one(deployment_id, item)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("request relay failed", request_id=item.request_id)
        finally:
            self.queues.finish(deployment_id, item.request_id)
            wake.set()

    async def _run_one(self, deployment_id: str, item: Queued[InferRequest]) -> None:
        req = item.payload
        d = self.deployments.get(deployment_id)
        stats = self.stats.setdefault(deployment_id, ReplicaStats())
        with structlog.contextvars.bound_contextvars(request_id=req.request_id, deployment_id=deployment_id):
            if d is None:
                await self._send_error(req, errors.Unavailable(f"deployment {deployment_id} went away."))
                return
            queue_ms = (time.monotonic() - item.arrived) * 1000.0
            remaining = item.deadline - time.monotonic()
            if remaining <= 0:
                stats.failed += 1
                stats.timed_out += 1
                await self._send_error(req, errors.Timeout("the request ran out of time in the queue."))
                return
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox)
            try:
                try:
                    await bus.request(
                        self.nc,
                        subjects.worker_generate(d.worker_id),
                        GenerateRequest(request=req, stream_to=inbox, queue_ms=queue_ms),
                        Accepted,
                        timeout=min(self.cfg.worker_accept_timeout_s, remaining),
                    )
                except errors.IServeError as e:
                    stats.failed += 1
                    if isinstance(e, errors.Unavailable):
                        e = errors.WorkerDied(
                            f"the worker of deployment {deployment_id} does not answer; it may have exited."
                        )
                    await self._send_error(req, e)
                    return
                await self._relay(sub, req, deployment_id, d.worker_id, item, stats)
            finally:
                await sub.unsubscribe()

    async def client_gone(self, inbox: str) -> bool:
        """True when nobody listens on the client's inbox any more (NATS answers "no responders");
        a live client simply does not answer the empty probe, which its stream skips."""
        try:
            await self.nc.request(inbox, b"", timeout=self.cfg.client_probe_timeout_s)
        except nats.errors.NoRespondersError:
            return True
        except nats.errors.TimeoutError:
            return False
        return False

    async def _watch_client(self, req: InferRequest, worker_id: str) -> None:
        while True:
            await asyncio.sleep(self.cfg.client_check_s)
            if await self.client_gone(req.stream_to):
                log.info("client went away; cancelling", request_id=req.request_id)
                await self.nc.publish(
                    subjects.worker_cancel(worker_id), encode(CancelRequest(request_id=req.request_id))
                )
                return

    async def _relay(
        self,
        sub,
        req: InferRequest,
        deployment_id: str,
        worker_id: str,
        item: Queued[InferRequest],
        stats: ReplicaStats,
    ) -> None:
        watcher = asyncio.create_task(self._watch_client(req, worker_id))
        try:
            await self._relay_stream(sub, req, deployment_id, worker_id, item, stats)
        finally:
            watcher.cancel()

    async def _relay_stream(
        self,
        sub,
        req: InferRequest,
        deployment_id: str,
        worker_id: str,
        item: Queued[InferRequest],
        stats: ReplicaStats,
    ) -> None:
        dec = decoder(StreamMessage)
        started = last_msg = time.monotonic()
        reconnects, reconnected_at = self.nc.stats["reconnects"], None
        while True:
            remaining = item.deadline - time.monotonic()
            if remaining <= 0:
                await self.nc.publish(
                    subjects.worker_cancel(worker_id), encode(CancelRequest(request_id=req.request_id))
                )
                stats.failed += 1
                stats.timed_out += 1
                await self._send_error(
                    req, errors.Timeout(f"the request exceeded its timeout of {req.timeout_s:.0f} s.")
                )
                return
            try:
                msg = await sub.next_msg(timeout=min(remaining, 1.0))
            except nats.errors.TimeoutError:
                t = time.monotonic()
                if item.deadline - t <= 0:
                    continue
                if self.nc.stats["reconnects"] != reconnects:
                    reconnects, reconnected_at = self.nc.stats["reconnects"], t
                if stream_lost_in_reconnect(last_msg, reconnected_at, t, self.cfg.worker_silent_s):
                    stats.failed += 1
                    await self.nc.publish(
                        subjects.worker_cancel(worker_id), encode(CancelRequest(request_id=req.request_id))
                    )
                    await self._send_error(
                        req,
                        errors.Unavailable(
                            "the connection to NATS was lost while this request ran and its stream has been "
                            f"silent for {t - (reconnected_at or t):.0f} s since (messages sent meanwhile are lost); "
                            "send it again."
                        ),
                    )
                    return
                silent = t - max(self.beat_at.get(worker_id, started), started)
                if t - last_msg < self.cfg.stream_idle_timeout_s and silent < self.cfg.worker_silent_s:
                    continue
                stats.failed += 1
                await self.nc.publish(
                    subjects.worker_cancel(worker_id), encode(CancelRequest(request_id=req.request_id))
                )
                why = (
                    f"stopped streaming for {self.cfg.stream_idle_timeout_s:.0f} s"
                    if silent < self.cfg.worker_silent_s
                    else f"sent no heartbeat for {silent:.0f} s (it or its agent died)"
                )
                await self._send_error(
                    req,
                    errors.WorkerDied(
                        f"the worker of deployment {deployment_id} {why}; the request is not retried (tokens may "
                        "have been streamed already); send it again."
                    ),
                )
                return
            last_msg = time.monotonic()
            await self.nc.publish(req.stream_to, msg.data)
            try:
                kind = dec.decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue
            if isinstance(kind, Completion):
                e2e = (time.monotonic() - item.arrived) * 1000.0
                stats.record(kind, e2e)
                self.windows.setdefault(deployment_id, Window()).complete(e2e)
                log.info(
                    "request completed",
                    model=req.model,
                    queue_ms=round(kind.queue_ms, 2),
                    ttft_ms=round(kind.ttft_ms, 2),
                    tpot_ms=round(kind.tpot_ms, 3),
                    e2e_ms=round(e2e, 2),
                    tokens=kind.completion_tokens,
                    finish=kind.finish_reason,
                )
                return
            if isinstance(kind, ErrorReply):
                stats.failed += 1
                return
