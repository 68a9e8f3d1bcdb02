"""A discrete-event simulator of a GPU cluster serving a compressed Azure trace, running the
deployer's and the scheduler's OWN decision functions: :func:`iserve.deployer.planner.plan` (or a
baseline of :mod:`iserve.deployer.baselines`, see :mod:`.policies`) chooses and places every
deployment, :class:`iserve.scheduler.queues.FcfsQueues` queues every request. It writes the same run
directory as a live replay (:mod:`.records`, ``kind="simulated"``), so one report reads both.

    iserve simulate --synthetic --models llama-2-70b falcon-40b:2 llama-2-7b \\
        --trace code --rate 0.4 --system iserve --intent min-latency --out runs/sim-iserve

What is simulated
    * **Cluster**: ``gpus`` GPUs of one type (default 8 x A6000 48 GiB, the paper's testbed), on hosts
      of ``gpus_per_host`` (default: one host). Free memory is exactly the deployments' estimated
      per-GPU bytes (``GpuAssignment.memory_bytes``); a deployment never overcommits a GPU.
    * **Deployments**: a deployment of the next ``deploy_batch`` models is requested every
      ``deploy_every_s`` seconds from t = 0 (paper: one every 5 minutes; the 21-model experiment: two
      every 3 minutes). The system decides with the GPUs' free memory and their load, the busy
      fraction over the last ``window_s`` = 120 s (paper section 6), which the hybrid policy compares
      with ``theta``. Deployments are ready at once (loading time is not modelled). A model the
      system cannot or will not deploy gets a ``failed`` deployment event.
    * **Requests**: each request of the trace is assigned a model uniformly at random among the models
      whose deployment was requested by its arrival (:func:`traces.assign_models`, the same draws as
      the live replay), so every system sees the same requests. Lengths follow
      :func:`traces.fit_lengths` (prompt capped at ``max_context`` = 1024 as the paper, and to the
      map's context). A request of a model that has no deployment fails at once (``not_deployed``):
      it counts as an SLO violation, not in the latency percentiles.
    * **Queues**: ``FcfsQueues``: a request joins the model's replica with the least outstanding
      work and never moves; each replica serves one request at a time, in arrival order (no
      batching, as the paper).
    * **Service**: a request's solo service time is its deployment's estimate,
      ``TTFT(prompt) + (output - 1) * TPOT`` (:meth:`ConfigEstimate.latency_ms`).
    * **Contention (processor sharing)**: deployments that share a GPU share its time. A running
      request progresses at rate ``1 / n``, where ``n`` is the largest number of requests running at
      once on any of its GPUs (a pipeline or tensor-parallel group is as slow as its most contended
      GPU). Rates are re-evaluated whenever a request starts or finishes on one of its GPUs, so the
      finish time is exact for this model. The first token is placed at the same fraction of the
      actual service time as TTFT is of the solo service time (stretching is assumed uniform).
      Simplification: a request counts as running on every GPU of its deployment for its whole
      service; with pipeline parallelism at batch 1 only one stage computes at a time, so the
      contention a PP deployment causes (and its GPUs' busy time) is overstated, more so the more
      stages it has.
    * **Load**: a GPU is busy while at least one request runs on it; its load is the busy fraction
      over the last ``window_s`` seconds, also sampled every ``sample_s`` into ``gpus.jsonl``
      (``util_percent`` is the busy fraction of the last ``sample_s``). Once the trace has ended (plus
      one window), the sample period doubles at every sample: an overloaded run may take simulated
      days to drain its queues.
    * **Timeouts** (``timeout_s``, default none): a request still queued that long after its
      arrival is dropped when its replica would start it (status ``timeout``), as the scheduler drops
      requests past their deadline.
    * **SLOs**: with ``slo_scale``, each request's SLO is that multiple of its model's latency under
      minimum parallelism without quantization, for its own lengths (:mod:`.slo`, paper section
      8.3); with the ``latency-slo`` intent the deployer is given that multiple for the intent's size.

Efficiency: one heap of finish events with lazy invalidation (a version number per running
request), arrivals merged from the sorted trace without entering the heap, and per-GPU sets of the
running deployments, so a start or finish costs O(deployments sharing its GPUs). A one-hour trace at
rate 0.4 (about 3,500 code or 7,700 conversation requests) runs in well under a second to a few
seconds of CPU.

Oracle (``system="oracle"``, :func:`oracle_search`)
    The best STATIC configuration per model, chosen with the whole trace known: coordinate descent
    over the models, each step evaluated by this simulator on the full trace. It starts from
    iServe's own choices (so it is never worse than them on the intent's metric), then tries the
    candidates of :func:`policies.oracle_candidates` (the best ``candidates`` configurations by the
    intent with distinct GPU count and latency, plus the best of every GPU count), one model at a
    time with the others fixed, round-robin over the models by candidate rank (each model's best
    candidate first, then each one's second, ...), keeping a change only when it improves the
    objective; passes repeat until one changes nothing or ``max_evals`` simulations (default 40,
    each a full-trace run) were spent. The
    objective is ``(failed requests, metric)`` with the intent's metric from
    :func:`report.objective` (mean latency, mean cost, memory, GPU-hours or SLO misses). Fixed
    configurations are placed with iServe's planner and policy at the same times.

Synthetic configuration maps (:func:`synthetic_map`) are for tests and CPU sweeps: they feed
:func:`iserve.fingerprint.estimator.build_configuration_map` with fingerprint measurements from a
roofline model of a GPU (memory-bound decode, compute-bound prefill, ring all-reduce per layer for
TP, dequantization overheads) for the paper's models (Llama-2 7B/13B/70B, Falcon 7B/40B, GPT-J 6B)
in a Llama tensor layout with their sizes. They exercise the system; they are not measurements.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import math
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import msgspec

from iserve.deployer.planner import GIB, Decision, GpuState
from iserve.errors import IServeError
from iserve.fingerprint import estimator as est_mod
from iserve.messages import (
    ArchSpec,
    ConfigEstimate,
    Configuration,
    ConfigurationMap,
    FingerprintMeasurement,
    Intent,
    PromptTiming,
    ProfilingCost,
    WeightBreakdown,
)
from iserve.scheduler.queues import FcfsQueues, Queued

from . import slo as slo_mod
from .policies import ALL_SYSTEMS, System, Workload, make_system, oracle_candidates
from .records import DeploymentEvent, GpuSample, RequestRecord, Run, RunMeta, RunWriter, summarize
from .traces import TraceRequest, assign_models, compress, fit_lengths, load_trace, slice_trace, trace_name

# ---------------------------------------------------------------------------------------------------
# synthetic configuration maps


@dataclass(frozen=True)
class GpuSpec:
    """A GPU for the synthetic roofline: memory, HBM and tensor-core throughput, and the link used
    by tensor-parallel all-reduces (per-step latency and bandwidth)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    flops: float  # dense fp16 tensor FLOP/s
    link_latency_s: float
    link_bytes_per_s: float
    mem_efficiency: float = 0.8
    compute_efficiency: float = 0.5


