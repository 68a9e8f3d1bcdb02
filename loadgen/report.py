"""``iserve report RUN_DIR [RUN_DIR ...] --out DIR``: tables and plots of live or simulated runs,
reproducing the paper's evaluation figures; ``iserve report sweep`` (:func:`main_sweep`) simulates a
whole evaluation first.

Every number in the report is computed from the run directories (:mod:`.records`) by
:func:`run_metrics`; nothing is typed in. A directory argument that is not itself a run is searched
for runs (any folder holding ``meta.json``).

Metrics (per run)
    * **Latency**: end-to-end (arrival to last token, queueing included) p50 / p95 / p99 / mean over
      the requests that finished; failed and timed-out requests are counted apart.
    * **GPU throughput** (paper: "the amount of work each GPU completes", work per GPU used):
      requests finished per GPU-second of the GPUs in use, where a GPU is in use from the moment a
      deployment on it is ready until it stops or the run ends (the run ends at the later of the
      trace's end and the last request's end). Output tokens per GPU-second are reported too.
    * **GPUs used**: distinct GPUs that held a ready deployment during the run.
    * **Cluster throughput** (Fig. 16): requests finished per second of the run.
    * **Cost** (the mem-x-latency cost model, GiB-s): per finished request, the serving deployment's
      estimated memory (GiB, all its GPUs) times the request's end-to-end latency (s); the mean.
      Under another ``cost_model`` of the run's intent: the deployment's GiB (``memory``) or its GPUs
      times the latency in hours (``gpu-hours``), per request.
    * **Memory**: the summed estimated memory (GiB) of every deployment that became ready.
    * **GPU-hours**: the sum over finished requests of the serving deployment's GPUs times the
      request's end-to-end latency, in hours (the intent's per-request GPU-hours, totalled).
    * **SLO attainment**: the fraction of requests with an SLO that met it; failed requests (e.g. of
      a model that was never deployed) miss it.

Figures
    * ``fig11.png``: the min-latency intent: latency p50 (solid) and p95 (dashed), GPU throughput
      and GPUs used against the rate scale, per trace, per system.
    * ``fig13.png``: the min-cost, min-memory and min-gpu-hours intents: cost, memory and GPU-hours
      per system, per rate, per trace.
    * ``fig14.png``: SLO attainment against the rate scale under the tightest and loosest SLO scale.
    * ``fig16.png``: the many-model scaling experiment: models deployed and cluster throughput per
      intent and system.

Runs are grouped by experiment: the ``experiment=NAME`` tag the sweep writes into ``meta.notes``,
else by shape (an SLO scale: fig14; 12 or more models: fig16; the min-latency intent: fig11; the
min-cost/memory/GPU-hours intents: fig13). The oracle (``system="oracle"``) appears as a row of every
table it was run for, and a last section compares iServe with the oracle and the best baseline on
each point's own metric.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import msgspec

from iserve.messages import Intent

from .records import META, Run, load_run

GIB = 1 << 30
SYSTEM_ORDER = ("iserve", "oracle", "max-tp", "max-pp", "accelerate", "alpaserve", "alpaserve*")
SYSTEM_LABEL = {"iserve": "iServe", "oracle": "oracle (static, trace known)", "max-tp": "TensorRT-LLM_TP",
                "max-pp": "TensorRT-LLM_PP", "accelerate": "Accelerate (FSDP)", "alpaserve": "AlpaServe",
                "alpaserve*": "AlpaServe*"}
COST_INTENTS = ("min-cost", "min-memory", "min-gpu-hours")
INTENT_SHORT = {"min-latency": "l", "min-cost": "c", "min-gpu-hours": "g", "min-memory": "m", "latency-slo": "slo",
                "cost-budget": "b"}


# ---------------------------------------------------------------------------------------------------
# metrics


@dataclass
class RunMetrics:
    """Everything the report shows about one run (see the module docstring for definitions)."""

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


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


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
        path=str(run.path), kind=meta.kind, system=meta.system, trace=meta.trace, rate=meta.rate,
        intent=meta.intent.kind, cost_model=cost_model, slo_scale=meta.slo_scale, experiment=experiment_of(run),
        models_requested=len(meta.models), models_deployed=len({d[3] for d in deps.values()}),
        requests=len(reqs), ok=len(ok), failed=len(reqs) - len(ok) - sum(r.status == "cancelled" for r in reqs),
        p50_ms=_pct(e2e, 50), p95_ms=_pct(e2e, 95), p99_ms=_pct(e2e, 99),
        mean_ms=statistics.fmean(e2e) if e2e else math.nan,
        slo_attainment=(sum(bool(r.slo_met) for r in with_slo) / len(with_slo)) if with_slo else None,
        gpus_used=gpus_used, gpu_seconds=gpu_seconds,
        gpu_throughput=len(ok) / gpu_seconds if gpu_seconds > 0 else 0.0,
        token_throughput=sum(r.output_tokens for r in ok) / gpu_seconds if gpu_seconds > 0 else 0.0,
        cluster_throughput=len(ok) / span, span_s=span,
        cost_gib_s=statistics.fmean(costs) if costs else math.nan,
        cost_intent=statistics.fmean(intent_costs) if intent_costs else math.nan,
        memory_gib=sum(d[1] for d in deps.values()) / GIB, gpu_hours=gh, configs=configs)


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
    return run_metrics(Run(path=run.path, meta=meta, requests=run.requests, gpus=run.gpus,
                           deployments=run.deployments)).cost_intent


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


# ---------------------------------------------------------------------------------------------------
# reading runs


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories named by ``paths``: each one itself, or every folder below it holding ``meta.json``."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / META).is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.rglob(META)))
        else:
            raise FileNotFoundError(f"{p} is not a run directory (no {META}) nor a folder of runs")
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


# ---------------------------------------------------------------------------------------------------
# formatting


def _sys_key(system: str) -> tuple[int, str]:
    return (SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER), system)


def _label(system: str) -> str:
    return SYSTEM_LABEL.get(system, system)


def _n(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    ax = abs(x)
    if ax >= 1e5:
        return f"{x:.3g}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def _ms(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x / 1000:.3g} s" if x >= 10_000 else f"{x:.0f} ms"


def _pcts(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def _configs(m: RunMetrics) -> str:
    counts: dict[str, int] = {}
    for keys in m.configs.values():
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{n}x {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(system: str) -> str:
    palette = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"]
    return palette[_sys_key(system)[0] % len(palette)]


def _lines(ax, ms: list[RunMetrics], value, *, style: str = "-", label_suffix: str = "", log: bool = False) -> None:
    by_sys: dict[str, list[RunMetrics]] = {}
    for m in ms:
        by_sys.setdefault(m.system, []).append(m)
    for system in sorted(by_sys, key=_sys_key):
        pts = sorted((m.rate, value(m)) for m in by_sys[system])
        pts = [(x, y) for x, y in pts if y is not None and not math.isnan(y) and not (log and y <= 0)]
        if not pts:
            continue
        ours, oracle = system == "iserve", system == "oracle"
        # the oracle often coincides with iServe (it starts from iServe's choices): drawn on top, thin, with crosses
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o" if ours else "x" if oracle else "s",
                color=_color(system), label=_label(system) + label_suffix, linewidth=2.2 if ours else 1.2,
                zorder=4 if oracle else 3 if ours else 2, markersize=6 if ours or oracle else 4,
                markerfacecolor=_color(system) if ours else "none")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("rate scale")
    ax.grid(True, alpha=0.3)


def _bars(ax, ms: list[RunMetrics], value, *, log: bool = False) -> None:
    """Grouped bars: one group per rate, one bar per system."""
    rates = sorted({m.rate for m in ms})
    systems = sorted({m.system for m in ms}, key=_sys_key)
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        xs, ys = [], []
        for i, rate in enumerate(rates):
            vals = [value(m) for m in ms if m.system == system and m.rate == rate]
            vals = [v for v in vals if v is not None and not math.isnan(v) and not math.isinf(v)]
            if vals and (not log or vals[0] > 0):
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, color=_color(system), label=_label(system))
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlabel("rate scale")
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)


def _save(fig, path: Path, bottom: float = 0.0) -> None:
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_fig11(ms: list[RunMetrics], path: Path) -> None:
    plt = _plt()
    traces = sorted({m.trace for m in ms})
    fig, axes = plt.subplots(3, len(traces), figsize=(5.5 * len(traces), 10), squeeze=False)
    for c, trace in enumerate(traces):
        sel = [m for m in ms if m.trace == trace]
        ax = axes[0][c]
        _lines(ax, sel, lambda m: m.p50_ms / 1000, log=True)
        _lines(ax, sel, lambda m: m.p95_ms / 1000, style="--", label_suffix=" p95", log=True)
        ax.set_title(f"{trace} trace: latency p50 (solid), p95 (dashed)")
        ax.set_ylabel("end-to-end latency (s)")
        ax = axes[1][c]
        _lines(ax, sel, lambda m: m.gpu_throughput)
        ax.set_title(f"{trace} trace: GPU throughput")
        ax.set_ylabel("requests per GPU-second in use")
        ax = axes[2][c]
        _lines(ax, sel, lambda m: float(m.gpus_used))
        ax.set_ylim(0, max(m.gpus_used for m in sel) + 1)
        ax.set_title(f"{trace} trace: GPUs used")
        ax.set_ylabel("GPUs")
    handles, labels = axes[0][0].get_legend_handles_labels()
    keep = [(h, l) for h, l in zip(handles, labels) if not l.endswith(" p95")]
    fig.legend([h for h, _ in keep], [l for _, l in keep], loc="lower center", ncol=min(7, len(keep)), fontsize=8)
    fig.suptitle("Fig. 11: min-latency intent")
    _save(fig, path, bottom=0.05)


def plot_fig13(ms: list[RunMetrics], path: Path) -> None:
    plt = _plt()
    traces = sorted({m.trace for m in ms})
    cols = [("min-cost", "cost per request (GiB-s)", lambda m: m.cost_intent),
            ("min-memory", "memory (GiB)", lambda m: m.memory_gib),
            ("min-gpu-hours", "GPU-hours", lambda m: m.gpu_hours)]
    fig, axes = plt.subplots(len(traces), 3, figsize=(16, 4.2 * len(traces)), squeeze=False)
    for r, trace in enumerate(traces):
        for c, (intent, ylabel, value) in enumerate(cols):
            ax = axes[r][c]
            sel = [m for m in ms if m.trace == trace and m.intent == intent]
            if sel:
                _bars(ax, sel, value, log=True)
            else:
                ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(f"{trace} trace: {intent}")
            ax.set_ylabel(ylabel)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8)
    fig.suptitle("Fig. 13: cost, memory and GPU-hours intents")
    _save(fig, path, bottom=0.08 / len(traces))


def plot_fig14(ms: list[RunMetrics], path: Path) -> None:
    plt = _plt()
    traces = sorted({m.trace for m in ms})
    scales = sorted({m.slo_scale for m in ms})
    picked = [scales[0]] if len(scales) == 1 else [scales[0], scales[-1]]
    fig, axes = plt.subplots(len(traces), len(picked), figsize=(6 * len(picked), 4.2 * len(traces)), squeeze=False)
    for r, trace in enumerate(traces):
        for c, scale in enumerate(picked):
            ax = axes[r][c]
            _lines(ax, [m for m in ms if m.trace == trace and m.slo_scale == scale],
                   lambda m: 100 * m.slo_attainment if m.slo_attainment is not None else math.nan)
            tight = "tight" if scale == picked[0] and len(picked) > 1 else "loose" if len(picked) > 1 else ""
            ax.set_title(f"{trace} trace: {tight} SLO ({scale:g}x)".replace(":  ", ": "))
            ax.set_ylabel("SLO attainment (%)")
            ax.set_ylim(-2, 102)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8)
    fig.suptitle("Fig. 14: SLO attainment")
    _save(fig, path, bottom=0.1 / len(traces))


def plot_fig16(ms: list[RunMetrics], path: Path) -> None:
    plt = _plt()
    intents = sorted({m.intent for m in ms}, key=lambda k: list(INTENT_SHORT).index(k) if k in INTENT_SHORT else 99)
    systems = sorted({m.system for m in ms}, key=_sys_key)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.6 * len(intents) * max(1, len(systems)) / 2), 8), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for row, (ylabel, value) in enumerate([("models deployed", lambda m: m.models_deployed),
                                           ("cluster throughput (requests/s)", lambda m: m.cluster_throughput)]):
        ax = axes[row][0]
        for j, system in enumerate(systems):
            xs, ys = [], []
            for i, intent in enumerate(intents):
                vals = [value(m) for m in ms if m.system == system and m.intent == intent]
                if vals:
                    xs.append(i + (j - (len(systems) - 1) / 2) * width)
                    ys.append(vals[0])
            ax.bar(xs, ys, width=width, color=_color(system), label=_label(system))
        ax.set_xticks(range(len(intents)), [f"{INTENT_SHORT.get(k, k)} ({k})" for k in intents])
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
        if row == 0:
            req = max(m.models_requested for m in ms)
            ax.axhline(req, color="black", linewidth=0.8, linestyle=":")
            ax.set_title(f"Fig. 16: scaling to {req} models")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8)
    _save(fig, path, bottom=0.05)


# ---------------------------------------------------------------------------------------------------
# the report


def _sort_key(m: RunMetrics) -> tuple:
    return (m.trace, m.rate, m.intent, m.slo_scale, _sys_key(m.system))


def _fig11_table(ms: list[RunMetrics]) -> str:
    rows = [[m.trace, f"{m.rate:g}", _label(m.system), str(m.requests), str(m.failed), _ms(m.p50_ms), _ms(m.p95_ms),
             _ms(m.mean_ms), _n(m.gpu_throughput), _n(m.token_throughput), str(m.gpus_used), _configs(m)]
            for m in sorted(ms, key=_sort_key)]
    return _table(["trace", "rate", "system", "requests", "failed", "p50", "p95", "mean", "req/GPU-s", "tok/GPU-s",
                   "GPUs", "configurations"], rows)


def _fig13_table(ms: list[RunMetrics]) -> str:
    rows = [[m.intent, m.trace, f"{m.rate:g}", _label(m.system), str(m.failed), _n(m.cost_intent), _n(m.memory_gib),
             _n(m.gpu_hours), _ms(m.p50_ms), _n(m.gpu_throughput), str(m.gpus_used), _configs(m)]
            for m in sorted(ms, key=lambda m: (COST_INTENTS.index(m.intent) if m.intent in COST_INTENTS else 9,) + _sort_key(m))]
    return _table(["intent", "trace", "rate", "system", "failed", "cost/request", "memory GiB", "GPU-hours", "p50",
                   "req/GPU-s", "GPUs", "configurations"], rows)


def _fig14_table(ms: list[RunMetrics]) -> str:
    rows = [[f"{m.slo_scale:g}x", m.trace, f"{m.rate:g}", _label(m.system), _pcts(m.slo_attainment), str(m.failed),
             _ms(m.p50_ms), _ms(m.p95_ms), str(m.models_deployed), _configs(m)]
            for m in sorted(ms, key=lambda m: (m.slo_scale,) + _sort_key(m))]
    return _table(["SLO", "trace", "rate", "system", "attainment", "failed", "p50", "p95", "models", "configurations"], rows)


def _fig16_table(ms: list[RunMetrics]) -> str:
    rows = [[m.intent, _label(m.system), f"{m.models_deployed}/{m.models_requested}", _n(m.cluster_throughput),
             _n(m.gpu_throughput), str(m.failed), _ms(m.p50_ms), _n(m.memory_gib), str(m.gpus_used)]
            for m in sorted(ms, key=lambda m: (m.intent, _sys_key(m.system)))]
    return _table(["intent", "system", "models deployed", "cluster req/s", "req/GPU-s", "failed", "p50", "memory GiB",
                   "GPUs"], rows)


def _versus(ms: list[RunMetrics]) -> str:
    """Per point: iServe's metric, the oracle's and the best baseline's, with the gaps. Baselines are
    compared as the oracle is searched: fewer failed requests first (a system that drops a model
    does not win on the latency of the others), then the metric; for SLO attainment, failures are
    misses already."""
    points: dict[tuple, dict[str, RunMetrics]] = {}
    for m in ms:
        points.setdefault((m.experiment, m.trace, m.rate, m.intent, m.slo_scale), {})[m.system] = m
    rows = []
    for key in sorted(points):
        p = points[key]
        if "iserve" not in p:
            continue
        ours = p["iserve"]
        name, value, higher = intent_metric(ours)
        slo = higher  # only SLO attainment is "higher is better"

        def rank(m: RunMetrics) -> tuple:
            v = intent_metric(m)[1]
            v = -v if higher else v
            return (0 if slo else m.failed, v)

        oracle = p.get("oracle")
        bases = [m for s, m in p.items() if s not in ("iserve", "oracle") and not math.isnan(intent_metric(m)[1])]
        best = min(bases, key=rank) if bases else None

        def gap(other: RunMetrics | None) -> str:
            if other is None:
                return "-"
            o = intent_metric(other)[1]
            if math.isnan(value) or math.isnan(o) or o == 0:
                return "-"
            return f"{(value - o) / abs(o):+.1%}"

        def show(m: RunMetrics | None) -> str:
            if m is None:
                return "-"
            txt = _n(intent_metric(m)[1])
            return txt + (f" ({m.failed} failed)" if m.failed and not slo else "")

        beats = "-" if best is None else ("yes" if rank(ours) <= rank(best) else "no")
        rows.append([key[0], key[1], f"{key[2]:g}", key[3] + (f" {key[4]:g}x" if key[4] else ""), name, show(ours),
                     show(oracle), gap(oracle), f"{_label(best.system)}: {show(best)}" if best else "-", gap(best), beats])
    if not rows:
        return "No point has an iServe run."
    return _table(["experiment", "trace", "rate", "intent", "metric", "iServe", "oracle", "iServe vs oracle",
                   "best baseline", "iServe vs best", "iServe best?"], rows)


def _point_metric(m: RunMetrics) -> tuple[str, float, bool]:
    """The metric a point is summarised on: Fig. 16's cluster throughput, else :func:`intent_metric`."""
    if m.experiment == "fig16":
        return "cluster req/s", m.cluster_throughput, True
    return intent_metric(m)


