"""``iserve validate MODEL``: measure the full model under chosen configurations and compare with the
fingerprint estimates.

The estimates come from the configuration map the fingerprint service stored for a registered
model (``--nats-url``; MODEL is its name), or, for a checkpoint folder, from profiling its
fingerprints here with the same code the service's profiler runs. Each chosen configuration is
then loaded in full on this machine's devices and measured with the same protocol (host wall time
of ``Engine.generate``, what a request pays), and the two are printed side by side with their
relative errors: TTFT at every prompt length, the mean TPOT of every decode run, and peak memory
per GPU (the larger of the allocator's and NVML's, as in the estimate).

Default configurations: every estimated configuration that runs on one GPU and whose estimate fits
that GPU's memory. ``--configs`` names others (TP > 1 needs as many devices: ``--devices``).

The functions here (``profile_locally``, ``measure_configuration``, ``compare``, ``summarize``) are
also what ``bench/bench_fingerprint.py`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from iserve import checkpoint
from iserve.messages import (
    ConfigEstimate,
    Configuration,
    ConfigurationMap,
    FingerprintMeasurement,
    ProfileJob,
    ProfileResult,
    ProfilingCost,
)
from iserve.stats import percentile

from . import estimator, generator

GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# comparing


@dataclass
class Point:
    """One estimated-vs-measured number."""

    what: str  # "ttft", "tpot" or "memory"
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
    return c


def summarize(comparisons: Sequence[Comparison]) -> dict[str, dict[str, float]]:
    """Median and p90 of the absolute relative errors, per kind, over every point of every
    measured configuration."""
    out = {}
    for what in ("ttft", "tpot", "memory"):
        errs = [e for c in comparisons for e in c.errors(what)]
        out[what] = {
            "median": percentile(errs, 50),
            "p90": percentile(errs, 90),
            "max": max(errs) if errs else math.nan,
            "points": len(errs),
        }
    return out


# ---------------------------------------------------------------------------------------------------
# profiling and measuring here


def default_devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def engine_capabilities() -> dict:
    from iserve.gpu_agent.engine.capabilities import CAPABILITIES

    return dict(CAPABILITIES)


def device_memory_bytes(device: str) -> int:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class LocalProfile:
    cmap: ConfigurationMap
    result: ProfileResult
    wall_seconds: float


def profile_locally(
    model_dir: str | Path,
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    work_dir: str | Path,
    name: str = "",
    capabilities: dict | None = None,
    max_gpus: int | None = None,
    device_timing: bool = True,
    gpu_warmup_s: float = 1.0,
    replay_depth: int = -1,
    replay_distinct: bool = False,
    variants_filter: Callable[[Any], bool] | None = None,
    log: Callable[[str], None] | None = None,
    timeout_s: float = 600.0,
) -> LocalProfile:
    """Generate ``model_dir``'s fingerprints under ``work_dir``, profile them on ``devices`` (the
    fingerprint service's job, run in this process) and estimate every configuration."""
    from iserve.gpu_agent.profiling import run_profile_job

    t0 = time.perf_counter()
    ck = checkpoint.scan_checkpoint(model_dir)
    infos = generator.make_fingerprints(ck, work_dir)
    caps = capabilities if capabilities is not None else engine_capabilities()
    max_gpus = max_gpus or len(devices)
    configs = estimator.enumerate_configurations(ck.arch, max_gpus)
    supported, _ = estimator.split_supported(configs, caps, arch=ck.arch)
    variants = estimator.measurement_variants(supported, max_tp=len(devices))
    if variants_filter is not None:
        variants = [v for v in variants if variants_filter(v)]
    context = min(context_tokens, ck.arch.max_position)
    job = ProfileJob(
        job_id=uuid.uuid4().hex[:12],
        model=name or Path(model_dir).name,
        fingerprint_paths=[i.path for i in infos],
        gpu_index=0,
        variants=variants,
        prompt_lengths=list(prompt_lengths),
        output_lengths=list(output_lengths),
        repeats=repeats,
        warmup=warmup,
        context_tokens=context,
        gpu_indices=list(range(len(devices))),
        device_timing=device_timing,
        gpu_warmup_s=gpu_warmup_s,
        replay_depth=estimator.replay_depth(ck.arch, replay_depth),
        replay_distinct=replay_distinct,
        timeout_s=timeout_s,
    )
    result = run_profile_job(job, devices, log=log)
    cmap = local_map(
        ck, infos, result, devices, name=job.model, capabilities=caps, max_gpus=max_gpus, context_tokens=context
    )
    return LocalProfile(cmap=cmap, result=result, wall_seconds=time.perf_counter() - t0)