GPU_SPECS = {
    # RTX A6000: 768 GB/s GDDR6, ~155 TFLOP/s fp16 tensor; the testbed's 8-way rings cross PCIe 4.0
    "A6000": GpuSpec("A6000", 48 * GIB, 768e9, 155e12, 15e-6, 20e9),
    "H100": GpuSpec("H100", 80 * GIB, 3.0e12, 990e12, 8e-6, 150e9),
}

# Llama tensor layout with each model's sizes; an FFN of two matrices (Falcon, GPT-J) of width ``4h``
# becomes the Llama-layout width ``8h/3`` with the same parameter count.
SYNTHETIC_MODELS: dict[str, dict[str, int]] = {
    "llama-2-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv=32, vocab=32000),
    "llama-2-13b": dict(hidden=5120, ffn=13824, layers=40, heads=40, kv=40, vocab=32000),
    "llama-2-70b": dict(hidden=8192, ffn=28672, layers=80, heads=64, kv=8, vocab=32000),
    "falcon-7b": dict(hidden=4544, ffn=12117, layers=32, heads=71, kv=1, vocab=65024, head_dim=64),
    "falcon-40b": dict(hidden=8192, ffn=21845, layers=60, heads=128, kv=8, vocab=65024, head_dim=64),
    "gpt-j-6b": dict(hidden=4096, ffn=10923, layers=28, heads=16, kv=16, vocab=50400),
    "tiny": dict(hidden=1024, ffn=2816, layers=8, heads=16, kv=16, vocab=32000),
}

_PROFILE_PROMPTS = (128, 512, 1024)
_PROFILE_CONTEXT = 512
_ACT_LAYER_BYTES = 8 * 2**20
_OVERHEAD_BYTES = 1536 * 2**20  # CUDA context, allocator slack, workspace
_DEQUANT_MS = {"fp16": 0.0, "int8": 0.004, "int4": 0.010}  # per layer per step
_PREFILL_QUANT = {"fp16": 1.0, "int8": 1.05, "int4": 1.15}