def _change(ours: float, other: float, higher: bool) -> float:
    """iServe against another system on one metric: for a smaller-is-better metric the relative
    change ``(ours - other) / other`` (negative: iServe better); for a larger-is-better one the ratio
    ``ours / other`` (above 1: iServe better). NaN where undefined (a zero or missing value)."""
    if math.isnan(ours) or math.isnan(other) or math.isinf(ours) or math.isinf(other) or other == 0:
        return math.nan
    return ours / other if higher else (ours - other) / abs(other)


def _per_baseline(ms: list[RunMetrics]) -> str:
    """iServe against each other system, averaged over the points (traces x rates) both ran, per
    experiment, intent and SLO scale, with an "all baselines" row (the paper's "on average across
    loads compared to the baselines"); Fig. 11 adds the median latency and GPU throughput."""
    points: dict[tuple, dict[str, RunMetrics]] = {}
    for m in ms:
        points.setdefault((m.experiment, m.intent, m.slo_scale, m.trace, m.rate), {})[m.system] = m
    groups: dict[tuple, dict[str, list[tuple[RunMetrics, RunMetrics]]]] = {}
    for (exp, intent, slo, _, _), p in sorted(points.items()):
        if "iserve" not in p:
            continue
        for system, other in p.items():
            if system != "iserve":
                groups.setdefault((exp, intent, slo), {}).setdefault(system, []).append((p["iserve"], other))

    def fmt(vals: list[float], higher: bool) -> tuple[str, str]:
        vals = [v for v in vals if not math.isnan(v)]
        if not vals:
            return "-", "-"
        if higher:
            return f"{statistics.fmean(vals):.2f}x", f"{min(vals):.2f}x to {max(vals):.2f}x"
        return f"{statistics.fmean(vals):+.1%}", f"{min(vals):+.1%} to {max(vals):+.1%}"

    rows = []
    for (exp, intent, slo), by_sys in sorted(groups.items()):
        name, _, higher = _point_metric(by_sys[next(iter(by_sys))][0][0])
        pooled: list[tuple[RunMetrics, RunMetrics]] = []
        for system in sorted(by_sys, key=_sys_key) + ["*"]:
            if system == "*":
                if len([x for x in by_sys if x != "oracle"]) < 2:
                    continue
                pairs, label = pooled, "all baselines"
            else:
                pairs, label = by_sys[system], _label(system)
                if system != "oracle":
                    pooled.extend(pairs)
            better = 0
            for ours, other in pairs:
                o, t = _point_metric(ours)[1], _point_metric(other)[1]
                of, tf = (0, 0) if higher else (ours.failed, other.failed)
                better += (of, -o if higher else o) <= (tf, -t if higher else t)
            # a system that drops a model is fast on the others: a smaller-is-better metric is averaged only
            # over the points where neither system failed a request (SLO attainment and throughput count
            # failures already)
            same = pairs if higher else [(a, b) for a, b in pairs if a.failed == 0 and b.failed == 0]
            ch, rng = fmt([_change(_point_metric(a)[1], _point_metric(b)[1], higher) for a, b in same], higher)
            p50 = thr = "-"
            if exp == "fig11":
                p50 = fmt([_change(a.p50_ms, b.p50_ms, False) for a, b in same], False)[0]
                thr = fmt([_change(a.gpu_throughput, b.gpu_throughput, True) for a, b in same], True)[0]
            rows.append([exp, intent + (f" {slo:g}x" if slo else ""), label, str(len(pairs)),
                         f"{better}/{len(pairs)}", name, str(len(same)), ch, rng, p50, thr])
    if not rows:
        return "No point has an iServe run and another system's."
    return _table(["experiment", "intent", "vs", "points", "iServe at least as good", "metric", "averaged over",
                   "iServe vs it (mean)", "range", "p50 latency (mean)", "GPU throughput (mean)"], rows)


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, title: str = "iServe evaluation",
                 extra: str = "") -> Path:
    """Read the runs, write ``report.md`` and the figures' PNGs into ``out``; returns the report path."""
    paths = find_runs(run_dirs)
    if not paths:
        raise FileNotFoundError("no run directories found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ms = [run_metrics(load_run(p)) for p in paths]
    groups: dict[str, list[RunMetrics]] = {}
    for m in ms:
        groups.setdefault(m.experiment, []).append(m)
    kinds = sorted({m.kind for m in ms})
    lines = [f"# {title}", "",
             f"{len(ms)} run{'s' if len(ms) != 1 else ''} ({', '.join(kinds)}), {sum(m.requests for m in ms)} requests. "
             "Metrics are defined in `loadgen/report.py`; latency is end-to-end (queueing included) over finished "
             "requests, GPU throughput is finished requests per GPU-second of GPUs holding a deployment.", ""]
    if extra:
        lines += [extra, ""]
    sections = [
        ("fig11", "Fig. 11: minimise latency", _fig11_table, plot_fig11, "fig11.png"),
        ("fig13", "Fig. 13: minimise cost, memory, GPU-hours", _fig13_table, plot_fig13, "fig13.png"),
        ("fig14", "Fig. 14: SLO attainment", _fig14_table, plot_fig14, "fig14.png"),
        ("fig16", "Fig. 16: scaling the number of models", _fig16_table, plot_fig16, "fig16.png"),
    ]
    for key, heading, table, plot, png in sections:
        sel = groups.pop(key, [])
        if not sel:
            continue
        plot(sel, out / png)
        lines += [f"## {heading}", "", f"![{key}]({png})", "", table(sel), ""]
    for key, sel in sorted(groups.items()):
        lines += [f"## Other runs: {key}", "", _fig11_table(sel), ""]
    lines += ["## iServe against the oracle and the best baseline", "",
              "Each point's own metric (mean latency, cost, memory, GPU-hours or SLO attainment); a negative gap is "
              "better for iServe except for SLO attainment, where a positive one is.", "", _versus(ms), "",
              "## iServe against each system, averaged over loads", "",
              "Per experiment and intent, over the points (traces x rate scales) both systems ran: how often iServe "
              "was at least as good on the point's metric (fewer failed requests first, except for SLO attainment), "
              "and iServe's value against the other's: for a smaller-is-better metric (latency, cost, memory, "
              "GPU-hours) the relative change (ours - theirs) / theirs, negative when iServe is better; for a "
              "larger-is-better one (SLO attainment, Fig. 16's cluster throughput; Fig. 11's GPU throughput) the "
              "ratio ours / theirs, above 1x when iServe is better. A smaller-is-better metric is averaged only over "
              "the points where neither system failed a request (\"averaged over\"): a system that drops a model "
              "is fast on the others; a point where either value is zero or missing is left out of the mean too. \"all baselines\" pools every baseline's points (not the oracle's), as the paper's "
              "\"on average across loads compared to the baselines\".", "", _per_baseline(ms), "",
              "## Runs", "", _table(["run", "kind", "system", "trace", "rate", "intent"],
                                    [[m.path, m.kind, m.system, m.trace, f"{m.rate:g}", m.intent]
                                     for m in sorted(ms, key=_sort_key)]), ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    """``iserve report RUN_DIR [RUN_DIR ...] --out DIR`` (``iserve report sweep ...``: :func:`main_sweep`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        return main_sweep(argv[1:])
    ap = argparse.ArgumentParser(prog="iserve report", description="Tables and plots (report.md, fig*.png) of live "
                                 "or simulated runs; 'iserve report sweep --help' simulates a whole evaluation.")
    ap.add_argument("runs", nargs="+", help="run directories, or folders holding run directories")
    ap.add_argument("--out", required=True, help="folder for report.md and the PNGs")
    ap.add_argument("--title", default="iServe evaluation")
    args = ap.parse_args(argv)
    try:
        path = write_report(args.runs, args.out, title=args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


# ---------------------------------------------------------------------------------------------------
# the sweep


PAPER_MODELS = ["llama-2-70b", "falcon-40b:2", "llama-2-7b"]
SCALING_MODELS = ["llama-2-7b:6", "llama-2-13b:4", "falcon-7b:5", "gpt-j-6b:6"]  # 21 models


@dataclass(frozen=True)
class Job:
    """One simulated run of a sweep."""

    experiment: str
    system: str
    trace: str
    rate: float
    intent: str
    slo_scale: float
    models: tuple[str, ...]
    deploy_every_s: float
    deploy_batch: int
    aggregate: int
    out: str

    def name(self) -> str:
        sys_name = self.system.replace("*", "-star")
        slo = f"-slo{self.slo_scale:g}" if self.slo_scale else ""
        return f"{self.trace}-r{self.rate:g}-{self.intent}{slo}-{sys_name}"


_CACHE: dict = {}


def _run_job(job: Job, args: argparse.Namespace) -> tuple[str, float, str]:
    """Run one job (in a worker process); returns (run directory, wall seconds, one-line summary)."""
    from .simulator import build_trace, resolve_models, simulate, spec_from_args
    from .traces import trace_name

    mkey = (job.models, args.maps, args.gpu_type, args.gpus)
    if mkey not in _CACHE:
        _CACHE[mkey] = resolve_models(list(job.models), maps_dir=args.maps or None, gpu_type=args.gpu_type, max_gpus=args.gpus)
    tkey = (job.trace, job.rate, args.interval_s, job.aggregate, args.seed, args.duration_s)
    if tkey not in _CACHE:
        _CACHE[tkey] = build_trace(job.trace, rate=job.rate, interval_s=args.interval_s, aggregate=job.aggregate,
                                   seed=args.seed, duration_s=args.duration_s)
    trace = _CACHE[tkey]
    spec = spec_from_args(args, models=_CACHE[mkey], trace_label=trace_name(job.trace), trace=trace, system=job.system,
                          intent_kind=job.intent, rate=job.rate, slo_scale=job.slo_scale,
                          deploy_every_s=job.deploy_every_s, deploy_batch=job.deploy_batch,
                          notes=f"experiment={job.experiment}")
    spec.aggregate = job.aggregate
    t0, started = time.perf_counter(), time.time()
    res = simulate(spec, oracle_candidates=args.oracle_candidates, oracle_evals=args.oracle_evals)
    wall = time.perf_counter() - t0
    res.meta = msgspec.structs.replace(res.meta, started_at=started, ended_at=time.time(),
                                       command=["iserve", "report", "sweep", f"experiment={job.experiment}", job.name()])
    res.write(job.out)
    ok = sum(r.status == "ok" for r in res.requests)
    return job.out, wall, f"{job.experiment} {job.name()}: {ok}/{len(res.requests)} ok in {wall:.1f} s"


def plan_runs_dir(args: argparse.Namespace) -> Path:
    """Where the sweep writes its run directories: ``--runs``, else ``OUT/runs``."""
    return Path(args.runs) if getattr(args, "runs", "") else Path(args.out) / "runs"


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Every run of the sweep: systems x traces x rates x intents, per experiment."""
    systems = list(args.systems) + (["oracle"] if args.oracle and "oracle" not in args.systems else [])
    runs_dir = plan_runs_dir(args)
    jobs: list[Job] = []

    def add(exp: str, system: str, trace: str, rate: float, intent: str, slo: float, models, every, batch, agg):
        j = Job(exp, system, trace, rate, intent, slo, tuple(models), every, batch, agg, "")
        jobs.append(Job(**{**j.__dict__, "out": str(runs_dir / exp / j.name())}))

    for exp in args.experiments:
        if exp == "fig16":
            for intent in args.scaling_intents:
                for system in [x for x in systems if x != "oracle"]:  # 21 models: too many for the search
                    add(exp, system, args.scaling_trace, args.scaling_rate, intent, 0.0, args.scaling_models,
                        args.scaling_every_s, 2, args.scaling_aggregate)
            continue
        intents = {"fig11": ["min-latency"], "fig13": list(COST_INTENTS), "fig14": ["latency-slo"]}[exp]
        slos = args.slo_scales if exp == "fig14" else [0.0]
        for trace in args.traces:
            for rate in args.rates:
                for intent in intents:
                    for slo in slos:
                        for system in systems:
                            add(exp, system, trace, rate, intent, slo, args.models, args.deploy_every_s, 1, args.aggregate)
    return jobs


def main_sweep(argv: list[str] | None = None) -> int:
    """``iserve report sweep``: simulate systems x traces x rates x intents (and the 21-model scaling
    run), write every run under ``OUT/runs/``, then the report into ``OUT``."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .policies import SYSTEMS
    from .simulator import add_common_args

    ap = argparse.ArgumentParser(prog="iserve report sweep", description="Simulate the paper's evaluation (Fig. 11, 13, "
                                 "14, 16) with iServe's own decisions and the baselines, then write the report.")
    ap.add_argument("--out", required=True, help="folder for the report (and runs/, unless --runs)")
    ap.add_argument("--runs", default="", help="folder for the run directories (default OUT/runs); e.g. a scratch "
                    "folder, so that only the report lands in OUT")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS) + ["oracle"])
    ap.add_argument("--oracle", action="store_true", help="add the oracle (static configuration chosen with the trace known)")
    ap.add_argument("--experiments", nargs="+", default=["fig11", "fig13", "fig14", "fig16"],
                    choices=["fig11", "fig13", "fig14", "fig16"])
    ap.add_argument("--traces", nargs="+", default=["code", "conv"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument("--models", nargs="+", default=PAPER_MODELS, help="models of Fig. 11/13/14 (name:N for N instances)")
    ap.add_argument("--deploy-every-s", type=float, default=300.0, help="one deployment every this many seconds (paper: 300)")
    ap.add_argument("--slo-scales", nargs="+", type=float, default=[2.5, 7.5], help="SLO scales of Fig. 14 (paper: 2.5-7.5)")
    ap.add_argument("--scaling-models", nargs="+", default=SCALING_MODELS, help="models of Fig. 16 (default: 21)")
    ap.add_argument("--scaling-intents", nargs="+", default=["min-latency", "min-cost", "min-gpu-hours", "min-memory"])
    ap.add_argument("--scaling-trace", default="conv", help="Fig. 16's trace (paper: two conversation traces merged)")
    ap.add_argument("--scaling-rate", type=float, default=0.2, help="Fig. 16's rate scale (medium load)")
    ap.add_argument("--scaling-aggregate", type=int, default=2, help="Fig. 16: intervals aggregated (2: two traces' worth)")
    ap.add_argument("--scaling-every-s", type=float, default=180.0, help="Fig. 16: two models every this many seconds (paper: 180)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="parallel simulations")
    add_common_args(ap)
    args = ap.parse_args(argv)
    console = Console()
    gpu_label = args.gpu_type
    if args.maps:
        from .simulator import load_maps

        try:
            types = sorted({c.gpu_type for c in load_maps(args.maps).values()})
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}")
            return 2
        gpu_label = " / ".join(types)  # the simulation runs on the maps' GPU type whatever --gpu-type says
    jobs = plan_jobs(args)
    t0 = time.perf_counter()
    done: list[str] = []
    walls: list[float] = []
    failures: list[str] = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), TextColumn("{task.fields[last]}"), console=console) as progress:
        task = progress.add_task("simulating", total=len(jobs), last="")
        if args.workers <= 1:
            for job in jobs:
                try:
                    out, wall, line = _run_job(job, args)
                    done.append(out)
                    walls.append(wall)
                except Exception as e:  # one failed point must not lose the others
                    failures.append(f"{job.experiment} {job.name()}: {type(e).__name__}: {e}")
                    line = failures[-1]
                progress.update(task, advance=1, last=line)
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                futs = {pool.submit(_run_job, job, args): job for job in jobs}
                for fut in as_completed(futs):
                    job = futs[fut]
                    try:
                        out, wall, line = fut.result()
                        done.append(out)
                        walls.append(wall)
                    except Exception as e:
                        failures.append(f"{job.experiment} {job.name()}: {type(e).__name__}: {e}")
                        line = failures[-1]
                    progress.update(task, advance=1, last=line)
    wall = time.perf_counter() - t0
    cmd = " ".join(shlex.quote(a) for a in ["iserve", "report", "sweep", *(sys.argv[2:] if argv is None else argv)])
    extra = (f"Simulated sweep: {len(done)} runs in {wall:.1f} s wall ({sum(walls):.1f} s of simulation, "
             f"{args.workers} worker{'s' if args.workers != 1 else ''}); models {' '.join(args.models)}; "
             f"{args.gpus} x {gpu_label}; maps: {args.maps or 'synthetic (roofline)'}"
             + (f"; each run replays the first {args.duration_s:g} s of the compressed trace" if args.duration_s else "")
             + f".\n\nCommand: `{cmd}`")
    if failures:
        extra += "\n\nFailed points:\n\n" + "\n".join(f"- {f}" for f in failures)
    if not done:
        console.print("[red]no run finished[/red]")
        return 1
    report = write_report([plan_runs_dir(args)], args.out, extra=extra)
    console.print(f"{len(done)} runs in {wall:.1f} s; wrote {report}")
    for f in failures:
        console.print(f"[red]failed:[/red] {f}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
