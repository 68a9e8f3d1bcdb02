"""Tables the command line prints as ``rich`` tables: a model's configuration estimates, and the
deployments with their queues."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.markup import escape
from rich.table import Table

from .messages import ConfigEstimate, DeploymentRecord, QueueStats

GIB = 2**30

ESTIMATE_COLUMNS = ["config", "gpus", "ttft_ms", "tpot_ms", "latency_ms", "total_gib", "per_gpu_gib"]


def fmt_gib(b: int | float) -> str:
    return f"{b / GIB:.2f}"


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
    t = Table(title=title)
    for col in ESTIMATE_COLUMNS:
        if col == "config":
            t.add_column(col, no_wrap=True, min_width=28)
        else:
            t.add_column(col.replace("_gib", " GiB").replace("_ms", " ms").replace("_", " "), justify="right")
    for r in rows:
        t.add_row(*[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in ESTIMATE_COLUMNS])
    return t


DEPLOYMENT_COLUMNS = ["id", "model", "config", "gpus (layers)", "status"]
QUEUE_COLUMNS = ["id", "running", "queued", "batch", "KV blocks", "done", "TTFT p50 ms", "e2e p50 ms"]


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
    running and queued requests, the batch size, the KV pool's blocks, completions and latencies."""
    return [
        d.deployment_id,
        str(q.in_flight) if q else "-",
        str(q.queue_depth) if q else "-",
        str(q.max_batch if q else d.max_batch),
        kv_blocks(q),
        str(q.completed) if q else "-",
        f"{q.ttft_ms_p50:.1f}" if q else "-",
        f"{q.e2e_ms_p50:.1f}" if q else "-",
    ]


def deployments_table(deps: Sequence[DeploymentRecord]) -> Table:
    t = Table(title="Deployments")
    for col in DEPLOYMENT_COLUMNS:
        t.add_column(col)
    for d in deps:
        t.add_row(*deployment_row(d))
    return t


def queues_table(deps: Sequence[DeploymentRecord], queues: Mapping[str, QueueStats]) -> Table:
    """Each deployment's requests: running and queued, its batch size and KV pool use, and timings."""
    t = Table(title="Queues")
    for col in QUEUE_COLUMNS:
        if col == "id":
            t.add_column(col, overflow="fold")
        else:
            t.add_column(col, justify="right")
    for d in deps:
        t.add_row(*queue_row(d, queues.get(d.deployment_id)))
    return t