def synthetic_arch(name: str) -> tuple[ArchSpec, WeightBreakdown]:
    """The architecture and exact weight breakdown of a synthetic model (see ``SYNTHETIC_MODELS``)."""
    try:
        s = SYNTHETIC_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC_MODELS)}") from None
    from iserve.checkpoint import layer_tensor_shapes, other_tensor_shapes

    arch = ArchSpec(family="llama", model_type="llama", num_layers=s["layers"], hidden_size=s["hidden"],
                    intermediate_size=s["ffn"], num_attention_heads=s["heads"], num_kv_heads=s["kv"],
                    head_dim=s.get("head_dim", s["hidden"] // s["heads"]), vocab_size=s["vocab"], max_position=4096)
    layer, other = layer_tensor_shapes(arch), other_tensor_shapes(arch)
    w = WeightBreakdown(
        embed_params=math.prod(other["model.embed_tokens.weight"]),
        head_params=math.prod(other["lm_head.weight"]) if "lm_head.weight" in other else 0,
        final_norm_params=arch.hidden_size,
        layer_linear_params=sum(math.prod(v) for v in layer.values() if len(v) == 2),
        layer_other_params=sum(math.prod(v) for v in layer.values() if len(v) != 2),
        checkpoint_bytes=0,
    )
    return arch, w


def _allreduce_s(gpu: GpuSpec, tp: int, nbytes: float) -> float:
    """One ring all-reduce over ``tp`` GPUs: ``2 (tp - 1)`` steps, each a link latency plus a
    ``1 / tp`` chunk of the bytes."""
    if tp <= 1:
        return 0.0
    steps = 2 * (tp - 1)
    return steps * (gpu.link_latency_s + nbytes / tp / gpu.link_bytes_per_s)


def _measurement(arch: ArchSpec, w: WeightBreakdown, v, n: int, gpu: GpuSpec) -> FingerprintMeasurement:
    """The roofline timings and memory of an ``n``-layer fingerprint of variant ``v``."""
    cfg = Configuration(tp=v.tp, weight_quant=v.weight_quant, kv_quant=v.kv_quant, pruning=v.pruning)
    pruned = est_mod.pruned_arch(arch, v.pruning)
    tp, h = v.tp, arch.hidden_size
    hbm = gpu.hbm_bytes_per_s * gpu.mem_efficiency
    flops = gpu.flops * gpu.compute_efficiency
    lw = est_mod.layer_weights(arch, w, v.weight_quant, v.pruning).per_rank(tp)
    from iserve.checkpoint import layer_tensor_shapes

    params = sum(math.prod(s) for s in layer_tensor_shapes(pruned).values() if len(s) == 2) / tp
    if v.pruning == "2:4":
        params /= 2  # sparse tensor cores skip the pruned half
    kv_read = est_mod.kv_cache_bytes_per_layer(arch, cfg, _PROFILE_CONTEXT)
    heads_rank = pruned.num_attention_heads / tp
    # decode: weights and KV read once per token, kernel launches, dequantization, 2 all-reduces
    layer_tpot = (lw + kv_read) / hbm + 25e-6 + _DEQUANT_MS[v.weight_quant] / 1000 + 2 * _allreduce_s(gpu, tp, 2 * h)
    head_bytes = (w.head_params or w.embed_params) * 2 / tp
    other_tpot = head_bytes / hbm + 0.5e-3
    ttft = []
    for p in _PROFILE_PROMPTS:
        compute = (2 * params * p + 4 * p * p * heads_rank * arch.head_dim) / flops * _PREFILL_QUANT[v.weight_quant]
        layer = max(compute, lw / hbm) + 25e-6 + 2 * _allreduce_s(gpu, tp, 2 * h * p)
        other = head_bytes / hbm + 2 * p * h * 2 / hbm + 2e-3
        ttft.append(PromptTiming(prompt_tokens=p, ttft_ms=(n * layer + other) * 1000))
    weights = est_mod.fingerprint_weight_bytes(arch, w, v, n)
    kv = n * est_mod.kv_cache_bytes_per_layer(arch, cfg, _PROFILE_CONTEXT)
    return FingerprintMeasurement(
        num_layers=n, variant=v, ttft=ttft, tpot_ms=(n * layer_tpot + other_tpot) * 1000, decode_steps=32,
        peak_bytes=weights + kv + n * _ACT_LAYER_BYTES + _OVERHEAD_BYTES, weight_bytes=weights, kv_cache_bytes=kv,
        timer="synthetic")


def synthetic_map(model: str, *, gpu_type: str = "A6000", max_gpus: int = 8, context_tokens: int = 2048,
                  name: str | None = None) -> ConfigurationMap:
    """A configuration map of a synthetic model on a synthetic GPU (see the module docstring),
    built by the real estimator from roofline fingerprint measurements."""
    gpu = GPU_SPECS.get(gpu_type)
    if gpu is None:
        raise ValueError(f"no synthetic GPU {gpu_type!r}; choose one of {', '.join(GPU_SPECS)}")
    arch, w = synthetic_arch(model)
    configs = est_mod.enumerate_configurations(arch, max_gpus)
    supported, _ = est_mod.split_supported(configs, {}, arch=arch)
    ms = [_measurement(arch, w, v, n, gpu) for v in est_mod.measurement_variants(supported) for n in (1, 2)]
    return est_mod.build_configuration_map(
        model=name or model, gpu_type=gpu.name, arch=arch, weights=w, measurements=ms, capabilities={},
        gpu_memory_bytes=gpu.memory_bytes, max_gpus=max_gpus, context_tokens=context_tokens,
        configs=configs, cost=ProfilingCost(), device="synthetic")


def load_maps(directory: str | Path) -> dict[str, ConfigurationMap]:
    """Every ``*.json`` ConfigurationMap in ``directory``, by model name (several GPU types of one
    model: the last file wins; keep one GPU type per directory). Other JSON files there (a JSON
    object whose ``type`` is not ``configuration_map``, e.g. ``bench/profile_maps.py``'s
    ``profile_maps.json`` summary) are skipped; a file that claims to be a map but is not one is an
    error."""
    out: dict[str, ConfigurationMap] = {}
    paths = sorted(Path(directory).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"{directory} holds no *.json configuration maps")
    dec = msgspec.json.Decoder(ConfigurationMap)

    class _Tag(msgspec.Struct):
        type: str = ""

    tag_dec = msgspec.json.Decoder(_Tag)
    for p in paths:
        data = p.read_bytes()
        try:
            tag = tag_dec.decode(data).type
        except (msgspec.DecodeError, msgspec.ValidationError):
            tag = None  # not a JSON object: let the map decoder say why
        if tag is not None and tag != "configuration_map":
            continue
        try:
            cmap = dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ValueError(f"{p}: not a ConfigurationMap: {e}") from None
        out[cmap.model] = cmap
    if not out:
        raise FileNotFoundError(f"{directory} holds no configuration maps (*.json with type configuration_map)")
    return out


def expand_models(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``["llama-2-70b", "falcon-40b:2"]`` -> ``[(instance, model), ...]``: ``name:N`` deploys N
    instances named ``name#1`` .. ``name#N``; a single one keeps its name."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, _, count = spec.partition(":")
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"bad model count in {spec!r}")
        out.extend([(name, name)] if n == 1 else [(f"{name}#{i}", name) for i in range(1, n + 1)])
    names = [i for i, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"model instances must be unique: {names}")
    return out


# ---------------------------------------------------------------------------------------------------
# the simulation


@dataclass
class SimSpec:
    """Everything one simulated run needs. ``models`` are (instance name, map) in deployment order."""

    models: list[tuple[str, ConfigurationMap]]
    trace: list[TraceRequest]
    system: str = "iserve"
    intent: Intent = field(default_factory=lambda: Intent(kind="min-latency"))
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
        return Run(path=Path(path), meta=self.meta, requests=self.requests, gpus=self.gpus, deployments=self.deployments)

    def write(self, out_dir: str | Path, *, overwrite: bool = True) -> Path:
        with RunWriter(out_dir, self.meta, overwrite=overwrite) as w:
            for d in self.deployments:
                w.deployment(d)
            for g in self.gpus:
                w.gpu(g)
            for r in self.requests:
                w.request(r)
        return Path(out_dir)


class _Req:
    __slots__ = ("i", "tr", "model", "prompt", "output", "clipped", "slo")

    def __init__(self, i: int, tr: TraceRequest, model: str, prompt: int, output: int, clipped: bool, slo: float):
        self.i, self.tr, self.model, self.prompt, self.output, self.clipped, self.slo = i, tr, model, prompt, output, clipped, slo


class _Dep:
    """A deployment (replica) and the request it runs."""

    __slots__ = ("id", "model", "est", "gpus", "config", "total_bytes", "req", "remaining", "rate", "last",
                 "version", "start", "solo", "ttft_solo")

    def __init__(self, dep_id: str, model: str, est: ConfigEstimate, gpus: tuple[int, ...]):
        self.id, self.model, self.est, self.gpus = dep_id, model, est, gpus
        self.config = est.config.key()
        self.total_bytes = est.total_bytes
        self.req: _Req | None = None
        self.remaining = self.rate = self.last = self.start = self.solo = self.ttft_solo = 0.0
        self.version = 0


class _Gpu:
    __slots__ = ("agent", "index", "total", "free", "deps", "running", "busy_since", "closed")

    def __init__(self, agent: str, index: int, total: int):
        self.agent, self.index, self.total, self.free = agent, index, total, total
        self.deps = 0  # deployments holding memory here
        self.running: set[_Dep] = set()
        self.busy_since: float | None = None
        self.closed: deque[tuple[float, float]] = deque()  # finished busy intervals, in time order

    def busy_between(self, a: float, b: float) -> float:
        total = 0.0
        for s, e in reversed(self.closed):
            if e <= a:
                break
            total += min(e, b) - max(s, a)
        if self.busy_since is not None and self.busy_since < b:
            total += b - max(self.busy_since, a)
        return total

    def prune(self, before: float) -> None:
        while self.closed and self.closed[0][1] <= before:
            self.closed.popleft()


class Simulation:
    """One run of :class:`SimSpec` (use :func:`simulate`)."""

    def __init__(self, spec: SimSpec, system: System | None = None):
        if spec.gpus < 1:
            raise ValueError("the cluster needs at least one GPU")
        if spec.deploy_batch < 1 or spec.deploy_every_s < 0:
            raise ValueError("deploy_batch must be >= 1 and deploy_every_s >= 0")
        if not spec.models:
            raise ValueError("no models to deploy")
        self.spec = spec
        per_host = spec.gpus_per_host or spec.gpus
        self.g = [_Gpu(f"sim{i // per_host}", i % per_host, spec.gpu_memory_bytes) for i in range(spec.gpus)]
        self.gpu_at = {(g.agent, g.index): k for k, g in enumerate(self.g)}
        self.maps = dict(spec.models)
        self.names = [m for m, _ in spec.models]
        self.deploy_times = [(i // spec.deploy_batch) * spec.deploy_every_s for i in range(len(self.names))]
        self.system = system or make_system(spec.system, policy=spec.policy, theta=spec.theta,
                                            allgather_bytes_per_s=spec.allgather_bytes_per_s, forced=spec.forced)
        self.queues: FcfsQueues[_Req] = FcfsQueues()
        self.deps: dict[str, _Dep] = {}
        self.heap: list[tuple[float, int, int, _Dep]] = []
        self.seq = 0
        self.events = 0
        self.requests: list[RequestRecord] = []
        self.samples: list[GpuSample] = []
        self.dep_events: list[DeploymentEvent] = []
        self.choices: dict[str, list[str]] = {m: [] for m in self.names}
        self.failed_models: dict[str, str] = {}
        self.references = {m: slo_mod.reference_estimate(c.estimates) for m, c in spec.models if c.estimates}
        self._build_requests()

    # -- workload -----------------------------------------------------------------------------------

    def _build_requests(self) -> None:
        spec = self.spec
        if spec.assignment is not None:
            if len(spec.assignment) != len(spec.trace) or not set(spec.assignment) <= set(self.names):
                raise ValueError("assignment must name one of the models for every request of the trace")
            assigned = list(spec.assignment)
        else:
            assigned = assign_models(spec.trace, self.names, spec.seed, available_from=self.deploy_times)
        self.reqs: list[_Req] = []
        for i, (tr, model) in enumerate(zip(spec.trace, assigned)):
            cmap = self.maps[model]
            ln = fit_lengths(tr.context_tokens, tr.generated_tokens, max_context=spec.max_context,
                             model_context=cmap.context_tokens)
            slo = 0.0
            if spec.slo_scale > 0 and model in self.references:
                slo = slo_mod.slo_ms(self.references[model], ln.prompt_tokens, ln.output_tokens, spec.slo_scale)
            self.reqs.append(_Req(i, tr, model, ln.prompt_tokens, ln.output_tokens, ln.clipped, slo))

    def intent_for(self, model: str) -> Intent:
        """The deployment intent; for ``latency-slo`` without an explicit ``slo_ms``, the SLO is
        ``slo_scale`` times the model's reference latency for the intent's size (as the live replay)."""
        intent = self.spec.intent
        if intent.kind == "latency-slo" and intent.slo_ms is None:
            ref = self.references.get(model)
            scale = self.spec.slo_scale or 5.0
            if ref is not None:
                return msgspec.structs.replace(intent, slo_ms=slo_mod.slo_ms(ref, intent.prompt_tokens, intent.output_tokens, scale))
        return intent

    def workload(self) -> Workload:
        """What AlpaServe is given in advance: per-model rates over the whole trace, SLOs and sizes."""
        spec = self.spec
        span = max((r.tr.arrival_s for r in self.reqs), default=0.0) or 1.0
        counts = {m: 0 for m in self.names}
        for r in self.reqs:
            counts[r.model] += 1
        prompt = round(statistics.fmean(r.prompt for r in self.reqs)) if self.reqs else spec.intent.prompt_tokens
        output = round(statistics.fmean(r.output for r in self.reqs)) if self.reqs else spec.intent.output_tokens
        intent = Intent(kind="min-latency", prompt_tokens=max(1, prompt), output_tokens=max(1, output))
        scale = spec.slo_scale or 5.0
        slo = {m: slo_mod.slo_ms(self.references[m], intent.prompt_tokens, intent.output_tokens, scale)
               for m in self.names if m in self.references}
        return Workload(maps=self.maps, rates={m: c / span for m, c in counts.items()}, slo_ms=slo, intent=intent,
                        gpus=self.gpu_states(0.0))

    # -- GPUs ---------------------------------------------------------------------------------------

    def gpu_states(self, now: float) -> list[GpuState]:
        w = self.spec.window_s
        return [GpuState(agent_id=g.agent, gpu_index=g.index, gpu_type=self.spec.gpu_type, total_bytes=g.total,
                         free_bytes=g.free, load=min(1.0, g.busy_between(now - w, now) / w)) for g in self.g]

    def _sample(self, t: float) -> None:
        w, p = self.spec.window_s, self.spec.sample_s
        for g in self.g:
            g.prune(t - max(w, p))
            self.samples.append(GpuSample(
                t_s=t, agent_id=g.agent, gpu_index=g.index, total_bytes=g.total, used_bytes=g.total - g.free,
                busy_fraction=min(1.0, g.busy_between(t - w, t) / w), util_percent=100.0 * min(1.0, g.busy_between(t - p, t) / p),
                workers=g.deps, gpu_type=self.spec.gpu_type, free_bytes=g.free, window_s=w, simulated=True))

    # -- deployments --------------------------------------------------------------------------------

    def _deploy(self, model: str, now: float) -> None:
        cmap = self.maps[model]
        intent = self.intent_for(model)
        self.dep_events.append(DeploymentEvent(t_s=now, model=model, deployment_id="", config="", status="requested",
                                               gpu_type=self.spec.gpu_type))
        t0 = time.perf_counter()
        try:
            decisions = self.system.decide(model, cmap, intent, self.gpu_states(now))
        except IServeError as e:
            ms = (time.perf_counter() - t0) * 1000
            self.failed_models[model] = e.message
            self.dep_events.append(DeploymentEvent(t_s=now, model=model, deployment_id="", config="", status="failed",
                                                   reason=e.message, gpu_type=self.spec.gpu_type, decision_ms=ms))
            return
        ms = (time.perf_counter() - t0) * 1000
        for k, d in enumerate(decisions):
            self._launch(model, d, now, ms if k == 0 else 0.0, cmap.context_tokens)

    def _launch(self, model: str, d: Decision, now: float, decision_ms: float, context: int) -> None:
        dep_id = f"{model}/{len(self.choices[model]) + 1}"
        gpus = []
        for a in d.assignments:
            k = self.gpu_at[(a.agent_id, a.gpu_index)]
            g = self.g[k]
            if a.memory_bytes > g.free:
                raise RuntimeError(f"{self.system.name} overcommitted {g.agent}/{g.index} with {d.estimate.config.key()}")
            g.free -= a.memory_bytes
            g.deps += 1
            gpus.append(k)
        dep = _Dep(dep_id, model, d.estimate, tuple(dict.fromkeys(gpus)))
        self.deps[dep_id] = dep
        self.queues.add_replica(dep_id, model)
        self.choices[model].append(dep.config)
        gl = [f"{a.agent_id}/{a.gpu_index}:{a.num_layers}" for a in d.assignments]
        for status in ("launching", "ready"):
            self.dep_events.append(DeploymentEvent(
                t_s=now, model=model, deployment_id=dep_id, config=dep.config, gpus=gl, total_bytes=d.estimate.total_bytes,
                status=status, gpu_type=self.spec.gpu_type, why=d.why, decision_ms=decision_ms if status == "launching" else 0.0,
                latency_ms=d.latency_ms, context_tokens=context))

    # -- requests -----------------------------------------------------------------------------------

    def _arrive(self, r: _Req, now: float) -> None:
        deadline = now + self.spec.timeout_s if self.spec.timeout_s > 0 else math.inf
        item = Queued(request_id=str(r.i), model=r.model, arrived=now, deadline=deadline, payload=r)
        rep = self.queues.enqueue(item)
        if rep is None:
            reason = self.failed_models.get(r.model, "no deployment")
            self._record_failure(r, now, "not_deployed", f"{r.model} has no deployment: {reason}")
            return
        if rep.running is None:
            self._start(self.deps[rep.deployment_id], now)

    def _start(self, dep: _Dep, now: float) -> None:
        while True:
            item = self.queues.start_next(dep.id)
            if item is None:
                return
            if item.deadline > now:
                break
            # still queued at its deadline: the scheduler drops it with a timeout
            self.queues.finish(dep.id, item.request_id)
            r = item.payload
            self._record_failure(r, r.tr.arrival_s, "timeout", f"queued for more than {self.spec.timeout_s:g} s",
                                 end=item.deadline, status="timeout", deployment_id=dep.id, config=dep.config)
        r = item.payload
        e = dep.est
        dep.req = r
        dep.solo = max(e.latency_ms(r.prompt, r.output), 1e-6) / 1000.0
        dep.ttft_solo = min(max(e.ttft_ms(r.prompt), 0.0) / 1000.0, dep.solo)
        dep.remaining = dep.solo
        dep.start = dep.last = now
        dep.rate = 0.0
        for k in dep.gpus:
            g = self.g[k]
            if not g.running:
                g.busy_since = now
            g.running.add(dep)
        self._rerate(dep.gpus, now)

    def _rerate(self, gpus: tuple[int, ...], now: float) -> None:
        """Processor sharing: re-evaluate the rate of every request running on these GPUs."""
        affected: set[_Dep] = set()
        for k in gpus:
            affected.update(self.g[k].running)
        for dep in affected:
            n = max(len(self.g[k].running) for k in dep.gpus)
            rate = 1.0 / n
            if rate == dep.rate:
                continue
            dep.remaining -= (now - dep.last) * dep.rate
            if dep.remaining < 0.0:
                dep.remaining = 0.0
            dep.last = now
            dep.rate = rate
            dep.version += 1
            self.seq += 1
            heapq.heappush(self.heap, (now + dep.remaining / rate, self.seq, dep.version, dep))

    def _finish(self, dep: _Dep, now: float) -> None:
        r = dep.req
        dep.req = None
        dep.rate = 0.0
        for k in dep.gpus:
            g = self.g[k]
            g.running.discard(dep)
            if not g.running:
                g.closed.append((g.busy_since, now))
                g.busy_since = None
        self._rerate(dep.gpus, now)
        self.queues.finish(dep.id, str(r.i))
        service = now - dep.start
        first = dep.start + service * (dep.ttft_solo / dep.solo)
        arrival = r.tr.arrival_s
        e2e = (now - arrival) * 1000
        self.requests.append(RequestRecord(
            request_id=str(r.i), model=r.model, deployment_id=dep.id, arrival_s=arrival, start_s=dep.start,
            first_token_s=first, end_s=now, queue_ms=(dep.start - arrival) * 1000, ttft_ms=(first - arrival) * 1000,
            tpot_ms=((now - first) * 1000 / (r.output - 1)) if r.output > 1 else 0.0, e2e_ms=e2e,
            prompt_tokens=r.prompt, output_tokens=r.output, slo_ms=r.slo, slo_met=slo_mod.slo_met(e2e, r.slo),
            status="ok", index=r.tr.index, scheduled_s=arrival, trace_context_tokens=r.tr.context_tokens,
            trace_generated_tokens=r.tr.generated_tokens, clipped=r.clipped, server_ttft_ms=(first - arrival) * 1000,
            worker_ttft_ms=(first - dep.start) * 1000, worker_e2e_ms=service * 1000, config=dep.config))
        self._start(dep, now)

    def _record_failure(self, r: _Req, arrival: float, code: str, message: str, *, end: float | None = None,
                        status: str = "error", deployment_id: str = "", config: str = "") -> None:
        end = arrival if end is None else end
        self.requests.append(RequestRecord(
            request_id=str(r.i), model=r.model, deployment_id=deployment_id, arrival_s=arrival, end_s=end,
            queue_ms=(end - arrival) * 1000 if status == "timeout" else 0.0, e2e_ms=(end - arrival) * 1000,
            prompt_tokens=r.prompt, output_tokens=0, slo_ms=r.slo, slo_met=False if r.slo > 0 else None, status=status,
            error_code=code, error_message=message, index=r.tr.index, scheduled_s=arrival,
            trace_context_tokens=r.tr.context_tokens, trace_generated_tokens=r.tr.generated_tokens, clipped=r.clipped,
            config=config))

    # -- the event loop -----------------------------------------------------------------------------

    def run(self) -> SimResult:
        t_wall = time.perf_counter()
        spec = self.spec
        if self.system.needs_workload:
            self.system.prepare(self.workload())
        deploys = deque(zip(self.deploy_times, self.names))
        arrivals = self.reqs
        ai, n_arr = 0, len(arrivals)
        next_sample, period = 0.0, spec.sample_s
        last_arrival = arrivals[-1].tr.arrival_s if arrivals else 0.0
        heap = self.heap
        inf = math.inf
        while True:
            t_dep = deploys[0][0] if deploys else inf
            t_arr = arrivals[ai].tr.arrival_s if ai < n_arr else inf
            t_fin = heap[0][0] if heap else inf
            now = min(t_dep, t_arr, t_fin)
            if now == inf:
                break
            while next_sample <= now:
                self._sample(next_sample)
                if next_sample > last_arrival + spec.window_s:
                    period *= 2  # an overloaded run drains for a long time: sample it geometrically
                next_sample += period
            self.events += 1
            if t_dep <= now:  # deployments first, so a request at the same instant finds its model
                _, model = deploys.popleft()
                self._deploy(model, now)
            elif t_fin <= now:  # then completions, freeing replicas
                _, _, version, dep = heapq.heappop(heap)
                if version == dep.version and dep.req is not None:
                    self._finish(dep, now)
            else:
                self._arrive(arrivals[ai], now)
                ai += 1
        self._sample(next_sample)
        self.requests.sort(key=lambda r: (r.end_s, int(r.request_id)))
        meta = self._meta()
        return SimResult(meta=meta, requests=self.requests, gpus=self.samples, deployments=self.dep_events,
                         choices=self.choices, wall_s=time.perf_counter() - t_wall, events=self.events)

    def _meta(self) -> RunMeta:
        spec = self.spec
        span = max((r.tr.arrival_s for r in self.reqs), default=0.0)
        notes = spec.notes
        if self.system.plan_note:
            notes = (notes + "; " if notes else "") + self.system.plan_note
        return RunMeta(
            kind="simulated", trace=spec.trace_label, rate=spec.rate, interval_s=spec.interval_s, aggregate=spec.aggregate,
            duration_s=span, system=spec.system, intent=spec.intent, models=list(self.names), gpu_type=spec.gpu_type,
            gpu_count=spec.gpus, seed=spec.seed, requests=len(self.reqs), max_context=spec.max_context,
            deploy_every_s=spec.deploy_every_s, placement=spec.policy, slo_scale=spec.slo_scale,
            slo_ms=spec.intent.slo_ms or 0.0, notes=notes, format_version=1)


def simulate(spec: SimSpec, *, oracle_candidates: int = 6, oracle_evals: int = 40) -> SimResult:
    """Run one simulation; ``spec.system == "oracle"`` runs :func:`oracle_search` with that budget
    and returns its best run."""
    if spec.system == "oracle":
        return oracle_search(spec, candidates=oracle_candidates, max_evals=oracle_evals).result
    return Simulation(spec).run()


# ---------------------------------------------------------------------------------------------------
# the oracle


@dataclass
class OracleResult:
    """The oracle's best run, its fixed configuration per model, the objective of iServe's own
    choices and of the best, and how many simulations the search spent."""

    result: SimResult
    choices: dict[str, Configuration]
    start_objective: tuple
    objective: tuple
    evaluations: int
    history: list[str]


def _fixed_choices(res: SimResult, maps: dict[str, ConfigurationMap]) -> dict[str, Configuration]:
    out = {}
    for model, keys in res.choices.items():
        if keys:
            out[model] = next(e.config for e in maps[model].estimates if e.config.key() == keys[0])
    return out


def oracle_search(spec: SimSpec, *, candidates: int = 6, max_evals: int = 40) -> OracleResult:
    """The best static configuration per model with the whole trace known (see the module
    docstring): coordinate descent from iServe's choices, each candidate simulated on the full
    trace, at most ``max_evals`` simulations after the first."""
    from .report import objective

    start = Simulation(_with(spec, system="iserve", forced={})).run()
    maps = dict(spec.models)
    choice = _fixed_choices(start, maps)
    best_res = start
    best_obj = objective(start.as_run(), spec.intent)
    start_obj = best_obj
    cands = {m: oracle_candidates(maps[m].estimates, spec.intent, candidates) for m, _ in spec.models}
    evals, history = 0, []
    depth = max((len(c) for c in cands.values()), default=0)
    improved = True
    while improved and evals < max_evals:
        improved = False
        # round-robin over the models by candidate rank, so a small budget reaches every model
        for k in range(depth):
            for model, _ in spec.models:
                if evals >= max_evals or k >= len(cands[model]):
                    continue
                cfg = cands[model][k]
                if choice.get(model) == cfg:
                    continue
                trial = dict(choice)
                trial[model] = cfg
                res = Simulation(_with(spec, system="static", forced=trial)).run()
                evals += 1
                obj = objective(res.as_run(), spec.intent)
                if obj < best_obj:
                    history.append(f"{model}: {choice[model].key() if model in choice else 'none'} -> {cfg.key()} "
                                   f"({_fmt_obj(best_obj)} -> {_fmt_obj(obj)})")
                    choice, best_obj, best_res, improved = trial, obj, res, True
    note = (f"oracle: coordinate descent from iServe's choices over {sum(len(c) for c in cands.values())} candidates, "
            f"{evals} simulations; objective {_fmt_obj(start_obj)} -> {_fmt_obj(best_obj)}; fixed "
            + ", ".join(f"{m}={c.key()}" for m, c in choice.items()))
    best_res.meta = msgspec.structs.replace(best_res.meta, system="oracle",
                                            notes=(spec.notes + "; " if spec.notes else "") + note)
    return OracleResult(result=best_res, choices=choice, start_objective=start_obj, objective=best_obj,
                        evaluations=evals, history=history)


def _with(spec: SimSpec, **changes) -> SimSpec:
    return replace(spec, **changes)


def _fmt_obj(obj: tuple) -> str:
    failed, metric = obj
    return f"{metric:.4g}" + (f" with {failed} failed" if failed else "")


# ---------------------------------------------------------------------------------------------------
# building a spec from arguments (shared with the sweep)


@functools.lru_cache(maxsize=4)
def _loaded(trace: str) -> tuple[TraceRequest, ...]:
    return tuple(load_trace(trace))


def build_trace(trace: str, *, rate: float, interval_s: float = 60.0, aggregate: int = 1, seed: int = 0,
                start_s: float = 0.0, duration_s: float = 0.0, max_requests: int = 0) -> list[TraceRequest]:
    """Load (once per process), compress (paper: intervals, aggregation, rate factor) and slice a trace."""
    t = compress(_loaded(str(trace)), interval_s=interval_s, aggregate=aggregate, rate=rate, seed=seed)
    t = slice_trace(t, start_s, duration_s if duration_s > 0 else None)
    return t[:max_requests] if max_requests > 0 else t


def median_lengths(trace: Sequence[TraceRequest], max_context: int) -> tuple[int, int]:
    """The trace's median prompt (capped at ``max_context``) and output lengths: the request size the
    simulator's intents are computed for unless given."""
    if not trace:
        return 512, 128
    lens = [fit_lengths(r.context_tokens, r.generated_tokens, max_context=max_context) for r in trace]
    return (max(1, round(statistics.median(x.prompt_tokens for x in lens))),
            max(1, round(statistics.median(x.output_tokens for x in lens))))


def resolve_models(specs: Sequence[str], *, maps_dir: str | None, gpu_type: str, max_gpus: int,
                   context_tokens: int = 2048) -> list[tuple[str, ConfigurationMap]]:
    """Instances and their maps: from ``maps_dir`` (by the map's model name) or synthetic."""
    loaded = load_maps(maps_dir) if maps_dir else {}
    cache: dict[str, ConfigurationMap] = {}
    out = []
    for inst, model in expand_models(specs):
        if maps_dir:
            if model not in loaded:
                raise ValueError(f"no configuration map for {model!r} in {maps_dir} (has: {', '.join(sorted(loaded))})")
            cmap = loaded[model]
        else:
            if model not in cache:
                cache[model] = synthetic_map(model, gpu_type=gpu_type, max_gpus=max_gpus, context_tokens=context_tokens)
            cmap = cache[model]
        out.append((inst, cmap))
    return out


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared by ``iserve simulate`` and ``iserve report sweep``."""
    ap.add_argument("--maps", default="", help="directory of ConfigurationMap JSON files (real profiles); default: synthetic maps")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster (default 8)")
    ap.add_argument("--gpus-per-host", type=int, default=0, help="GPUs per host (default: all on one host)")
    ap.add_argument("--gpu-type", default="A6000", help="GPU type (synthetic maps: A6000 or H100; default A6000)")
    ap.add_argument("--gpu-memory-gib", type=float, default=0.0, help="memory per GPU in GiB (default: the maps' GPU memory)")
    ap.add_argument("--interval-s", type=float, default=60.0, help="trace compression interval (default 60 s)")
    ap.add_argument("--aggregate", type=int, default=1, help="adjacent intervals aggregated into one (default 1)")
    ap.add_argument("--duration-s", type=float, default=0.0, help="replay only this much of the compressed trace (default: all)")
    ap.add_argument("--policy", default="hybrid", choices=["hybrid", "least-loaded", "packing"], help="iServe's placement policy")
    ap.add_argument("--theta", type=float, default=0.5, help="hybrid policy load threshold (default 0.5)")
    ap.add_argument("--max-context", type=int, default=1024, help="prompt cap in tokens (paper: 1K; default 1024)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="intent request size in (default: the trace's median)")
    ap.add_argument("--output-tokens", type=int, default=0, help="intent request size out (default: the trace's median)")
    ap.add_argument("--cost-model", default="mem-x-latency", choices=["mem-x-latency", "memory", "gpu-hours"])
    ap.add_argument("--allgather-gbps", type=float, default=25.0, help="accelerate's all-gather bandwidth in GB/s (default 25, PCIe 4.0 x16)")
    ap.add_argument("--sample-s", type=float, default=10.0, help="GPU sample period in gpus.jsonl (default 10 s)")
    ap.add_argument("--timeout-s", type=float, default=0.0, help="drop requests queued longer than this (default: never)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle-candidates", type=int, default=6, help="oracle: configurations tried per model (default 6)")
    ap.add_argument("--oracle-evals", type=int, default=40, help="oracle: most simulations the search spends (default 40)")


def spec_from_args(args: argparse.Namespace, *, models: list[tuple[str, ConfigurationMap]], trace_label: str,
                   trace: list[TraceRequest], system: str, intent_kind: str, rate: float, slo_scale: float,
                   deploy_every_s: float, deploy_batch: int, notes: str = "") -> SimSpec:
    """A :class:`SimSpec` from parsed arguments and one point of a sweep."""
    p, o = median_lengths(trace, args.max_context)
    intent = Intent(kind=intent_kind, cost_model=args.cost_model, prompt_tokens=args.prompt_tokens or p,
                    output_tokens=args.output_tokens or o)
    mem = int(args.gpu_memory_gib * GIB) if args.gpu_memory_gib else models[0][1].gpu_memory_bytes
    return SimSpec(
        models=models, trace=trace, system=system, intent=intent, gpus=args.gpus, gpu_type=models[0][1].gpu_type,
        gpu_memory_bytes=mem, gpus_per_host=args.gpus_per_host, policy=args.policy, theta=args.theta,
        deploy_every_s=deploy_every_s, deploy_batch=deploy_batch, max_context=args.max_context, slo_scale=slo_scale,
        sample_s=args.sample_s, timeout_s=args.timeout_s, seed=args.seed, allgather_bytes_per_s=args.allgather_gbps * 1e9,
        trace_label=trace_label, rate=rate, interval_s=args.interval_s, aggregate=args.aggregate, notes=notes)


def main(argv: list[str] | None = None) -> int:
    """``iserve simulate``: one simulated run, written as a run directory; prints its summary."""
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(prog="iserve simulate", description="Simulate a GPU cluster serving a compressed Azure "
                                 "trace with iServe's own deployer and scheduler decisions, or a baseline's.")
    ap.add_argument("--models", nargs="+", default=["llama-2-70b", "falcon-40b:2", "llama-2-7b"],
                    help="models to deploy in order; name:N deploys N instances (default: the paper's 70B, 2x40B, 7B)")
    ap.add_argument("--trace", default="code", help="code, conv or a CSV path (default code)")
    ap.add_argument("--rate", type=float, default=0.4, help="rate scale factor (paper: 0.1-0.4; default 0.4)")
    ap.add_argument("--system", default="iserve", choices=list(ALL_SYSTEMS))
    ap.add_argument("--intent", default="min-latency", choices=["min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo"])
    ap.add_argument("--slo-scale", type=float, default=0.0, help="per-request SLO = scale x latency at minimum parallelism (paper: 2.5-7.5)")
    ap.add_argument("--deploy-every-s", type=float, default=300.0, help="seconds between deployments (paper: 300)")
    ap.add_argument("--deploy-batch", type=int, default=1, help="models per deployment (paper's 21-model run: 2)")
    ap.add_argument("--out", required=True, help="run directory to write")
    add_common_args(ap)
    args = ap.parse_args(argv)
    console = Console()
    try:
        models = resolve_models(args.models, maps_dir=args.maps or None, gpu_type=args.gpu_type, max_gpus=args.gpus)
        trace = build_trace(args.trace, rate=args.rate, interval_s=args.interval_s, aggregate=args.aggregate,
                            seed=args.seed, duration_s=args.duration_s)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    spec = spec_from_args(args, models=models, trace_label=trace_name(args.trace), trace=trace, system=args.system,
                          intent_kind=args.intent, rate=args.rate, slo_scale=args.slo_scale,
                          deploy_every_s=args.deploy_every_s, deploy_batch=args.deploy_batch)
    t0 = time.perf_counter()
    res = simulate(spec, oracle_candidates=args.oracle_candidates, oracle_evals=args.oracle_evals)
    wall = time.perf_counter() - t0
    res.meta = msgspec.structs.replace(res.meta, command=["iserve", "simulate", *(argv if argv is not None else sys.argv[1:])],
                                       started_at=time.time() - wall, ended_at=time.time())
    res.write(args.out)
    s = summarize(res.requests)
    t = Table(title=f"{spec.system} on {spec.trace_label} x{spec.rate:g}, {len(trace)} requests, simulated in {wall:.2f} s")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests ok / failed", f"{s.ok} / {s.errors}")
    t.add_row("latency p50 / p95 / p99", f"{s.e2e_p50_ms:.0f} / {s.e2e_p95_ms:.0f} / {s.e2e_p99_ms:.0f} ms")
    t.add_row("SLO attainment", f"{s.slo_attainment:.1%}" if s.slo_attainment is not None else "no SLO")
    for model, keys in res.choices.items():
        t.add_row(f"deployed {model}", ", ".join(keys) if keys else "not deployed")
    console.print(t)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