def local_map(
    ck: checkpoint.Checkpoint,
    infos: Sequence[generator.FingerprintInfo],
    result: ProfileResult,
    devices: Sequence[str],
    *,
    name: str,
    capabilities: dict,
    max_gpus: int,
    context_tokens: int,
) -> ConfigurationMap:
    """The configuration map of ``ck`` for up to ``max_gpus`` GPUs of ``devices[0]``'s type from a
    profiling ``result`` made here (``profile_locally``'s last step; also for results merged from
    several jobs). TP degrees above what was measured come from the communication model."""
    from iserve.gpu_agent.profiling import gpu_type_of

    sizes, fractions = generator.fingerprint_cost_fields(list(infos))
    gpu_type = gpu_type_of(devices[0])
    comm = (
        estimator.CommModel(result.allreduce_latency_us, result.allreduce_bus_gbps, "measured")
        if result.allreduce_bus_gbps > 0
        else estimator.default_comm(gpu_type)
    )
    return estimator.build_configuration_map(
        model=name,
        gpu_type=gpu_type,
        arch=ck.arch,
        weights=checkpoint.weight_breakdown(ck),
        measurements=result.measurements,
        capabilities=capabilities,
        gpu_memory_bytes=device_memory_bytes(devices[0]),
        max_gpus=max_gpus,
        context_tokens=context_tokens,
        configs=estimator.enumerate_configurations(ck.arch, max_gpus),
        cost=ProfilingCost(
            gpu_seconds=result.gpu_seconds,
            wall_seconds=result.wall_seconds,
            peak_bytes=result.peak_bytes,
            fingerprint_bytes=sizes,
            fingerprint_fraction=fractions,
            nvml_peak_bytes=result.nvml_peak_bytes,
            measured_variants=len({m.variant for m in result.measurements}),
        ),
        device=f"{devices[0]}:{gpu_type}",
        created_at=time.time(),
        comm=comm,
        skipped=result.skipped,
    )


def fitting_configs(
    cmap: ConfigurationMap, *, gpus: int = 1, memory_bytes: int | None = None, headroom: float = 0.97
) -> list[ConfigEstimate]:
    """The estimated configurations on exactly ``gpus`` GPUs with PP=1 whose per-GPU estimate fits
    ``headroom`` of the GPU's memory."""
    limit = (memory_bytes or cmap.gpu_memory_bytes) * headroom
    out = []
    for e in cmap.estimates:
        if e.config.gpus != gpus or e.config.pp != 1:
            continue
        if e.stage_bytes(e.num_layers, first=True, last=True) <= limit:
            out.append(e)
    return out


def measure_configuration(
    model_dir: str | Path,
    config: Configuration,
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    gpu_warmup_s: float | None = None,
    timeout_s: float = 900.0,
) -> FingerprintMeasurement:
    """Measure the full model as ``config`` (PP=1; TP on ``devices[:tp]``) with the profiling
    protocol, wall time only. Raises ``UnsupportedModel`` when the engine cannot run it."""
    from iserve.errors import BadRequest
    from iserve.gpu_agent import profiling

    if config.pp != 1:
        raise BadRequest(
            f"{config.key()}: validation measures PP=1 configurations "
            "(PP reuses PP=1 latency; see docs/fingerprint.md)."
        )
    protocol = profiling.Protocol(
        prompt_lengths=tuple(prompt_lengths),
        output_lengths=tuple(output_lengths),
        repeats=repeats,
        warmup=warmup,
        device_repeats=0,
        context_tokens=context_tokens,
    )
    variant = estimator.variant_of(config)
    if config.tp == 1:
        warm = profiling.ENGINE_WARMUP_S if gpu_warmup_s is None else gpu_warmup_s  # as each fingerprint gets
        return profiling.measure_model(
            model_dir, devices[0], protocol=protocol, variant=variant, device_timing=False, gpu_warmup_s=warm
        )
    if len(devices) < config.tp:
        raise BadRequest(f"{config.key()} needs {config.tp} devices; pass --devices with {config.tp}.")
    job = ProfileJob(
        job_id="validate",
        model=Path(model_dir).name,
        fingerprint_paths=[str(model_dir)],
        gpu_index=0,
        variants=[variant],
        prompt_lengths=list(prompt_lengths),
        output_lengths=list(output_lengths),
        repeats=repeats,
        warmup=warmup,
        context_tokens=context_tokens,
        device_timing=False,
        timeout_s=timeout_s,
    )
    ms, _ = profiling.measure_tp_variant(job, list(devices), variant, timeout_s)
    return ms[0]


