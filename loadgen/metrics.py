"""The metrics of one run (live or simulated), computed from its run directory's records; their
definitions are in docs/simulator.md#metrics."""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field

import msgspec

from iserve.messages import Intent, IntentKind
from iserve.stats import percentile

from .records import Run, RunMeta

GIB = 1 << 30
COST_INTENTS: tuple[IntentKind, ...] = ("min-cost", "min-memory", "min-gpu-hours")


@dataclass
class RunMetrics:
    """Everything the report shows about one run (defined in docs/simulator.md#metrics)."""

    path: str
    kind: str
    system: str
    trace: str
    rate: float
    intent: str
    cost_model: str
    slo_scale: float
    experiment: str
    models_requested: int
    models_deployed: int
    requests: int
    ok: int
    failed: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    slo_attainment: float | None
    gpus_used: int
    gpu_seconds: float
    gpu_throughput: float  # finished requests per GPU-second in use
    token_throughput: float  # output tokens per GPU-second in use
    cluster_throughput: float  # finished requests per second
    span_s: float
    cost_gib_s: float  # mean per request: deployment GiB x e2e seconds
    cost_intent: float  # mean per-request cost under the run's cost model
    memory_gib: float
    gpu_hours: float
    configs: dict[str, list[str]] = field(default_factory=dict)
    placement: str = ""  # iServe's placement policy, with the hybrid's theta ("hybrid 0.5")
    max_batch: int = 1  # the serving mode: 1 the paper's, more continuous batching (0: the deployer's default)
    # appended: each configuration's quality cost as the deployment recorded it ("": not recorded)
    quality: dict[str, str] = field(default_factory=dict)


def experiment_of(run: Run) -> str:
    """The run's experiment: the sweep's ``experiment=NAME`` tag, else inferred from its shape."""
    m = re.search(r"experiment=([\w.-]+)", run.meta.notes or "")
    if m:
        return m.group(1)
    if run.meta.slo_scale > 0:
        return "fig14"
    if len(run.meta.models) >= 12:
        return "fig16"
    if run.meta.intent.kind == "min-latency":
        return "fig11"
    if run.meta.intent.kind in COST_INTENTS:
        return "fig13"
    return "other"


def run_metrics(run: Run) -> RunMetrics:
    """The report's metrics of one run."""
    meta = run.meta
    # deployment -> (ready time, estimated bytes, GPUs, model, configuration); its GPUs as "agent/index"
    deps: dict[str, tuple[float, int, int, str, str]] = {}
    dep_gpus: dict[str, list[str]] = {}
    stopped: dict[str, float] = {}
    quality = {ev.config: ev.quality for ev in run.deployments if ev.status == "launching" and ev.config}
    for ev in run.deployments:
        if ev.status == "ready" and ev.deployment_id and ev.deployment_id not in deps:
            deps[ev.deployment_id] = (ev.t_s, ev.total_bytes, len(ev.gpus), ev.model, ev.config)
            dep_gpus[ev.deployment_id] = [g.split(":")[0] for g in ev.gpus]
        elif ev.status in ("stopped", "failed") and ev.deployment_id:
            stopped.setdefault(ev.deployment_id, ev.t_s)

    reqs = run.requests
    ok = [r for r in reqs if r.status == "ok"]
    e2e = [r.e2e_ms for r in ok]
    end = max([meta.duration_s] + [r.end_s for r in reqs])
    span = max(end, 1e-9)

    # GPU time in use: the union, per GPU, of [ready, stopped or end] of its deployments, within [0, end]
    per_gpu: dict[str, list[tuple[float, float]]] = {}
    for dep, (t, _, _, _, _) in deps.items():
        a, b = max(0.0, t), min(end, stopped.get(dep, end))
        if b <= a:
            continue
        for g in set(dep_gpus.get(dep, [])):
            per_gpu.setdefault(g, []).append((a, b))
    gpu_seconds = 0.0
    for spans in per_gpu.values():
        spans.sort()
        cur_a, cur_b = spans[0]
        for a, b in spans[1:]:
            if a > cur_b:
                gpu_seconds += cur_b - cur_a
                cur_a, cur_b = a, b
            else:
                cur_b = max(cur_b, b)
        gpu_seconds += cur_b - cur_a
    gpus_used = len({g for dep in deps for g in dep_gpus.get(dep, [])})

    cost_model = meta.intent.cost_model
    costs, intent_costs, gh = [], [], 0.0
    for r in ok:
        d = deps.get(r.deployment_id)
        if d is None:
            continue
        gib, ngpu, secs = d[1] / GIB, d[2], r.e2e_ms / 1000.0
        costs.append(gib * secs)
        gh += ngpu * secs / 3600.0
        if cost_model == "memory":
            intent_costs.append(gib)
        elif cost_model == "gpu-hours":
            intent_costs.append(ngpu * secs / 3600.0)
        else:
            intent_costs.append(gib * secs)
    with_slo = [r for r in reqs if r.slo_met is not None]
    configs: dict[str, list[str]] = {}
    for _, (_, _, _, model, cfg) in sorted(deps.items(), key=lambda kv: kv[1][0]):
        configs.setdefault(model, []).append(cfg)
    return RunMetrics(
        path=str(run.path),
        kind=meta.kind,
        system=meta.system,
        trace=meta.trace,
        rate=meta.rate,
        intent=meta.intent.kind,
        cost_model=cost_model,
        slo_scale=meta.slo_scale,
        experiment=experiment_of(run),
        models_requested=len(meta.models),
        models_deployed=len({d[3] for d in deps.values()}),
        requests=len(reqs),
        ok=len(ok),
        failed=len(reqs) - len(ok) - sum(r.status == "cancelled" for r in reqs),
        p50_ms=percentile(e2e, 50),
        p95_ms=percentile(e2e, 95),
        p99_ms=percentile(e2e, 99),
        mean_ms=statistics.fmean(e2e) if e2e else math.nan,
        slo_attainment=(sum(bool(r.slo_met) for r in with_slo) / len(with_slo)) if with_slo else None,
        gpus_used=gpus_used,
        gpu_seconds=gpu_seconds,
        gpu_throughput=len(ok) / gpu_seconds if gpu_seconds > 0 else 0.0,
        token_throughput=sum(r.output_tokens for r in ok) / gpu_seconds if gpu_seconds > 0 else 0.0,
        cluster_throughput=len(ok) / span,
        span_s=span,
        cost_gib_s=statistics.fmean(costs) if costs else math.nan,
        cost_intent=statistics.fmean(intent_costs) if intent_costs else math.nan,
        memory_gib=sum(d[1] for d in deps.values()) / GIB,
        gpu_hours=gh,
        configs=configs,
        placement=_placement(meta),
        max_batch=meta.max_batch if meta.max_batch or meta.kind == "live" else 1,
        quality=quality,
    )


