"""What one simulated run is given (:class:`SimSpec`) and what it returns (:class:`SimResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from iserve import quality
from iserve.deployer.autoscaler import Policy
from iserve.deployer.units import GIB
from iserve.messages import Configuration, ConfigurationMap, Intent

from .records import DeploymentEvent, GpuSample, RequestRecord, Run, RunMeta, RunWriter
from .traces import TraceRequest


@dataclass
class SimSpec:
    """Everything one simulated run needs. ``models`` are (instance name, map) in deployment order."""

    models: list[tuple[str, ConfigurationMap]]
    trace: list[TraceRequest]
    system: str = "iserve"
    intent: Intent = field(default_factory=lambda: Intent(kind="min-latency", quality=quality.ANY))
    gpus: int = 8
    gpu_type: str = "A6000"
    gpu_memory_bytes: int = 48 * GIB
    gpus_per_host: int = 0  # 0: one host
    policy: str = "hybrid"
    theta: float = 0.5
    window_s: float = 120.0
    deploy_every_s: float = 300.0
    deploy_batch: int = 1
    max_context: int = 1024
    slo_scale: float = 0.0
    sample_s: float = 10.0
    timeout_s: float = 0.0  # a request still queued this long after arrival times out (0: never)
    seed: int = 0
    allgather_bytes_per_s: float = 25e9
    forced: dict[str, Configuration] = field(default_factory=dict)  # system "static"/"oracle"
    assignment: list[str] | None = None  # the model of each request (default: traces.assign_models)
    max_batch: int = 1  # requests a replica runs at once (continuous batching); 1: the paper's one at a time
    # iServe's intent states each model's load (its mean request rate over the trace, as an operator
    # would): the deployer sizes replicas for it (docs/deployment.md#load)
    intent_load: bool = False
    autoscale: Policy | None = None  # iServe's autoscaler, evaluated every ``autoscale_interval_s`` (None: off)
    autoscale_interval_s: float = 5.0
    # metadata only
    trace_label: str = "synthetic"
    rate: float = 0.0
    interval_s: float = 0.0
    aggregate: int = 1
    notes: str = ""


@dataclass
class SimResult:
    """A finished simulated run, in memory (``write`` puts it on disk as a run directory)."""

    meta: RunMeta
    requests: list[RequestRecord]
    gpus: list[GpuSample]
    deployments: list[DeploymentEvent]
    choices: dict[str, list[str]]  # model -> configuration keys deployed (one per replica)
    wall_s: float
    events: int

    def as_run(self, path: str | Path = "") -> Run:
        return Run(
            path=Path(path), meta=self.meta, requests=self.requests, gpus=self.gpus, deployments=self.deployments
        )

    def write(self, out_dir: str | Path, *, overwrite: bool = True) -> Path:
        with RunWriter(out_dir, self.meta, overwrite=overwrite) as w:
            for d in self.deployments:
                w.deployment(d)
            for g in self.gpus:
                w.gpu(g)
            for r in self.requests:
                w.request(r)
        return Path(out_dir)


def run_meta(spec: SimSpec, models: list[str], requests: int, span_s: float, plan_note: str) -> RunMeta:
    """The run directory's ``meta.json`` of a simulated run of ``spec`` (``plan_note``: the system's own)."""
    notes = spec.notes
    if plan_note:
        notes = (notes + "; " if notes else "") + plan_note
    return RunMeta(
        kind="simulated",
        trace=spec.trace_label,
        rate=spec.rate,
        interval_s=spec.interval_s,
        aggregate=spec.aggregate,
        duration_s=span_s,
        system=spec.system,
        intent=spec.intent,
        models=models,
        gpu_type=spec.gpu_type,
        gpu_count=spec.gpus,
        seed=spec.seed,
        requests=requests,
        max_context=spec.max_context,
        deploy_every_s=spec.deploy_every_s,
        placement=spec.policy,
        theta=spec.theta,
        slo_scale=spec.slo_scale,
        slo_ms=spec.intent.slo_ms or 0.0,
        notes=notes,
        format_version=1,
        max_batch=spec.max_batch,
    )
