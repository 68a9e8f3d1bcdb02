"""Tables the command line prints: a model's configuration estimates as a ``rich`` table."""

from __future__ import annotations

from rich.table import Table

from .messages import ConfigEstimate

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