def _placement(meta: RunMeta) -> str:
    """The run's placement policy, with the hybrid's theta where the run recorded it."""
    return f"{meta.placement} {meta.theta:g}" if meta.placement == "hybrid" and meta.theta else meta.placement


def objective(run: Run, intent: Intent) -> tuple[int, float]:
    """How well a run met ``intent``, smaller is better: (failed requests, the intent's metric).

    ``min-latency`` / ``cost-budget``: mean end-to-end latency (ms); ``min-cost``: mean per-request
    cost under ``intent.cost_model``; ``min-memory``: deployed GiB; ``min-gpu-hours``: GPU-hours;
    ``latency-slo``: the fraction of SLO misses (failures are misses already, so the first element is
    0). A run with no finished request scores infinity."""
    m = run_metrics(run)
    kind = intent.kind
    if kind == "latency-slo":
        att = m.slo_attainment
        return (0, 1.0 - att if att is not None else math.inf)
    if kind in ("min-latency", "cost-budget"):
        metric = m.mean_ms
    elif kind == "min-cost":
        metric = _intent_cost(run, intent.cost_model) if intent.cost_model != m.cost_model else m.cost_intent
    elif kind == "min-memory":
        metric = m.memory_gib
    else:
        metric = m.gpu_hours
    return (m.failed, metric if not math.isnan(metric) else math.inf)


def _intent_cost(run: Run, cost_model: str) -> float:
    """The mean per-request cost of a run under another cost model than its intent's."""
    meta = msgspec.structs.replace(run.meta, intent=msgspec.structs.replace(run.meta.intent, cost_model=cost_model))
    return run_metrics(
        Run(path=run.path, meta=meta, requests=run.requests, gpus=run.gpus, deployments=run.deployments)
    ).cost_intent


def intent_metric(m: RunMetrics) -> tuple[str, float, bool]:
    """The metric a run's intent is judged on, its value and whether larger is better."""
    if m.slo_scale > 0 or m.intent == "latency-slo":
        return "SLO attainment", (m.slo_attainment if m.slo_attainment is not None else math.nan), True
    if m.intent == "min-cost":
        return f"cost ({m.cost_model})", m.cost_intent, False
    if m.intent == "min-memory":
        return "memory GiB", m.memory_gib, False
    if m.intent == "min-gpu-hours":
        return "GPU-hours", m.gpu_hours, False
    return "mean latency ms", m.mean_ms, False
