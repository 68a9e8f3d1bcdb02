"""The discrete-event simulation of one run: a GPU cluster serving a trace with the deployer's and the
scheduler's own decision functions (what is simulated: docs/simulator.md#what-is-simulated)."""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections import deque

import msgspec

from iserve import quality
from iserve import slo as slo_mod
from iserve.deployer.memory import kv_pool_tokens
from iserve.deployer.placement import GpuState
from iserve.deployer.planner import Decision
from iserve.errors import IServeError
from iserve.fingerprint.estimator.batching import step_model
from iserve.messages import ConfigEstimate, Intent
from iserve.scheduler.queues import FcfsQueues, Queued

from .policies import System, Workload, make_system
from .records import DeploymentEvent, GpuSample, RequestRecord, RequestStatus
from .replica import BatchReplica, Seq, pooled_map
from .sim_autoscale import SimAutoscaler
from .simspec import SimResult, SimSpec, run_meta
from .traces import TraceRequest, assign_models, fit_lengths


class _Req:
    __slots__ = ("i", "tr", "model", "prompt", "output", "clipped", "slo")

    def __init__(self, i: int, tr: TraceRequest, model: str, prompt: int, output: int, clipped: bool, slo: float):
        self.i, self.tr, self.model, self.prompt, self.output, self.clipped, self.slo = (
            i,
            tr,
            model,
            prompt,
            output,
            clipped,
            slo,
        )


class _Dep:
    """A deployment (replica) and the request it runs, or (``batch``) its batch's step in flight."""

    __slots__ = (
        "id",
        "model",
        "est",
        "gpus",
        "config",
        "total_bytes",
        "req",
        "remaining",
        "rate",
        "last",
        "version",
        "start",
        "solo",
        "ttft_solo",
        "batch",
    )

    def __init__(self, dep_id: str, model: str, est: ConfigEstimate, gpus: tuple[int, ...]):
        self.id, self.model, self.est, self.gpus = dep_id, model, est, gpus
        self.config = est.config.key()
        self.total_bytes = est.total_bytes
        self.req: _Req | None = None
        self.remaining = self.rate = self.last = self.start = self.solo = self.ttft_solo = 0.0
        self.version = 0
        self.batch: BatchReplica[_Req] | None = None


class _Gpu:
    __slots__ = ("agent", "index", "total", "free", "deps", "running", "busy_since", "closed")

    def __init__(self, agent: str, index: int, total: int):
        self.agent, self.index, self.total, self.free = agent, index, total, total
        self.deps = 0  # deployments holding memory here
        self.running: set[_Dep] = set()
        self.busy_since: float | None = None
        self.closed: deque[tuple[float, float]] = deque()  # finished busy intervals, in time order

    def busy_between(self, a: float, b: float) -> float:
        total = 0.0
        for s, e in reversed(self.closed):
            if e <= a:
                break
            total += min(e, b) - max(s, a)
        if self.busy_since is not None and self.busy_since < b:
            total += b - max(self.busy_since, a)
        return total

    def prune(self, before: float) -> None:
        while self.closed and self.closed[0][1] <= before:
            self.closed.popleft()


