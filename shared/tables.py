"""Tables the command line prints as ``rich`` tables: the GPUs, the models, a model's configuration
estimates and exclusions, the deployments with their queues.

Every table fits 80 columns (a default terminal, a CI log; ``tests/test_tables.py`` renders each at
that width): compact borders, short headers, and long text (ids, reasons, lists) folded onto more
lines rather than cut or pushed past the edge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich import box
from rich.markup import escape
from rich.table import Table

from .messages import (
    AutoscaleState,
    ConfigEstimate,
    DeploymentRecord,
    ExcludedConfig,
    GpuLoad,
    ModelRecord,
    QualityReport,
    QueueStats,
)

GIB = 2**30

ESTIMATE_COLUMNS = ["config", "gpus", "ttft_ms", "tpot_ms", "latency_ms", "total_gib", "per_gpu_gib"]


def fmt_gib(b: int | float) -> str:
    return f"{b / GIB:.2f}"


def table(title: str = "", **kw) -> Table:
    """A table in the compact style all of them share: a rule under the header, no outer edge,
    one space between columns."""
    return Table(
        title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True, **kw
    )


def add_text_column(t: Table, header: str, *, min_width: int | None = None) -> None:
    """A column of free text (ids, lists, reasons): folded onto more lines when the table is narrow."""
    t.add_column(header, overflow="fold", min_width=min_width)


def add_number_column(t: Table, header: str) -> None:
    t.add_column(header, justify="right", no_wrap=True)


def estimate_row(e: ConfigEstimate, prompt: int, output: int) -> dict[str, float | str]:
    c = e.config
    per_stage_layers = -(-e.num_layers // c.pp)
    per_gpu = e.stage_bytes(per_stage_layers, first=True, last=c.pp == 1)
    return {
        "config": c.key(),
        "gpus": c.gpus,
        "ttft_ms": e.ttft_ms(prompt),
        "tpot_ms": e.tpot_ms,
        "latency_ms": e.latency_ms(prompt, output),
        "total_gib": e.total_bytes / GIB,
        "per_gpu_gib": per_gpu / GIB,
    }


def estimates_table(
    estimates: list[ConfigEstimate],
    *,
    prompt: int,
    output: int,
    sort: str = "latency_ms",
    limit: int = 0,
    title: str = "",
) -> Table:
    """The estimates as table rows sorted by ``sort`` (then the configuration key), at most ``limit``."""
    rows = [estimate_row(e, prompt, output) for e in estimates]
    rows.sort(key=lambda r: (r[sort], r["config"]))
    if limit:
        rows = rows[:limit]
    t = table(title)
    for col in ESTIMATE_COLUMNS:
        if col == "config":
            add_text_column(t, col, min_width=14)
        else:
            add_number_column(t, col.replace("_gib", " GiB").replace("_ms", " ms").replace("_", " "))
    for r in rows:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in ESTIMATE_COLUMNS])
    return t


DEPLOYMENT_COLUMNS = ["id", "model", "config", "gpus (layers)", "status"]
QUEUE_COLUMNS = ["id", "running", "queued", "KV blocks", "done", "TTFT ms", "e2e ms"]


def kv_blocks(q: QueueStats | None) -> str:
    """The KV pool's use as ``used/total`` blocks, or ``-`` when the worker does not report it."""
    if q is None or q.kv_blocks_total <= 0:
        return "-"
    return f"{q.kv_blocks_used}/{q.kv_blocks_total}"


def deployment_row(d: DeploymentRecord) -> list[str]:
    return [
        d.deployment_id,
        d.model,
        d.config.key(),
        " ".join(f"{g.agent_id}/{g.gpu_index}({g.num_layers})" for g in d.gpus),
        escape(d.status + (f": {d.reason}" if d.reason else "")),
    ]


def queue_row(d: DeploymentRecord, q: QueueStats | None) -> list[str]:
    """What the scheduler reports of a deployment (``None``: nothing; the record's batch size then):
    running requests of the batch size, queued ones, the KV pool's blocks, completions and latencies."""
    return [
        d.deployment_id,
        f"{q.in_flight if q else '-'}/{q.max_batch if q else d.max_batch}",
        str(q.queue_depth) if q else "-",
        kv_blocks(q),
        str(q.completed) if q else "-",
        f"{q.ttft_ms_p50:.1f}" if q else "-",
        f"{q.e2e_ms_p50:.1f}" if q else "-",
    ]


def deployments_table(deps: Sequence[DeploymentRecord]) -> Table:
    t = table("Deployments")
    for col in DEPLOYMENT_COLUMNS:
        add_text_column(t, col)
    for d in deps:
        t.add_row(*deployment_row(d))
    return t


