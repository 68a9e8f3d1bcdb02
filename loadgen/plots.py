"""The report's figures (PNG, drawn with matplotlib) and the names and colours of the systems in them."""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import RunMetrics

SYSTEM_ORDER = ("iserve", "oracle", "max-tp", "max-pp", "accelerate", "alpaserve", "alpaserve*")
# The baselines are simulated policies, named for what they do, not as the products the paper ran
# (the paper's names: max-TP = TensorRT-LLM_TP, max-PP = TensorRT-LLM_PP, FSDP = Accelerate).
SYSTEM_LABEL = {
    "iserve": "iServe",
    "oracle": "oracle (static, trace known)",
    "max-tp": "max-TP policy",
    "max-pp": "max-PP policy",
    "accelerate": "FSDP policy",
    "alpaserve": "AlpaServe policy",
    "alpaserve*": "AlpaServe* policy",
}
INTENT_SHORT = {
    "min-latency": "l",
    "min-cost": "c",
    "min-gpu-hours": "g",
    "min-memory": "m",
    "latency-slo": "slo",
    "cost-budget": "b",
}


def system_key(system: str) -> tuple[int, str]:
    """Where a system sorts in tables and legends: iServe, the oracle, then the baselines."""
    return (SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER), system)


def system_label(system: str) -> str:
    """A system's name as the paper writes it."""
    return SYSTEM_LABEL.get(system, system)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(system: str) -> str:
    palette = ["#d62728", "#7f7f7f", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#e377c2"]
    return palette[system_key(system)[0] % len(palette)]


def _lines(ax, ms: list[RunMetrics], value, *, style: str = "-", label_suffix: str = "", log: bool = False) -> None:
    by_sys: dict[str, list[RunMetrics]] = {}
    for m in ms:
        by_sys.setdefault(m.system, []).append(m)
    for system in sorted(by_sys, key=system_key):
        pts = sorted((m.rate, value(m)) for m in by_sys[system])
        pts = [(x, y) for x, y in pts if y is not None and not math.isnan(y) and not (log and y <= 0)]
        if not pts:
            continue
        ours, oracle = system == "iserve", system == "oracle"
        # the oracle often coincides with iServe (it starts from iServe's choices): drawn on top, thin, with crosses
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            style,
            marker="o" if ours else "x" if oracle else "s",
            color=_color(system),
            label=system_label(system) + label_suffix,
            linewidth=2.2 if ours else 1.2,
            zorder=4 if oracle else 3 if ours else 2,
            markersize=6 if ours or oracle else 4,
            markerfacecolor=_color(system) if ours else "none",
        )
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("rate scale")
    ax.grid(True, alpha=0.3)


def _bars(ax, ms: list[RunMetrics], value, *, log: bool = False) -> None:
    """Grouped bars: one group per rate, one bar per system."""
    rates = sorted({m.rate for m in ms})
    systems = sorted({m.system for m in ms}, key=system_key)
    width = 0.8 / max(1, len(systems))
    for j, system in enumerate(systems):
        xs, ys = [], []
        for i, rate in enumerate(rates):
            vals = [value(m) for m in ms if m.system == system and m.rate == rate]
            vals = [v for v in vals if v is not None and not math.isnan(v) and not math.isinf(v)]
            if vals and (not log or vals[0] > 0):
                xs.append(i + (j - (len(systems) - 1) / 2) * width)
                ys.append(vals[0])
        ax.bar(xs, ys, width=width, color=_color(system), label=system_label(system))
    ax.set_xticks(range(len(rates)), [f"{r:g}" for r in rates])
    ax.set_xlabel("rate scale")
    if log:
        ax.set_yscale("log")
    ax.grid(True, axis="y", alpha=0.3)


def _save(fig, path: Path, bottom: float = 0.0) -> None:
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plot_fig11(ms: list[RunMetrics], path: Path, title: str = "Fig. 11: min-latency intent") -> None:
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
    keep = [(h, lab) for h, lab in zip(handles, labels) if not lab.endswith(" p95")]
    fig.legend([h for h, _ in keep], [lab for _, lab in keep], loc="lower center", ncol=min(7, len(keep)), fontsize=8)
    fig.suptitle(title)
    _save(fig, path, bottom=0.05)


def plot_fig13(ms: list[RunMetrics], path: Path, title: str = "Fig. 13: cost, memory and GPU-hours intents") -> None:
    plt = _plt()
    traces = sorted({m.trace for m in ms})
    cols = [
        ("min-cost", "cost per request (GiB-s)", lambda m: m.cost_intent),
        ("min-memory", "memory (GiB)", lambda m: m.memory_gib),
        ("min-gpu-hours", "GPU-hours", lambda m: m.gpu_hours),
    ]
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
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(labels)), fontsize=8)
    fig.suptitle(title)
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
            _lines(
                ax,
                [m for m in ms if m.trace == trace and m.slo_scale == scale],
                lambda m: 100 * m.slo_attainment if m.slo_attainment is not None else math.nan,
            )
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
    systems = sorted({m.system for m in ms}, key=system_key)
    fig, axes = plt.subplots(2, 1, figsize=(max(7, 1.6 * len(intents) * max(1, len(systems)) / 2), 8), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for row, (ylabel, value) in enumerate(
        [
            ("models deployed", lambda m: m.models_deployed),
            ("cluster throughput (requests/s)", lambda m: m.cluster_throughput),
        ]
    ):
        ax = axes[row][0]
        for j, system in enumerate(systems):
            xs, ys = [], []
            for i, intent in enumerate(intents):
                vals = [value(m) for m in ms if m.system == system and m.intent == intent]
                if vals:
                    xs.append(i + (j - (len(systems) - 1) / 2) * width)
                    ys.append(vals[0])
            ax.bar(xs, ys, width=width, color=_color(system), label=system_label(system))
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


def plot_fig10(ms: list[RunMetrics], path: Path) -> None:
    """Placement policies: p50 and p95 end-to-end latency (left) and GPUs used (right) per policy."""
    plt = _plt()
    runs = sorted(ms, key=lambda m: m.placement)
    names = [m.placement or "?" for m in runs]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.4 * len(runs) + 4), 4), squeeze=False)
    ax = axes[0][0]
    xs = list(range(len(runs)))
    ax.bar([x - 0.2 for x in xs], [m.p50_ms / 1000 for m in runs], width=0.4, label="p50", color="#4c72b0")
    ax.bar([x + 0.2 for x in xs], [m.p95_ms / 1000 for m in runs], width=0.4, label="p95", color="#dd8452")
    ax.set_xticks(xs, names, rotation=20)
    ax.set_ylabel("end-to-end latency (s)")
    ax.set_title("Fig. 10: placement policies")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[0][1]
    ax.bar(xs, [m.gpus_used for m in runs], width=0.6, color="#55a868")
    ax.set_xticks(xs, names, rotation=20)
    ax.set_ylabel("GPUs used")
    ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path, bottom=0.15)


def plot_fig12(ms: list[RunMetrics], path: Path) -> None:
    plot_fig11(ms, path, "Fig. 12: several smaller models, min-latency intent")


def plot_fig24(ms: list[RunMetrics], path: Path) -> None:
    plot_fig13(ms, path, "Fig. 24: a mix of large and small models (cost, memory and GPU-hours shown)")
