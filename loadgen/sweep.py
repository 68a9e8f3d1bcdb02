"""The sweep driver of ``iserve report sweep``: the simulated runs (:class:`Job`) of an evaluation,
each run through the simulator in a worker process, its run directory written under ``runs/``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from iserve.messages import IntentKind

from .fluctuating import FLUCTUATING, fluctuating_trace
from .metrics import COST_INTENTS
from .policies import SYSTEMS
from .simulator import add_common_args, build_trace, resolve_models, simulate, spec_from_args
from .traces import trace_name

PAPER_MODELS = ["llama-2-70b", "falcon-40b:2", "llama-2-7b"]
SCALING_MODELS = ["llama-2-7b:6", "llama-2-13b:4", "falcon-7b:5", "gpt-j-6b:6"]  # 21 models
FIG10_MODELS = ["llama-2-7b:4", "llama-2-13b:2", "falcon-7b:2"]  # M1..M8, deployed one by one
SMALL_MODELS = ["llama-2-13b:2", "llama-2-7b:2", "gpt-j-6b:2", "falcon-7b:2"]  # the paper's Fig. 12
MIXED_MODELS = ["llama-2-13b:2", "llama-2-7b:2", "falcon-40b:2", "gpt-j-6b:2"]  # the paper's Fig. 24


@dataclass(frozen=True)
class Job:
    """One simulated run of a sweep."""

    experiment: str
    system: str
    trace: str
    rate: float
    intent: IntentKind
    slo_scale: float
    models: tuple[str, ...]
    deploy_every_s: float
    deploy_batch: int
    aggregate: int
    out: str
    policy: str = "hybrid"  # iServe's placement policy (varied by fig10)
    theta: float = 0.5
    max_batch: int = 1  # the serving mode: 1 the paper's, more: continuous batching

    def name(self) -> str:
        sys_name = self.system.replace("*", "-star")
        slo = f"-slo{self.slo_scale:g}" if self.slo_scale else ""
        pol = ""
        if self.experiment == "fig10":
            pol = f"-{self.policy}" + (f"{self.theta:g}" if self.policy == "hybrid" else "")
        mode = f"-b{self.max_batch}" if self.max_batch != 1 else ""
        return f"{self.trace}-r{self.rate:g}-{self.intent}{slo}{pol}-{sys_name}{mode}"


_CACHE: dict = {}  # per worker process: resolved models and built traces


def _run_job(job: Job, args: argparse.Namespace) -> tuple[str, float, str]:
    """Run one job (in a worker process); returns (run directory, wall seconds, one-line summary)."""
    mkey = (job.models, args.maps, args.gpu_type, args.gpus)
    if mkey not in _CACHE:
        _CACHE[mkey] = resolve_models(
            list(job.models), maps_dir=args.maps or None, gpu_type=args.gpu_type, max_gpus=args.gpus
        )
    tkey = (job.trace, job.rate, args.interval_s, job.aggregate, args.seed, args.duration_s)
    if tkey not in _CACHE and job.trace == FLUCTUATING:
        _CACHE[tkey] = fluctuating_trace(args.fig10_duration_s, job.rate, seed=args.seed)
    if tkey not in _CACHE:
        _CACHE[tkey] = build_trace(
            job.trace,
            rate=job.rate,
            interval_s=args.interval_s,
            aggregate=job.aggregate,
            seed=args.seed,
            duration_s=args.duration_s,
        )
    trace = _CACHE[tkey]
    spec = spec_from_args(
        args,
        models=_CACHE[mkey],
        trace_label=trace_name(job.trace),
        trace=trace,
        system=job.system,
        intent_kind=job.intent,
        rate=job.rate,
        slo_scale=job.slo_scale,
        deploy_every_s=job.deploy_every_s,
        deploy_batch=job.deploy_batch,
        notes=f"experiment={job.experiment} mode={'paper' if job.max_batch == 1 else 'batching'}",
    )
    spec.aggregate = job.aggregate
    spec.policy, spec.theta, spec.max_batch = job.policy, job.theta, job.max_batch
    t0, started = time.perf_counter(), time.time()
    res = simulate(spec, oracle_candidates=args.oracle_candidates, oracle_evals=args.oracle_evals)
    wall = time.perf_counter() - t0
    res.meta = msgspec.structs.replace(
        res.meta,
        started_at=started,
        ended_at=time.time(),
        command=["iserve", "report", "sweep", f"experiment={job.experiment}", job.name()],
    )
    res.write(job.out)
    ok = sum(r.status == "ok" for r in res.requests)
    return job.out, wall, f"{job.experiment} {job.name()}: {ok}/{len(res.requests)} ok in {wall:.1f} s"


def plan_runs_dir(args: argparse.Namespace) -> Path:
    """Where the sweep writes its run directories: ``--runs``, else ``OUT/runs``."""
    return Path(args.runs) if getattr(args, "runs", "") else Path(args.out) / "runs"


def plan_jobs(args: argparse.Namespace) -> list[Job]:
    """Every run of the sweep: systems x traces x rates x intents, per experiment, in every serving mode."""
    systems = list(args.systems) + (["oracle"] if args.oracle and "oracle" not in args.systems else [])
    runs_dir = plan_runs_dir(args)
    jobs: list[Job] = []

    def add(
        exp: str, system: str, trace: str, rate: float, intent: IntentKind, slo: float, models, every, batch, agg, **kw
    ):
        jobs.append(Job(exp, system, trace, rate, intent, slo, tuple(models), every, batch, agg, "", **kw))

    for exp in args.experiments:
        if exp == "fig10":  # iServe alone, one run per placement policy, deploying through a fluctuating load
            policies = [("least-loaded", 0.5), ("packing", 0.5)] + [("hybrid", t) for t in args.fig10_thetas]
            for policy, theta in policies:
                add(
                    exp,
                    "iserve",
                    FLUCTUATING,
                    args.fig10_rate,
                    "min-latency",
                    0.0,
                    args.fig10_models,
                    args.fig10_every_s,
                    1,
                    1,
                    policy=policy,
                    theta=theta,
                )
            continue
        if exp == "fig16":
            for intent in args.scaling_intents:
                for system in [x for x in systems if x != "oracle"]:  # 21 models: too many for the search
                    add(
                        exp,
                        system,
                        args.scaling_trace,
                        args.scaling_rate,
                        intent,
                        0.0,
                        args.scaling_models,
                        args.scaling_every_s,
                        2,
                        args.scaling_aggregate,
                    )
            continue
        by_exp: dict[str, list[IntentKind]] = {
            "fig11": ["min-latency"],
            "fig12": ["min-latency"],
            "fig13": list(COST_INTENTS),
            "fig14": ["latency-slo"],
            "fig24": ["min-latency", *COST_INTENTS],
        }
        intents = by_exp[exp]
        models = {"fig12": args.small_models, "fig24": args.mixed_models}.get(exp, args.models)
        slos = args.slo_scales if exp == "fig14" else [0.0]
        for trace in args.traces:
            for rate in args.rates:
                for intent in intents:
                    for slo in slos:
                        for system in systems:
                            add(
                                exp,
                                system,
                                trace,
                                rate,
                                intent,
                                slo,
                                models,
                                args.deploy_every_s,
                                1,
                                args.aggregate,
                            )
    planned = []
    for mode in args.modes or [args.max_batch]:
        for j in jobs:
            j = dataclasses.replace(j, max_batch=mode)
            planned.append(dataclasses.replace(j, out=str(runs_dir / j.experiment / j.name())))
    return planned


def parser() -> argparse.ArgumentParser:
    """The arguments of ``iserve report sweep``."""
    ap = argparse.ArgumentParser(
        prog="iserve report sweep",
        description="Simulate the paper's evaluation (Fig. 10-14, "
        "16, 24) with iServe's own decisions and the baselines, then write the report.",
    )
    ap.add_argument("--out", required=True, help="folder for the report (and runs/, unless --runs)")
    ap.add_argument(
        "--runs",
        default="",
        help="folder for the run directories (default OUT/runs); e.g. a scratch "
        "folder, so that only the report lands in OUT",
    )
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS) + ["oracle"])
    ap.add_argument(
        "--oracle", action="store_true", help="add the oracle (static configuration chosen with the trace known)"
    )
    ap.add_argument(
        "--experiments",
        nargs="+",
        default=["fig11", "fig13", "fig14", "fig16"],
        choices=["fig10", "fig11", "fig12", "fig13", "fig14", "fig16", "fig24"],
    )
    ap.add_argument("--small-models", nargs="+", default=SMALL_MODELS, help="Fig. 12: several smaller models")
    ap.add_argument("--mixed-models", nargs="+", default=MIXED_MODELS, help="Fig. 24: large and small models")
    ap.add_argument(
        "--modes",
        nargs="+",
        type=int,
        default=[],
        help="serving modes to run every experiment in, as max_batch values (1: the paper's one request at a "
        "time; e.g. 1 8 for both); default: --max-batch",
    )
    ap.add_argument("--fig10-models", nargs="+", default=FIG10_MODELS, help="Fig. 10: models deployed one by one")
    ap.add_argument("--fig10-rate", type=float, default=2.0, help="Fig. 10: mean requests/s of the fluctuating trace")
    ap.add_argument("--fig10-every-s", type=float, default=150.0, help="Fig. 10: one deployment every this many s")
    ap.add_argument("--fig10-duration-s", type=float, default=1800.0, help="Fig. 10: trace length (paper: 30 min)")
    ap.add_argument(
        "--fig10-thetas", nargs="+", type=float, default=[0.3, 0.5, 0.7], help="Fig. 10: hybrid load thresholds"
    )
    ap.add_argument("--traces", nargs="+", default=["code", "conv"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.4])
    ap.add_argument(
        "--models", nargs="+", default=PAPER_MODELS, help="models of Fig. 11/13/14 (name:N for N instances)"
    )
    ap.add_argument(
        "--deploy-every-s", type=float, default=300.0, help="one deployment every this many seconds (paper: 300)"
    )
    ap.add_argument(
        "--slo-scales", nargs="+", type=float, default=[2.5, 7.5], help="SLO scales of Fig. 14 (paper: 2.5-7.5)"
    )
    ap.add_argument("--scaling-models", nargs="+", default=SCALING_MODELS, help="models of Fig. 16 (default: 21)")
    ap.add_argument("--scaling-intents", nargs="+", default=["min-latency", "min-cost", "min-gpu-hours", "min-memory"])
    ap.add_argument("--scaling-trace", default="conv", help="Fig. 16's trace (paper: two conversation traces merged)")
    ap.add_argument("--scaling-rate", type=float, default=0.2, help="Fig. 16's rate scale (medium load)")
    ap.add_argument(
        "--scaling-aggregate", type=int, default=2, help="Fig. 16: intervals aggregated (2: two traces' worth)"
    )
    ap.add_argument(
        "--scaling-every-s", type=float, default=180.0, help="Fig. 16: two models every this many seconds (paper: 180)"
    )
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="parallel simulations")
    add_common_args(ap)
    return ap


def run_jobs(jobs: list[Job], args: argparse.Namespace, console: Console) -> tuple[list[str], list[float], list[str]]:
    """Run every job (in ``args.workers`` processes) with a progress bar; returns the run directories
    written, each run's wall seconds and one line per failed job."""
    done: list[str] = []
    walls: list[float] = []
    failures: list[str] = []
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
    ) as progress:
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
    return done, walls, failures
