"""Estimated-vs-measured comparison of a configuration (``iserve validate``): the points, their relative
errors, summaries over configurations and the plain tables they are printed as. No torch."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
from rich.markup import escape
from rich.table import Table

from iserve.fingerprint.estimator.batching import StepModel
from iserve.messages import ConfigEstimate, FingerprintMeasurement
from iserve.stats import percentile
from iserve.tables import add_number_column, add_text_column, table

GIB = 2**30


@dataclass
class Point:
    """One estimated-vs-measured number."""

    what: str  # "ttft", "tpot", "memory" or "batch" (a batched decode step)
    at: str  # e.g. "p=512", "p=1024,o=16", "per GPU"
    estimated: float
    measured: float

    @property
    def error(self) -> float:
        """Relative error of the estimate (signed): ``(estimated - measured) / measured``."""
        return (self.estimated - self.measured) / self.measured if self.measured else math.inf


@dataclass
class Comparison:
    config: str
    points: list[Point] = field(default_factory=list)
    gpu_seconds: float = 0.0  # of the full-model measurement
    note: str = ""  # why it was not measured, when it was not
    measured: dict = field(default_factory=dict)  # the full-model measurement as recorded (for diagnosis)

    def errors(self, what: str) -> list[float]:
        return [abs(p.error) for p in self.points if p.what == what]


def measured_tpot(m: FingerprintMeasurement, prompt: int, output: int) -> float:
    """Mean wall time of the steps of a decode run (``prompt`` in, ``output`` out), from the
    measurement's per-position medians."""
    steps = {t.position: t.step_ms for t in m.decode}
    values = [steps[x] for x in range(prompt, prompt + output - 1) if x in steps]
    if not values:
        raise ValueError(f"the measurement has no decode steps of the run ({prompt} in, {output} out)")
    return sum(values) / len(values)


def measured_memory(m: FingerprintMeasurement) -> int:
    return max(m.peak_bytes, m.nvml_peak_bytes)


def compare(
    est: ConfigEstimate, m: FingerprintMeasurement, decode_runs: Sequence[tuple[int, int]], *, gpu_seconds: float = 0.0
) -> Comparison:
    """Every estimated-vs-measured point of one configuration."""
    c = Comparison(config=est.config.key(), gpu_seconds=gpu_seconds, measured=msgspec.to_builtins(m))
    for t in m.ttft:
        c.points.append(Point("ttft", f"p={t.prompt_tokens}", est.ttft_ms(t.prompt_tokens), t.ttft_ms))
    for p, o in decode_runs:
        c.points.append(Point("tpot", f"p={p},o={o}", est.tpot_for(p, o), measured_tpot(m, p, o)))
    per_gpu = (
        est.stage_bytes(est.num_layers, first=True, last=True)
        if est.config.pp == 1
        else est.total_bytes / est.config.gpus
    )
    c.points.append(Point("memory", "per GPU", float(per_gpu), float(measured_memory(m))))
    model = StepModel(est)
    for bt in m.batch_decode:  # the batch sweep: a replica's step at b sequences, mean position x
        at = f"b={bt.batch},x={bt.position}"
        c.points.append(Point("batch", at, model.decode_ms(bt.batch, bt.batch * bt.position), bt.step_ms))
    return c


def summarize(comparisons: Sequence[Comparison]) -> dict[str, dict[str, float]]:
    """Median and p90 of the absolute relative errors, per kind, over every point of every
    measured configuration."""
    out = {}
    for what in ("ttft", "tpot", "memory", "batch"):
        errs = [e for c in comparisons for e in c.errors(what)]
        out[what] = {
            "median": percentile(errs, 50),
            "p90": percentile(errs, 90),
            "max": max(errs) if errs else math.nan,
            "points": len(errs),
        }
    return out


def report_rows(comparisons: Sequence[Comparison]) -> list[list[str]]:
    rows = []
    for c in comparisons:
        if c.note:
            rows.append([c.config, c.note, "", "", "", "", "", ""])
            continue
        for p in c.points:
            scale, unit = (1 / GIB, "GiB") if p.what == "memory" else (1.0, "ms")
            rows.append(
                [
                    c.config,
                    p.what,
                    p.at,
                    f"{p.estimated * scale:.3f}",
                    f"{p.measured * scale:.3f}",
                    unit,
                    f"{100 * p.error:+.2f}%",
                    f"{c.gpu_seconds:.1f}",
                ]
            )
    return rows


VALIDATE_COLUMNS = ["config", "what", "at", "estimated", "measured", "error", "GPU-s"]


def validate_rows(comparisons: Sequence[Comparison]) -> list[dict]:
    """Every point of every comparison (one row with the note for one not measured), as the table shows
    it and ``iserve validate --json`` writes it."""
    rows: list[dict] = []
    for c in comparisons:
        if c.note:
            rows.append({"config": c.config, "note": c.note})
            continue
        for p in c.points:
            scale, unit = (1 / GIB, "GiB") if p.what == "memory" else (1.0, "ms")
            rows.append(
                {
                    "config": c.config,
                    "what": p.what,
                    "at": p.at,
                    "estimated": p.estimated * scale,
                    "measured": p.measured * scale,
                    "unit": unit,
                    "error": p.error,
                    "gpu_seconds": c.gpu_seconds,
                }
            )
    return rows


def validate_table(comparisons: Sequence[Comparison], title: str = "") -> Table:
    """The estimated-vs-measured points as a table that fits 80 columns (the unit is in ``what``)."""
    t = table(title)
    for col in VALIDATE_COLUMNS:
        if col in ("config", "what", "at"):
            add_text_column(t, col, min_width=14 if col == "config" else None)
        else:
            add_number_column(t, col)
    for r in validate_rows(comparisons):
        if "note" in r:
            t.add_row(r["config"], escape(r["note"]), "", "", "", "", "")
            continue
        t.add_row(
            r["config"],
            f"{r['what']} {r['unit']}",
            r["at"],
            f"{r['estimated']:.3f}",
            f"{r['measured']:.3f}",
            f"{100 * r['error']:+.2f}%",
            f"{r['gpu_seconds']:.1f}",
        )
    return t


def print_table(headers: list[str], rows: list[list[str]], out=None) -> None:
    """A plain fixed-width table (no terminal features: it is also the benchmark's log)."""
    out = out or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line, file=out)
    print("-" * len(line), file=out)
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)), file=out)


def print_summary(summary: dict[str, dict[str, float]], out=None) -> None:
    out = out or sys.stdout
    for what, s in summary.items():
        print(
            f"{what:7s} |error| median {100 * s['median']:.2f}%  p90 {100 * s['p90']:.2f}%  "
            f"max {100 * s['max']:.2f}%  "
            f"({s['points']} points)",
            file=out,
        )
