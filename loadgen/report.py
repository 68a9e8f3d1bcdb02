"""``iserve report RUN_DIR [RUN_DIR ...] --out DIR``: tables and figures of live or simulated runs,
reproducing the paper's evaluation (docs/simulator.md#the-report); ``iserve report sweep``
(:func:`main_sweep`) simulates a whole evaluation first (:mod:`.sweep`)."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from . import sweep
from .metrics import COST_INTENTS, RunMetrics, intent_metric, run_metrics
from .plots import (
    plot_fig10,
    plot_fig11,
    plot_fig12,
    plot_fig13,
    plot_fig14,
    plot_fig16,
    plot_fig24,
    system_key,
    system_label,
)
from .records import META, load_run
from .simulator import load_maps

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


def _quality(m: RunMetrics) -> str:
    """The quality cost of the run's lossy configurations ("lossless" when it chose none): as the
    deployment recorded it, "not measured" when its map had none or the run predates the record."""
    lossy = sorted({k for keys in m.configs.values() for k in keys if not k.endswith("-wfp16-kvfp16-pnone")})
    if not lossy:
        return "lossless"
    return "; ".join(f"{k}: {m.quality.get(k) or 'not measured'}" for k in lossy)


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# the report


def _sort_key(m: RunMetrics) -> tuple:
    return (m.trace, m.rate, m.intent, m.slo_scale, system_key(m.system))


def _experiment(m: RunMetrics) -> str:
    """The run's experiment and serving mode: ``fig11`` (the paper's mode), ``fig11-b8`` (batching)."""
    return m.experiment if m.max_batch == 1 else f"{m.experiment}-b{m.max_batch}"


def _fig10_table(ms: list[RunMetrics]) -> str:
    rows = [
        [
            m.placement,
            str(m.models_deployed),
            str(m.requests),
            str(m.failed),
            _ms(m.p50_ms),
            _ms(m.p95_ms),
            _ms(m.mean_ms),
            str(m.gpus_used),
            f"{m.gpu_seconds / 3600:.2f}",
        ]
        for m in sorted(ms, key=lambda m: m.placement)
    ]
    return _table(["placement", "models", "requests", "failed", "p50", "p95", "mean", "GPUs used", "GPU-hours"], rows)


def _fig11_table(ms: list[RunMetrics]) -> str:
    rows = [
        [
            m.trace,
            f"{m.rate:g}",
            system_label(m.system),
            str(m.requests),
            str(m.failed),
            _ms(m.p50_ms),
            _ms(m.p95_ms),
            _ms(m.mean_ms),
            _n(m.gpu_throughput),
            _n(m.token_throughput),
            str(m.gpus_used),
            _configs(m),
        ]
        for m in sorted(ms, key=_sort_key)
    ]
    return _table(
        [
            "trace",
            "rate",
            "system",
            "requests",
            "failed",
            "p50",
            "p95",
            "mean",
            "req/GPU-s",
            "tok/GPU-s",
            "GPUs",
            "configurations",
        ],
        rows,
    )


def _fig13_table(ms: list[RunMetrics]) -> str:
    rows = [
        [
            m.intent,
            m.trace,
            f"{m.rate:g}",
            system_label(m.system),
            str(m.failed),
            _n(m.cost_intent),
            _n(m.memory_gib),
            _n(m.gpu_hours),
            _ms(m.p50_ms),
            _n(m.gpu_throughput),
            str(m.gpus_used),
            _configs(m),
            _quality(m),
        ]
        for m in sorted(
            ms, key=lambda m: (COST_INTENTS.index(m.intent) if m.intent in COST_INTENTS else 9,) + _sort_key(m)
        )
    ]
    return _table(
        [
            "intent",
            "trace",
            "rate",
            "system",
            "failed",
            "cost/request",
            "memory GiB",
            "GPU-hours",
            "p50",
            "req/GPU-s",
            "GPUs",
            "configurations",
            "quality cost",
        ],
        rows,
    )


def _fig14_table(ms: list[RunMetrics]) -> str:
    rows = [
        [
            f"{m.slo_scale:g}x",
            m.trace,
            f"{m.rate:g}",
            system_label(m.system),
            _pcts(m.slo_attainment),
            str(m.failed),
            _ms(m.p50_ms),
            _ms(m.p95_ms),
            str(m.models_deployed),
            _configs(m),
        ]
        for m in sorted(ms, key=lambda m: (m.slo_scale,) + _sort_key(m))
    ]
    return _table(
        ["SLO", "trace", "rate", "system", "attainment", "failed", "p50", "p95", "models", "configurations"], rows
    )


def _fig16_table(ms: list[RunMetrics]) -> str:
    rows = [
        [
            m.intent,
            system_label(m.system),
            f"{m.models_deployed}/{m.models_requested}",
            _n(m.cluster_throughput),
            _n(m.gpu_throughput),
            str(m.failed),
            _ms(m.p50_ms),
            _n(m.memory_gib),
            str(m.gpus_used),
        ]
        for m in sorted(ms, key=lambda m: (m.intent, system_key(m.system)))
    ]
    return _table(
        ["intent", "system", "models deployed", "cluster req/s", "req/GPU-s", "failed", "p50", "memory GiB", "GPUs"],
        rows,
    )


def _versus(ms: list[RunMetrics]) -> str:
    """Per point: iServe's metric, the oracle's and the best baseline's, with the gaps. Baselines are
    compared as the oracle is searched: fewer failed requests first (a system that drops a model
    does not win on the latency of the others), then the metric; for SLO attainment, failures are
    misses already."""
    points: dict[tuple, dict[str, RunMetrics]] = {}
    for m in ms:
        if m.experiment != "fig10":  # iServe against itself (placement policies): no baseline to compare
            points.setdefault((_experiment(m), m.trace, m.rate, m.intent, m.slo_scale), {})[m.system] = m
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
        rows.append(
            [
                key[0],
                key[1],
                f"{key[2]:g}",
                key[3] + (f" {key[4]:g}x" if key[4] else ""),
                name,
                show(ours),
                show(oracle),
                gap(oracle),
                f"{system_label(best.system)}: {show(best)}" if best else "-",
                gap(best),
                beats,
            ]
        )
    if not rows:
        return "No point has an iServe run."
    return _table(
        [
            "experiment",
            "trace",
            "rate",
            "intent",
            "metric",
            "iServe",
            "oracle",
            "iServe vs oracle",
            "best baseline",
            "iServe vs best",
            "iServe best?",
        ],
        rows,
    )


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
        if m.experiment != "fig10":
            points.setdefault((_experiment(m), m.intent, m.slo_scale, m.trace, m.rate), {})[m.system] = m
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
        for system in sorted(by_sys, key=system_key) + ["*"]:
            if system == "*":
                if len([x for x in by_sys if x != "oracle"]) < 2:
                    continue
                pairs, label = pooled, "all baselines"
            else:
                pairs, label = by_sys[system], system_label(system)
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
            rows.append(
                [
                    exp,
                    intent + (f" {slo:g}x" if slo else ""),
                    label,
                    str(len(pairs)),
                    f"{better}/{len(pairs)}",
                    name,
                    str(len(same)),
                    ch,
                    rng,
                    p50,
                    thr,
                ]
            )
    if not rows:
        return "No point has an iServe run and another system's."
    return _table(
        [
            "experiment",
            "intent",
            "vs",
            "points",
            "iServe at least as good",
            "metric",
            "averaged over",
            "iServe vs it (mean)",
            "range",
            "p50 latency (mean)",
            "GPU throughput (mean)",
        ],
        rows,
    )


def write_report(
    run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, *, title: str = "iServe evaluation", extra: str = ""
) -> Path:
    """Read the runs, write ``report.md`` and the figures' PNGs into ``out``; returns the report path."""
    paths = find_runs(run_dirs)
    if not paths:
        raise FileNotFoundError("no run directories found")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ms = [run_metrics(load_run(p)) for p in paths]
    groups: dict[str, list[RunMetrics]] = {}
    for m in ms:
        groups.setdefault(_experiment(m), []).append(m)
    kinds = sorted({m.kind for m in ms})
    lines = [
        f"# {title}",
        "",
        f"{len(ms)} run{'s' if len(ms) != 1 else ''} ({', '.join(kinds)}), {sum(m.requests for m in ms)} requests. "
        "Metrics are defined in `docs/simulator.md`; latency is end-to-end (queueing included) over finished "
        "requests, GPU throughput is finished requests per GPU-second of GPUs holding a deployment.",
        "",
    ]
    if extra:
        lines += [extra, ""]
    sections = [
        ("fig10", "Fig. 10: placement policies under a fluctuating load", _fig10_table, plot_fig10, "fig10.png"),
        ("fig11", "Fig. 11: minimise latency", _fig11_table, plot_fig11, "fig11.png"),
        ("fig12", "Fig. 12: several smaller models, minimise latency", _fig11_table, plot_fig12, "fig12.png"),
        ("fig13", "Fig. 13: minimise cost, memory, GPU-hours", _fig13_table, plot_fig13, "fig13.png"),
        ("fig14", "Fig. 14: SLO attainment", _fig14_table, plot_fig14, "fig14.png"),
        ("fig16", "Fig. 16: scaling the number of models", _fig16_table, plot_fig16, "fig16.png"),
        ("fig24", "Fig. 24: a mix of large and small models, every intent", _fig13_table, plot_fig24, "fig24.png"),
    ]
    for base, heading, table, plot, png in sections:
        for key in sorted(k for k in groups if k == base or k.startswith(base + "-b")):
            sel = groups.pop(key)
            mode, name = "", png
            if key != base:  # a continuous-batching mode: its own section and figure
                mode = f" (continuous batching, max_batch {key[len(base) + 2 :]})"
                name = png.replace(".png", key[len(base) :] + ".png")
            plot(sel, out / name)
            lines += [f"## {heading}{mode}", "", f"![{key}]({name})", "", table(sel), ""]
    for key, sel in sorted(groups.items()):
        lines += [f"## Other runs: {key}", "", _fig11_table(sel), ""]
    lines += [
        "## iServe against the oracle and the best baseline",
        "",
        "Each point's own metric (mean latency, cost, memory, GPU-hours or SLO attainment); a negative gap is "
        "better for iServe except for SLO attainment, where a positive one is.",
        "",
        _versus(ms),
        "",
        "## iServe against each system, averaged over loads",
        "",
        "Per experiment and intent, over the points (traces x rate scales) both systems ran: how often iServe "
        "was at least as good on the point's metric (fewer failed requests first, except for SLO attainment), "
        "and iServe's value against the other's: for a smaller-is-better metric (latency, cost, memory, "
        "GPU-hours) the relative change (ours - theirs) / theirs, negative when iServe is better; for a "
        "larger-is-better one (SLO attainment, Fig. 16's cluster throughput; Fig. 11's GPU throughput) the "
        "ratio ours / theirs, above 1x when iServe is better. A smaller-is-better metric is averaged only over "
        'the points where neither system failed a request ("averaged over"): a system that drops a model '
        'is fast on the others; a point where either value is zero or missing is left out of the mean too. "all '
        "baselines\" pools every baseline's points (not the oracle's), as the paper's "
        '"on average across loads compared to the baselines".',
        "",
        _per_baseline(ms),
        "",
        "## Runs",
        "",
        _table(
            ["run", "kind", "system", "trace", "rate", "intent"],
            [[m.path, m.kind, m.system, m.trace, f"{m.rate:g}", m.intent] for m in sorted(ms, key=_sort_key)],
        ),
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    """``iserve report RUN_DIR [RUN_DIR ...] --out DIR`` (``iserve report sweep ...``: :func:`main_sweep`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sweep":
        return main_sweep(argv[1:])
    ap = argparse.ArgumentParser(
        prog="iserve report",
        description="Tables and plots (report.md, fig*.png) of live "
        "or simulated runs; 'iserve report sweep --help' simulates a whole evaluation.",
    )
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


def main_sweep(argv: list[str] | None = None) -> int:
    """``iserve report sweep``: simulate systems x traces x rates x intents (and the 21-model scaling
    run), write every run under ``OUT/runs/``, then the report into ``OUT``."""
    from rich.console import Console

    args = sweep.parser().parse_args(argv)
    console = Console()
    gpu_label = args.gpu_type
    if args.maps:
        try:
            types = sorted({c.gpu_type for c in load_maps(args.maps).values()})
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]error:[/red] {e}")
            return 2
        gpu_label = " / ".join(types)  # the simulation runs on the maps' GPU type whatever --gpu-type says
    jobs = sweep.plan_jobs(args)
    t0 = time.perf_counter()
    done, walls, failures = sweep.run_jobs(jobs, args, console)
    wall = time.perf_counter() - t0
    cmd = " ".join(shlex.quote(a) for a in ["iserve", "report", "sweep", *(sys.argv[2:] if argv is None else argv)])
    extra = (
        f"Simulated sweep: {len(done)} runs in {wall:.1f} s wall ({sum(walls):.1f} s of simulation, "
        f"{args.workers} worker{'s' if args.workers != 1 else ''}); models {' '.join(args.models)}; "
        f"{args.gpus} x {gpu_label}; maps: {args.maps or 'synthetic (roofline)'}"
        + (f"; each run replays the first {args.duration_s:g} s of the compressed trace" if args.duration_s else "")
        + f".\n\nCommand: `{cmd}`"
    )
    if failures:
        extra += "\n\nFailed points:\n\n" + "\n".join(f"- {f}" for f in failures)
    if not done:
        console.print("[red]no run finished[/red]")
        return 1
    report = write_report([sweep.plan_runs_dir(args)], args.out, extra=extra)
    console.print(f"{len(done)} runs in {wall:.1f} s; wrote {report}")
    for f in failures:
        console.print(f"[red]failed:[/red] {f}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