def queues_table(deps: Sequence[DeploymentRecord], queues: Mapping[str, QueueStats]) -> Table:
    """Each deployment's requests: running (of its batch size) and queued, its KV pool use, and timings."""
    t = table("Queues (latencies: medians)")
    for col in QUEUE_COLUMNS:
        if col == "id":
            add_text_column(t, col, min_width=16)
        else:
            add_number_column(t, col)
    for d in deps:
        t.add_row(*queue_row(d, queues.get(d.deployment_id)))
    return t


AUTOSCALE_COLUMNS = ["model", "replicas", "added", "last action", "why"]


def autoscale_table(states: Sequence[AutoscaleState], at: float) -> Table:
    """Per model the autoscaler watches: serving replicas, those it added (draining ones marked), and
    its last action, how long ago (``at``: now, wall time), and why."""
    t = table("Autoscaling")
    for col in AUTOSCALE_COLUMNS:
        add_number_column(t, col) if col == "replicas" else add_text_column(t, col)
    for s in states:
        added = " ".join(f"{i} (draining)" if i in s.draining else i for i in s.added) or "-"
        last = f"{s.last_action} {at - s.last_action_at:.0f} s ago" if s.last_action else "-"
        t.add_row(s.model, str(s.replicas), escape(added), last, escape(s.last_reason or "-"))
    return t


GPU_COLUMNS = ["agent", "gpu", "type", "total GiB", "free GiB", "load (window)", "util %", "workers"]
MODEL_COLUMNS = ["name", "type", "layers", "GiB", "status", "profiled on"]


def gpu_row(g: GpuLoad) -> list[str]:
    return [
        g.agent_id,
        str(g.gpu_index),
        g.gpu_type + (" (sim)" if g.simulated else ""),
        fmt_gib(g.total_bytes),
        fmt_gib(g.free_bytes),
        f"{g.busy_fraction:.2f} ({g.window_s:.0f}s)",
        f"{g.util_percent:.0f}",
        ", ".join(g.workers),
    ]


def gpus_table(loads: Sequence[GpuLoad]) -> Table:
    """Each GPU's memory, busy fraction over the agent's window, utilization and workers."""
    t = table("GPUs")
    for col in GPU_COLUMNS:
        if col in ("agent", "type", "workers"):
            add_text_column(t, col)
        else:
            add_number_column(t, col.replace("load (window)", "load (win)"))
    for g in loads:
        t.add_row(*gpu_row(g))
    return t


def model_row(m: ModelRecord) -> list[str]:
    return [
        m.name,
        m.arch.model_type,
        str(m.arch.num_layers),
        fmt_gib(m.weights.checkpoint_bytes),
        escape(m.status + (f": {m.status_reason}" if m.status_reason else "")),
        ", ".join(m.profiled_gpu_types),
    ]


def models_table(models: Sequence[ModelRecord]) -> Table:
    t = table("Models")
    for col in MODEL_COLUMNS:
        if col in ("layers", "GiB"):
            add_number_column(t, col)
        else:
            add_text_column(t, col)
    for m in models:
        t.add_row(*model_row(m))
    return t


def excluded_table(excluded: Sequence[ExcludedConfig]) -> Table:
    """Configurations of a map the engine cannot run, with the reason."""
    t = table("Excluded configurations")
    add_text_column(t, "config", min_width=14)
    add_text_column(t, "reason")
    for x in excluded:
        t.add_row(x.config.key(), escape(x.reason))
    return t


def quality_caption(report: QualityReport) -> str:
    """How a quality report was measured, one line to print under :func:`quality_table`."""
    layers = "/".join(map(str, report.layers))
    how = f"fingerprints of {layers} layers, extrapolated" if report.method == "fingerprint" else f"{layers} layers"
    return (
        f"{report.method} method ({how}); {report.positions} positions of {report.source}; reference "
        f"{report.reference_dtype} on {report.device}; {report.seconds:.1f} s"
    )


def quality_table(report: QualityReport) -> Table:
    """The measured quality cost of a model's lossy variants, least lossy first (docs/quality.md)."""
    t = table("Quality cost of the lossy variants")
    add_text_column(t, "variant", min_width=14)
    t.add_column("kl", justify="right")
    t.add_column("top1", justify="right")
    t.add_column("ppl_x", justify="right")
    for v in sorted(report.variants, key=lambda v: (v.kl, -v.top1, v.key())):
        t.add_row(v.key(), f"{v.kl:.4g}", f"{v.top1:.1%}", f"{v.ppl_ratio:.3f}" if v.ppl_ratio > 0 else "-")
    return t