class Simulation:
    """One run of :class:`SimSpec` (use :func:`iserve.loadgen.simulator.simulate`)."""

    def __init__(self, spec: SimSpec, system: System | None = None):
        if spec.gpus < 1:
            raise ValueError("the cluster needs at least one GPU")
        if spec.deploy_batch < 1 or spec.deploy_every_s < 0:
            raise ValueError("deploy_batch must be >= 1 and deploy_every_s >= 0")
        if not spec.models:
            raise ValueError("no models to deploy")
        if spec.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.spec = spec
        per_host = spec.gpus_per_host or spec.gpus
        self.g = [_Gpu(f"sim{i // per_host}", i % per_host, spec.gpu_memory_bytes) for i in range(spec.gpus)]
        self.gpu_at = {(g.agent, g.index): k for k, g in enumerate(self.g)}
        self.raw_maps = dict(spec.models)
        # a batched replica reserves its KV pool, as the deployer's plans do: every system sees it
        self.maps = {m: pooled_map(c, spec.max_batch) for m, c in spec.models}
        self.names = [m for m, _ in spec.models]
        self.deploy_times = [(i // spec.deploy_batch) * spec.deploy_every_s for i in range(len(self.names))]
        self.system = system or make_system(
            spec.system,
            policy=spec.policy,
            theta=spec.theta,
            allgather_bytes_per_s=spec.allgather_bytes_per_s,
            forced=spec.forced,
        )
        self.system.raw_maps, self.system.max_batch = self.raw_maps, spec.max_batch  # for sizing at a load
        self.queues: FcfsQueues[_Req] = FcfsQueues()
        self.deps: dict[str, _Dep] = {}
        self.heap: list[tuple[float, int, int, _Dep]] = []
        self.seq = 0
        self.events = 0
        self.requests: list[RequestRecord] = []
        self.samples: list[GpuSample] = []
        self.dep_events: list[DeploymentEvent] = []
        self.choices: dict[str, list[str]] = {m: [] for m in self.names}
        self.failed_models: dict[str, str] = {}
        self.references = {m: slo_mod.reference_estimate(c.estimates) for m, c in spec.models if c.estimates}
        self._build_requests()
        # each model's mean request rate while it is deployed: what --intent-load states, as an operator would
        last = max((r.tr.arrival_s for r in self.reqs), default=0.0)
        counts = {m: 0 for m in self.names}
        for r in self.reqs:
            counts[r.model] += 1
        self.rates = {m: counts[m] / max(last - t, 1.0) for t, m in zip(self.deploy_times, self.names)}
        self.scaler: SimAutoscaler | None = None  # the baselines have no autoscaler
        if spec.autoscale is not None and spec.system == "iserve":
            self.scaler = SimAutoscaler(self, spec.autoscale, spec.autoscale_interval_s)

    # -- workload -----------------------------------------------------------------------------------

    def _build_requests(self) -> None:
        spec = self.spec
        if spec.assignment is not None:
            if len(spec.assignment) != len(spec.trace) or not set(spec.assignment) <= set(self.names):
                raise ValueError("assignment must name one of the models for every request of the trace")
            assigned = list(spec.assignment)
        else:
            assigned = assign_models(spec.trace, self.names, spec.seed, available_from=self.deploy_times)
        self.reqs: list[_Req] = []
        for i, (tr, model) in enumerate(zip(spec.trace, assigned)):
            cmap = self.maps[model]
            ln = fit_lengths(
                tr.context_tokens, tr.generated_tokens, max_context=spec.max_context, model_context=cmap.context_tokens
            )
            slo = 0.0
            if spec.slo_scale > 0 and model in self.references:
                slo = slo_mod.slo_ms(self.references[model], ln.prompt_tokens, ln.output_tokens, spec.slo_scale)
            self.reqs.append(_Req(i, tr, model, ln.prompt_tokens, ln.output_tokens, ln.clipped, slo))

    def intent_for(self, model: str) -> Intent:
        """The deployment intent; for ``latency-slo`` without an explicit ``slo_ms``, the SLO is
        ``slo_scale`` times the model's reference latency for the intent's size (as the live replay)."""
        intent = self.spec.intent
        if self.spec.intent_load:
            intent = msgspec.structs.replace(intent, rate=self.rates[model])
        if intent.kind == "latency-slo" and intent.slo_ms is None:
            ref = self.references.get(model)
            scale = self.spec.slo_scale or 5.0
            if ref is not None:
                return msgspec.structs.replace(
                    intent, slo_ms=slo_mod.slo_ms(ref, intent.prompt_tokens, intent.output_tokens, scale)
                )
        return intent

    def workload(self) -> Workload:
        """What AlpaServe is given in advance: per-model rates over the whole trace, SLOs and sizes."""
        spec = self.spec
        span = max((r.tr.arrival_s for r in self.reqs), default=0.0) or 1.0
        counts = {m: 0 for m in self.names}
        for r in self.reqs:
            counts[r.model] += 1
        prompt = round(statistics.fmean(r.prompt for r in self.reqs)) if self.reqs else spec.intent.prompt_tokens
        output = round(statistics.fmean(r.output for r in self.reqs)) if self.reqs else spec.intent.output_tokens
        intent = Intent(kind="min-latency", prompt_tokens=max(1, prompt), output_tokens=max(1, output))
        scale = spec.slo_scale or 5.0
        slo = {
            m: slo_mod.slo_ms(self.references[m], intent.prompt_tokens, intent.output_tokens, scale)
            for m in self.names
            if m in self.references
        }
        return Workload(
            maps=self.maps,
            rates={m: c / span for m, c in counts.items()},
            slo_ms=slo,
            intent=intent,
            gpus=self.gpu_states(0.0),
        )

    # -- GPUs ---------------------------------------------------------------------------------------

    def gpu_states(self, now: float) -> list[GpuState]:
        w = self.spec.window_s
        return [
            GpuState(
                agent_id=g.agent,
                gpu_index=g.index,
                gpu_type=self.spec.gpu_type,
                total_bytes=g.total,
                free_bytes=g.free,
                load=min(1.0, g.busy_between(now - w, now) / w),
            )
            for g in self.g
        ]

    def _sample(self, t: float) -> None:
        w, p = self.spec.window_s, self.spec.sample_s
        for g in self.g:
            g.prune(t - max(w, p))
            self.samples.append(
                GpuSample(
                    t_s=t,
                    agent_id=g.agent,
                    gpu_index=g.index,
                    total_bytes=g.total,
                    used_bytes=g.total - g.free,
                    busy_fraction=min(1.0, g.busy_between(t - w, t) / w),
                    util_percent=100.0 * min(1.0, g.busy_between(t - p, t) / p),
                    workers=g.deps,
                    gpu_type=self.spec.gpu_type,
                    free_bytes=g.free,
                    window_s=w,
                    simulated=True,
                )
            )

    # -- deployments --------------------------------------------------------------------------------

    def _deploy(self, model: str, now: float) -> None:
        cmap = self.maps[model]
        intent = self.intent_for(model)
        self.dep_events.append(
            DeploymentEvent(
                t_s=now, model=model, deployment_id="", config="", status="requested", gpu_type=self.spec.gpu_type
            )
        )
        t0 = time.perf_counter()
        try:
            decisions = self.system.decide(model, cmap, intent, self.gpu_states(now))
        except IServeError as e:
            if self.scaler is not None and self.scaler.reclaim(model, now):
                return  # the autoscaler's replicas drain for it; it is deployed once they are gone
            ms = (time.perf_counter() - t0) * 1000
            self.failed_models[model] = e.message
            self.dep_events.append(
                DeploymentEvent(
                    t_s=now,
                    model=model,
                    deployment_id="",
                    config="",
                    status="failed",
                    reason=e.message,
                    gpu_type=self.spec.gpu_type,
                    decision_ms=ms,
                )
            )
            return
        ms = (time.perf_counter() - t0) * 1000
        for k, d in enumerate(decisions):
            self._launch(model, d, now, ms if k == 0 else 0.0, cmap.context_tokens)

    def _launch(self, model: str, d: Decision, now: float, decision_ms: float, context: int) -> str:
        dep_id = f"{model}/{len(self.choices[model]) + 1}"
        gpus = []
        for a in d.assignments:
            k = self.gpu_at[(a.agent_id, a.gpu_index)]
            g = self.g[k]
            if a.memory_bytes > g.free:
                raise RuntimeError(
                    f"{self.system.name} overcommitted {g.agent}/{g.index} with {d.estimate.config.key()}"
                )
            g.free -= a.memory_bytes
            g.deps += 1
            gpus.append(k)
        dep = _Dep(dep_id, model, d.estimate, tuple(dict.fromkeys(gpus)))
        self.deps[dep_id] = dep
        b = self.spec.max_batch
        if b > 1:
            sm = step_model(self.raw_maps[model].estimates, d.estimate, context)
            dep.batch = BatchReplica(sm, max_batch=b, kv_tokens=kv_pool_tokens(b, 0, context))
        self.queues.add_replica(dep_id, model, b)
        self.choices[model].append(dep.config)
        gl = [f"{a.agent_id}/{a.gpu_index}:{a.num_layers}" for a in d.assignments]
        for status in ("launching", "ready"):
            self.dep_events.append(
                DeploymentEvent(
                    t_s=now,
                    model=model,
                    deployment_id=dep_id,
                    config=dep.config,
                    gpus=gl,
                    total_bytes=d.estimate.total_bytes,
                    status=status,
                    gpu_type=self.spec.gpu_type,
                    why=d.why,
                    decision_ms=decision_ms if status == "launching" else 0.0,
                    latency_ms=d.latency_ms,
                    context_tokens=context,
                    quality=quality.short_cost(d.estimate.config, self.raw_maps[model].quality),
                )
            )
        return dep_id

    # -- requests -----------------------------------------------------------------------------------

    def _arrive(self, r: _Req, now: float) -> None:
        deadline = now + self.spec.timeout_s if self.spec.timeout_s > 0 else math.inf
        item = Queued(request_id=str(r.i), model=r.model, arrived=now, deadline=deadline, payload=r)
        rep = self.queues.enqueue(item)
        if rep is None:
            reason = self.failed_models.get(r.model, "no deployment")
            self._record_failure(r, now, "not_deployed", f"{r.model} has no deployment: {reason}")
            return
        if rep.free_slots:
            self._start(self.deps[rep.deployment_id], now)

    def _next(self, dep: _Dep, now: float) -> Queued[_Req] | None:
        """The oldest queued request of ``dep`` that takes a free slot now; those past their deadline
        are dropped on the way, as the scheduler drops them."""
        while True:
            item = self.queues.start_next(dep.id)
            if item is None or item.deadline > now:
                return item
            # still queued at its deadline: the scheduler drops it with a timeout
            self.queues.finish(dep.id, item.request_id)
            r = item.payload
            self._record_failure(
                r,
                r.tr.arrival_s,
                "timeout",
                f"queued for more than {self.spec.timeout_s:g} s",
                end=item.deadline,
                status="timeout",
                deployment_id=dep.id,
                config=dep.config,
            )

    def _start(self, dep: _Dep, now: float) -> None:
        if dep.batch is not None:
            self._fill(dep, now)
            return
        item = self._next(dep, now)
        if item is None:
            return
        r = item.payload
        e = dep.est
        dep.req = r
        dep.solo = max(e.latency_ms(r.prompt, r.output), 1e-6) / 1000.0
        dep.ttft_solo = min(max(e.ttft_ms(r.prompt), 0.0) / 1000.0, dep.solo)
        dep.remaining = dep.solo
        dep.start = dep.last = now
        self._occupy(dep, now)

    def _fill(self, dep: _Dep, now: float) -> None:
        """Batched: give every free slot its queued request, then start a step unless one runs."""
        batch = dep.batch
        assert batch is not None
        while (item := self._next(dep, now)) is not None:
            r = item.payload
            if batch.fits(r.prompt, r.output):
                batch.submit(Seq(r, r.prompt, r.output, now))
                continue
            self.queues.finish(dep.id, item.request_id)
            msg = f"{r.prompt} + {r.output} tokens do not fit the replica's KV pool"
            self._record_failure(r, r.tr.arrival_s, "prompt_too_long", msg, end=now, deployment_id=dep.id)
        if batch.busy:
            return
        ms = batch.begin()
        if not batch.busy:  # nothing left: the replica goes idle
            if dep in self.g[dep.gpus[0]].running:
                self._release(dep, now)
            return
        dep.remaining = max(ms, 1e-6) / 1000.0
        dep.last = now
        self._occupy(dep, now)

    def _step_done(self, dep: _Dep, now: float) -> None:
        """Batched: the step in flight ended; record the requests it completed, start the next."""
        assert dep.batch is not None
        for s in dep.batch.end(now):
            self.queues.finish(dep.id, str(s.payload.i))
            self._record_ok(s.payload, dep, s.joined, s.first_token, now)
        self._fill(dep, now)

    def _occupy(self, dep: _Dep, now: float) -> None:
        """``dep`` computes on its GPUs from ``now`` (a new request or step: its rate is set afresh)."""
        dep.rate = 0.0
        for k in dep.gpus:
            g = self.g[k]
            if not g.running:
                g.busy_since = now
            g.running.add(dep)
        self._rerate(dep.gpus, now)

    def _release(self, dep: _Dep, now: float) -> None:
        dep.rate = 0.0
        for k in dep.gpus:
            g = self.g[k]
            g.running.discard(dep)
            if not g.running:
                assert g.busy_since is not None
                g.closed.append((g.busy_since, now))
                g.busy_since = None
        self._rerate(dep.gpus, now)

    def _rerate(self, gpus: tuple[int, ...], now: float) -> None:
        """Processor sharing: re-evaluate the rate of every request running on these GPUs."""
        affected: set[_Dep] = set()
        for k in gpus:
            affected.update(self.g[k].running)
        for dep in affected:
            n = max(len(self.g[k].running) for k in dep.gpus)
            rate = 1.0 / n
            if rate == dep.rate:
                continue
            dep.remaining -= (now - dep.last) * dep.rate
            if dep.remaining < 0.0:
                dep.remaining = 0.0
            dep.last = now
            dep.rate = rate
            dep.version += 1
            self.seq += 1
            heapq.heappush(self.heap, (now + dep.remaining / rate, self.seq, dep.version, dep))

    def _finish(self, dep: _Dep, now: float) -> None:
        r = dep.req
        assert r is not None
        dep.req = None
        self._release(dep, now)
        self.queues.finish(dep.id, str(r.i))
        service = now - dep.start
        self._record_ok(r, dep, dep.start, dep.start + service * (dep.ttft_solo / dep.solo), now)
        self._start(dep, now)

    def _record_ok(self, r: _Req, dep: _Dep, start: float, first: float, now: float) -> None:
        service = now - start
        arrival = r.tr.arrival_s
        e2e = (now - arrival) * 1000
        self.requests.append(
            RequestRecord(
                request_id=str(r.i),
                model=r.model,
                deployment_id=dep.id,
                arrival_s=arrival,
                start_s=start,
                first_token_s=first,
                end_s=now,
                queue_ms=(start - arrival) * 1000,
                ttft_ms=(first - arrival) * 1000,
                tpot_ms=((now - first) * 1000 / (r.output - 1)) if r.output > 1 else 0.0,
                e2e_ms=e2e,
                prompt_tokens=r.prompt,
                output_tokens=r.output,
                slo_ms=r.slo,
                slo_met=slo_mod.slo_met(e2e, r.slo),
                status="ok",
                index=r.tr.index,
                scheduled_s=arrival,
                trace_context_tokens=r.tr.context_tokens,
                trace_generated_tokens=r.tr.generated_tokens,
                clipped=r.clipped,
                server_ttft_ms=(first - arrival) * 1000,
                worker_ttft_ms=(first - start) * 1000,
                worker_e2e_ms=service * 1000,
                config=dep.config,
            )
        )

    def _record_failure(
        self,
        r: _Req,
        arrival: float,
        code: str,
        message: str,
        *,
        end: float | None = None,
        status: RequestStatus = "error",
        deployment_id: str = "",
        config: str = "",
    ) -> None:
        end = arrival if end is None else end
        self.requests.append(
            RequestRecord(
                request_id=str(r.i),
                model=r.model,
                deployment_id=deployment_id,
                arrival_s=arrival,
                end_s=end,
                queue_ms=(end - arrival) * 1000 if status == "timeout" else 0.0,
                e2e_ms=(end - arrival) * 1000,
                prompt_tokens=r.prompt,
                output_tokens=0,
                slo_ms=r.slo,
                slo_met=False if r.slo > 0 else None,
                status=status,
                error_code=code,
                error_message=message,
                index=r.tr.index,
                scheduled_s=arrival,
                trace_context_tokens=r.tr.context_tokens,
                trace_generated_tokens=r.tr.generated_tokens,
                clipped=r.clipped,
                config=config,
            )
        )

    # -- the event loop -----------------------------------------------------------------------------

    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        spec = self.spec
        if self.system.needs_workload:
            self.system.prepare(self.workload())
        deploys = deque(zip(self.deploy_times, self.names))
        arrivals = self.reqs
        ai, n_arr = 0, len(arrivals)
        next_sample, period = 0.0, spec.sample_s
        last_arrival = arrivals[-1].tr.arrival_s if arrivals else 0.0
        heap = self.heap
        inf = math.inf
        while True:
            t_dep = deploys[0][0] if deploys else inf
            t_arr = arrivals[ai].tr.arrival_s if ai < n_arr else inf
            t_fin = heap[0][0] if heap else inf
            t_scale = self.scaler.next_at if self.scaler is not None and (ai < n_arr or heap) else inf
            now = min(t_dep, t_arr, t_fin, t_scale)
            if now == inf:
                break
            while next_sample <= now:
                self._sample(next_sample)
                if next_sample > last_arrival + spec.window_s:
                    period *= 2  # an overloaded run drains for a long time: sample it geometrically
                next_sample += period
            self.events += 1
            if t_scale <= now and self.scaler is not None:  # the autoscaler's evaluation (sim_autoscale.py)
                self.scaler.evaluate(now)
            elif t_dep <= now:  # deployments first, so a request at the same instant finds its model
                _, model = deploys.popleft()
                self._deploy(model, now)
            elif t_fin <= now:  # then completions, freeing replicas
                _, _, version, dep = heapq.heappop(heap)
                if version != dep.version:
                    pass  # superseded by a later rate change
                elif dep.batch is not None:
                    if dep.batch.busy:
                        self._step_done(dep, now)
                elif dep.req is not None:
                    self._finish(dep, now)
            else:
                self._arrive(arrivals[ai], now)
                ai += 1
        self._sample(next_sample)
        self.requests.sort(key=lambda r: (r.end_s, int(r.request_id)))
        span = max((r.tr.arrival_s for r in self.reqs), default=0.0)
        meta = run_meta(spec, self.names, len(self.reqs), span, self.system.plan_note)
        return SimResult(
            meta=meta,
            requests=self.requests,
            gpus=self.samples,
            deployments=self.dep_events,
            choices=self.choices,
            wall_s=time.perf_counter() - t_wall,
            events=self.events,
        )