def _decode_runs(prompt_lengths: Sequence[int], output_lengths: Sequence[int], context: int) -> list[tuple[int, int]]:
    from iserve.gpu_agent.profiling import Protocol

    return Protocol(
        prompt_lengths=tuple(prompt_lengths), output_lengths=tuple(output_lengths), context_tokens=context
    ).decode_runs()


def validate(
    model_dir: str | Path,
    cmap: ConfigurationMap,
    estimates: Sequence[ConfigEstimate],
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
    timeout_s: float = 900.0,
) -> list[Comparison]:
    """Measure each of ``estimates``' configurations in full and compare. A configuration the engine
    refuses, or that runs out of memory, gets a note instead of points; with ``deadline``
    (``time.monotonic()``), configurations left when it passes are noted as skipped."""
    from iserve.errors import IServeError

    runs = _decode_runs(prompt_lengths, output_lengths, cmap.context_tokens)
    out = []
    for est in estimates:
        key = est.config.key()
        if deadline is not None and time.monotonic() > deadline:
            out.append(Comparison(config=key, note="skipped: out of time"))
            continue
        t0 = time.perf_counter()
        try:
            m = measure_configuration(
                model_dir,
                est.config,
                devices,
                prompt_lengths=prompt_lengths,
                output_lengths=output_lengths,
                repeats=repeats,
                warmup=warmup,
                context_tokens=cmap.context_tokens,
                timeout_s=timeout_s,
            )
        except IServeError as e:
            out.append(Comparison(config=key, note=f"not measured: {e.message}"))
            continue
        except TimeoutError as e:  # a TP measurement that overran: its ranks were killed (their stacks on stderr)
            out.append(Comparison(config=key, note=f"not measured: {e}"))
            continue
        except RuntimeError as e:  # CUDA out of memory and kin: the estimate said it fits, the device disagreed
            _free_cuda()
            out.append(Comparison(config=key, note=f"not measured: {type(e).__name__}: {str(e)[:160]}"))
            continue
        c = compare(est, m, runs, gpu_seconds=m.gpu_seconds or (time.perf_counter() - t0))
        out.append(c)
        if log:
            errs = ", ".join(f"{w} {100 * max(c.errors(w)):.1f}%" for w in ("ttft", "tpot", "memory"))
            log(f"{key}: worst errors {errs} ({c.gpu_seconds:.1f} GPU-s)")
    return out


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# printing


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


# ---------------------------------------------------------------------------------------------------
# the command


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="iserve validate",
        description="Measure a model in full under chosen configurations and compare with its fingerprint estimates.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint folder (profiled here), or a registered model's name (with --nats-url)",
    )
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated configuration keys (e.g. tp1-pp1-wint8-kvfp16-pnone); "
        "default: every estimated 1-GPU configuration that fits the GPU",
    )
    p.add_argument("--devices", default="", help="comma-separated torch devices (default: every CUDA device, else cpu)")
    p.add_argument(
        "--nats-url", default="", help="read the stored configuration map of a registered model from this NATS server"
    )
    p.add_argument("--gpu-type", default="", help="with --nats-url: which GPU type's map (default: the first stored)")
    p.add_argument(
        "--prompt-lengths", type=_int_list, default=[128, 512, 1024], help="prompt lengths (default 128,512,1024)"
    )
    p.add_argument(
        "--output-lengths", type=_int_list, default=[16, 64], help="output lengths of the decode runs (default 16,64)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the full model (medians kept; default 3)")
    p.add_argument(
        "--fp-repeats",
        type=int,
        default=7,
        help="timed repeats of each fingerprint when profiling here (they are cheap, and their "
        "differences carry the per-layer cost; default 7)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--context-tokens", type=int, default=2048, help="context length when profiling here (default 2048)")
    p.add_argument(
        "--work-dir",
        default="",
        help="where fingerprints are written when profiling here (default: a temporary folder)",
    )
    p.add_argument("--limit", type=int, default=0, help="measure at most this many configurations")
    p.add_argument("--json", default="", help="also write every point and the summary to this JSON file")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        help="time limit of the fingerprint profiling, and of each tensor-parallel measurement (default 900)",
    )
    return p.parse_args(argv)


def _variant_of_key(key: str) -> str:
    """``tp1-pp2-wint8-kvfp16-pnone`` or ``tp1-wint8-kvfp16-pnone`` -> ``tp1-wint8-kvfp16-pnone``."""
    parts = [p for p in key.split("-") if not p.startswith("pp")]
    return "-".join(parts)


async def _stored_map(url: str, model: str, gpu_type: str) -> tuple[str, ConfigurationMap]:
    from iserve.client import Client

    async with await Client.connect(url, "iserve-validate") as c:
        info = await c.model(model)
        return info.record.path, await c.profile(model, gpu_type)


def main(argv: list[str] | None = None) -> int:
    """``iserve validate``; returns the exit status (0: measured and printed; 1: nothing measured;
    2: bad arguments or model)."""
    from iserve.errors import IServeError

    a = parse_args(argv)
    devices = [d for d in a.devices.split(",") if d] or default_devices()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    local = None
    try:
        if a.nats_url:
            model_dir, cmap = asyncio.run(_stored_map(a.nats_url, a.model, a.gpu_type))
            prompt_lengths, output_lengths = a.prompt_lengths, a.output_lengths
        else:
            model_dir = a.model
            if not Path(model_dir).is_dir():
                print(
                    f"error: {model_dir} is not a checkpoint folder; pass one, or a registered model's name "
                    "with --nats-url.",
                    file=sys.stderr,
                )
                return 2
            work = a.work_dir or tempfile.mkdtemp(prefix="iserve-validate-")
            log(f"profiling the fingerprints of {model_dir} on {devices[0]} ...")
            wanted = {_variant_of_key(k) for k in a.configs.split(",") if k}
            only = (lambda v: _variant_of_key(estimator.variant_key(v)) in wanted) if wanted else None
            local = profile_locally(
                model_dir,
                devices,
                prompt_lengths=a.prompt_lengths,
                output_lengths=a.output_lengths,
                repeats=a.fp_repeats,
                warmup=a.warmup,
                context_tokens=a.context_tokens,
                work_dir=work,
                variants_filter=only,
                log=log,
                timeout_s=a.timeout_s,
            )
            cmap = local.cmap
            prompt_lengths, output_lengths = a.prompt_lengths, a.output_lengths
            log(
                f"fingerprints profiled in {local.result.gpu_seconds:.1f} GPU-seconds; "
                f"{len(cmap.estimates)} configurations estimated"
            )
        by_key = {e.config.key(): e for e in cmap.estimates}
        if a.configs:
            keys = [k for k in a.configs.split(",") if k]
            unknown = [k for k in keys if k not in by_key]
            if unknown:
                print(
                    f"error: no estimate for {', '.join(unknown)} in {cmap.model}'s map for {cmap.gpu_type}.",
                    file=sys.stderr,
                )
                return 2
            chosen = [by_key[k] for k in keys]
        else:
            chosen = fitting_configs(cmap, memory_bytes=device_memory_bytes(devices[0]))
        if a.limit:
            chosen = chosen[: a.limit]
        comps = validate(
            model_dir,
            cmap,
            chosen,
            devices,
            prompt_lengths=prompt_lengths,
            output_lengths=output_lengths,
            repeats=a.repeats,
            warmup=a.warmup,
            log=log,
            timeout_s=a.timeout_s,
        )
    except IServeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    print(
        f"{cmap.model} on {cmap.gpu_type} (estimates from {cmap.device or 'the stored map'}; "
        f"context {cmap.context_tokens})"
    )
    print_table(["config", "what", "at", "estimated", "measured", "unit", "error", "GPU-s"], report_rows(comps))
    summary = summarize([c for c in comps if not c.note])
    print_summary(summary)
    if a.json:
        doc = {
            "model": cmap.model,
            "gpu_type": cmap.gpu_type,
            "summary": summary,
            "comparisons": [asdict(c) for c in comps],
        }
        if local is not None:  # the fingerprints' own measurements, to see where an estimate came from
            doc["profile"] = msgspec.to_builtins(local.result)
        Path(a.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0 if any(not c.note for c in comps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
