"""Measuring a model (a 1- or 2-layer fingerprint, or the full model for validation) on a device.

The fingerprint service derives every configuration's latency and memory from these numbers (paper
L2/M2; ``iserve.fingerprint.estimator``). What is measured, and why (docs/fingerprint.md has the story
of the 3.6 ms vs 12.4 ms gap that led to this method):

Wall time, what a request pays
    Every run goes through ``Engine.generate``, the same call a serving worker makes. Its
    ``on_token`` callback stamps ``time.perf_counter()`` as each token becomes known on the host, so
    TTFT is the host time from the call to the first token and each decode step is the host time
    between two tokens: launch overhead, Python, the token's read-back, all of it.

Device time, what the GPU needs
    CUDA events around a host-bound step bracket only part of the host's work (the GPU stamps an
    event when it reaches it, and commands reach it in batches): that is how fingerprints of the
    eager engine once measured 3.6 ms for a 7B step that takes 11.9 ms (docs/fingerprint.md). And
    where a 1- or 2-layer fingerprint is host-bound but the full model device-bound, wall time
    extrapolates the host's per-layer cost, not the device's. So on CUDA (one process) a job without
    a deep run also times the device: a GPU spin (``torch.cuda._sleep``) longer than the host needs
    to queue a batch is queued first, then a CUDA event, then the batch (``DEVICE_PREFILLS`` prefills
    of one prompt, or ``DEVICE_STEPS`` decode steps at one position, back to back through
    ``Engine.queue_prefill`` / ``queue_decode``), then a second event: the mean over the batch is
    the device's own time, with no host gaps in it. The estimator extrapolates host and device
    times separately and takes the larger (a pipeline's bound).

Protocol (``Protocol``)
    * Warm-up: on a GPU, keep it busy for ``gpu_warmup_s`` (clocks ramp up; lazily loaded kernels
      and cuBLAS/Triton heuristics are paid), then ``warmup`` rounds of every run, untimed.
    * TTFT at every prompt length (three or more for a quadratic fit), ``repeats`` times; median.
    * Decode: runs of every output length (two or more), each after a different prompt length, so
      that the steps cover short and long key lengths; each step's time is kept with the position
      it fed, and the median over ``repeats`` is kept per position. TPOT is fitted by least squares
      in the position (a step reads all keys before it).
    * Runs go round-robin over lengths within each repeat, so drift affects all alike; the two
      fingerprints of a variant are loaded together and take turns within every repeat
      (``measure_models``): a layer's cost is their difference, and drift between them would enter
      it multiplied by the model's layer count.
    * Each token is handed to an event loop in another thread and encoded as a ``TokenChunk``, as
      the serving worker does (``serving_path``), so that cost is paid here too.
    * Device time: ``device_repeats`` (at most ``DEVICE_REPEATS``) samples of the batches described
      above; a job with a deep run has none (``protocol_of_job``).
    * Deep run (``replay_depth``, GPUs only): the deepest checkpoint again with its layers replayed
      to that depth (``Stage.replay``), timed in the same rounds for ``DEEP_REPEATS`` repeats: a
      pass as long as the model's, from the fingerprint's weights (with ``replay_distinct``, from
      copies of them, one per replayed layer, where the GPU has room). Its decode runs are cut to
      ``DEEP_STEPS`` steps (they keep their prefill: the first steps after one are slower). On one
      process it captures only the prefill graphs of the protocol's prompt lengths; with tensor
      parallelism every serving graph, so that its memory shows what NCCL holds at that depth.
    * Tensor parallelism: each variant is measured by fresh rank processes, as a serving worker
      starts fresh, and every engine's process groups are destroyed when it closes.
    * Reading: a job on one GPU reads its fingerprints' tensors onto the GPU once
      (``iserve.checkpoint.TensorCache``) and builds every variant's engines from copies of them.
    * Memory, per engine while it loads and warms up (before the other engine of the pair runs):
      what earlier engines left is freed first; after loading, the allocator's cache of load
      temporaries is emptied (a worker does not need them, and how many stay cached differs
      between fingerprints, which a per-layer slope would multiply by the layer count); then the
      torch allocator's peak (allocated and reserved) and the process's memory as NVML reports it,
      each less what the process held just before this engine loaded, plus the process's first
      such baseline (CUDA context and runtime workspaces, the streams' library workspaces primed
      before it: ``runner.prime_streams``): what a fresh worker holding only this engine would
      show (``_Baseline``).
    * Noise: the garbage collector is off during timed runs; the device pass takes as many repeats
      as the wall pass.
    * GPU-seconds: wall time from the start of loading to the end of closing, times the devices.

Prompts are random token ids from a seeded generator, so runs are reproducible.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import socket
from contextlib import nullcontext as _nullcontext
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from iserve.checkpoint import TensorCache, scan_checkpoint
from iserve.errors import BadRequest, CheckpointError, UnsupportedModel
from iserve.messages import (
    ArchSpec,
    DecodeTiming,
    FingerprintMeasurement,
    ProfileJob,
    ProfileResult,
    ProfileVariant,
    PromptTiming,
    TokenChunk,
    decoder,
    encode,
)

from ..gpus import pin_to_gpu_cpus
from .runner import prime_streams

MIN_GPU_WARMUP_S = 1.0  # default GPU warm-up before the first timed run of a job
ENGINE_WARMUP_S = 0.2  # least busy time per loaded engine (after a load the GPU has been idle)
DEVICE_PREFILLS = 4  # device timing: prefills of one prompt length queued back to back per sample ...
DEVICE_STEPS = 16  # ... and decode steps at one position
DEVICE_REPEATS = 3  # at most this many samples of each (each is already a mean of a batch)
DEEP_STEPS = 8  # decode steps per decode run of a deep (replayed) run: its points fix the line at the model's depth


def gpu_type_of(device: str) -> str:
    """The GPU's product name (e.g. "NVIDIA H100 80GB HBM3") for a CUDA device, else "cpu"."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def activation_bytes_estimate(arch: ArchSpec, prompt_tokens: int, dtype_bytes: int) -> int:
    """Bytes of temporaries alive at the peak of a prefill of ``prompt_tokens`` tokens, from shapes.

    Used on CPU, where there is no allocator to ask. Counted within one layer (temporaries are freed
    layer by layer): the residual stream and its normed copy ``[p, hidden]``; the fused q/k/v output
    and the rotated q and k; the GQA-expanded k and v and the attention output ``[p, heads*head_dim]``;
    the MLP's fused gate/up output ``[p, 2*intermediate]`` and its activation ``[p, intermediate]``
    (Mixtral: plus its router logits and the output accumulator); all in the computation dtype; plus
    the float32 norm temporaries ``[p, hidden]`` and the float32 logits of the last position. The
    attention score matrix is not counted: ``scaled_dot_product_attention`` uses fused kernels that
    do not materialize it.
    """
    p, h = prompt_tokens, arch.hidden_size
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    f = arch.intermediate_size
    elems = p * (2 * h + (q + 2 * kv) + (q + kv) + 2 * q + q + 3 * f)
    if arch.family == "mixtral":
        elems += p * (h + arch.num_experts)
    return elems * dtype_bytes + 2 * p * h * 4 + 2 * arch.vocab_size * 4


class _NvmlProbe:
    """This process's memory on one GPU as NVML reports it; every call is guarded and yields 0 when
    NVML is missing or does not list the process (e.g. in a container with its own PID namespace)."""

    def __init__(self, device: torch.device):
        self._handle = None
        self._nvml = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                text = str(uuid)
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            elif not os.environ.get("CUDA_VISIBLE_DEVICES"):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self._handle = None

    def sample(self) -> int:
        if self._handle is None:
            return 0
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
        except Exception:
            return 0
        return 0

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


_FIRST_BASELINE: dict[int, tuple[int, int, int]] = {}  # per CUDA device: the process's first clean baseline


class _Baseline:
    """What the process holds on the device just before an engine loads, so that the engine's peaks
    can be told apart from what others hold: another engine measured alongside, or what earlier
    engines of the process left (workspaces of their streams; the benchmark measures many in one
    process). A measurement reports its engine's own memory plus the process's first baseline (CUDA
    context and runtime workspaces, after the job's GPU warm-up), i.e. what a fresh worker process
    holding just this engine would show."""

    def __init__(self, device: torch.device, probe: "_NvmlProbe"):
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.allocated = self.reserved = self.nvml = 0
        self.first = (0, 0, 0)
        if not self.cuda:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _FIRST_BASELINE:
            prime_streams(device)  # the process's stream workspaces belong to its first baseline
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.allocated = int(torch.cuda.memory_allocated(device))
        self.reserved = int(torch.cuda.memory_reserved(device))
        self.nvml = probe.sample()
        self.first = _FIRST_BASELINE.setdefault(index, (self.allocated, self.reserved, self.nvml))

    def own(self, allocated_peak: int, reserved_peak: int, nvml_peak: int) -> tuple[int, int, int]:
        """The engine's peaks as a fresh process holding only it would show them."""
        a = allocated_peak - self.allocated + self.first[0]
        r = reserved_peak - self.reserved + self.first[1]
        n = nvml_peak - self.nvml + self.first[2] if nvml_peak > 0 and self.nvml > 0 and self.first[2] > 0 else nvml_peak
        return a, r, n


# ---------------------------------------------------------------------------------------------------
# the protocol


@dataclass(frozen=True)
class Protocol:
    """What to run and how often (see the module docstring)."""

    prompt_lengths: tuple[int, ...]
    output_lengths: tuple[int, ...]
    repeats: int = 3
    warmup: int = 1
    device_repeats: int = -1  # samples of the device pass; -1: ``repeats``, at most ``DEVICE_REPEATS``
    context_tokens: int = 2048
    serving_path: bool = True  # hand every token to another thread's event loop, as the serving worker does
    replay_depth: int = 0  # > 0: measure_models also times its deepest model replayed to this many layers
    replay_distinct: bool = False  # ... with tensors of its own for every replayed layer, where they fit

    def __post_init__(self) -> None:
        if not self.prompt_lengths or not self.output_lengths or min(self.prompt_lengths) < 1 or min(self.output_lengths) < 1:
            raise BadRequest("prompt_lengths and output_lengths must be non-empty lists of positive token counts.")
        if max(self.output_lengths) < 2:
            raise BadRequest("at least one output length must be 2 or more, or no decode step is measured.")
        if self.device_repeats < 0:
            object.__setattr__(self, "device_repeats", min(self.repeats, DEVICE_REPEATS))
        if self.replay_depth < 0:
            raise BadRequest(f"replay_depth must be 0 (no replayed run) or a layer count, not {self.replay_depth}.")
        if self.repeats < 1 or self.warmup < 0:
            raise BadRequest(f"repeats must be at least 1 and warmup at least 0, not {self.repeats} and {self.warmup}.")
        if max(self.prompt_lengths) + max(self.output_lengths) > self.context_tokens:
            raise BadRequest(
                f"the longest prompt ({max(self.prompt_lengths)}) plus the longest output ({max(self.output_lengths)}) exceeds "
                f"context_tokens {self.context_tokens}; raise context_tokens or shorten the lengths."
            )

    def decode_runs(self) -> list[tuple[int, int]]:
        """``(prompt_tokens, output_tokens)`` of each decode run: the output lengths in ascending order,
        paired with the prompt lengths from the longest down (cycling), so that the steps cover both
        short and long key lengths."""
        prompts = sorted(set(self.prompt_lengths), reverse=True)
        outputs = sorted(set(self.output_lengths))
        return [(prompts[i % len(prompts)], o) for i, o in enumerate(outputs)]


def protocol_of_job(job: ProfileJob) -> Protocol:
    """The job's protocol. The device pass runs only without a deep run: the deep run's wall times
    are measured at the model's depth, so the host/device split that extrapolates short passes adds
    nothing to it (the 49 configurations of the session-4 H100 runs refitted without their device
    timings: median TTFT error 0.47% either way, TPOT 1.86% against 1.79%)."""
    return Protocol(
        prompt_lengths=tuple(job.prompt_lengths),
        output_lengths=tuple(job.output_lengths),
        repeats=job.repeats,
        warmup=job.warmup,
        device_repeats=min(job.repeats, DEVICE_REPEATS) if job.device_timing and not job.replay_depth else 0,
        context_tokens=job.context_tokens,
        replay_depth=job.replay_depth,
        replay_distinct=job.replay_distinct,
    )


# ---------------------------------------------------------------------------------------------------
# loading


def variant_kwargs(variant: ProfileVariant) -> dict[str, str]:
    """``Engine.load`` keyword arguments of a variant; defaults are left out, so an engine that
    predates the variant knobs still loads fp16."""
    out = {}
    for knob, default in (("weight_quant", "fp16"), ("kv_quant", "fp16"), ("pruning", "none")):
        value = getattr(variant, knob)
        if value != default:
            out[knob] = value
    return out


def _check_variant(variant: ProfileVariant) -> None:
    from . import CAPABILITIES

    for knob, value in (("tp", variant.tp), ("weight_quant", variant.weight_quant), ("kv_quant", variant.kv_quant),
                        ("pruning", variant.pruning)):
        allowed = CAPABILITIES.get(knob)
        if allowed is not None and value not in allowed:
            raise UnsupportedModel(
                f"the torch engine cannot run {knob}={value!r} yet (it supports {allowed}); "
                "profile only the variants in its CAPABILITIES."
            )


def load_engine(model_dir: str | Path, device: str, context_tokens: int, variant: ProfileVariant, *, seed: int = 0,
                tp_rank: int = 0, tp_size: int = 1, replay_layers: int = 0, replay_distinct: bool = False,
                prefill_lengths: Sequence[int] | None = None):
    """Load ``model_dir`` as one stage on ``device`` as ``variant``, the way a worker does
    (``prefill_lengths``: capture only the prefill graphs of these prompt lengths, for a deep run
    whose capture of every length would cost more than its timing)."""
    from .runner import Engine

    _check_variant(variant)
    kwargs: dict = variant_kwargs(variant)
    if tp_size > 1:
        kwargs.update(tp_rank=tp_rank, tp_size=tp_size)
    if replay_layers:
        kwargs.update(replay_layers=replay_layers, replay_distinct=replay_distinct)
    if prefill_lengths is not None:
        kwargs.update(prefill_graph_lengths=list(prefill_lengths))
    ck = scan_checkpoint(model_dir)
    try:
        return Engine.load(model_dir, [(device, 0, ck.arch.num_layers)], context_tokens, seed, **kwargs)
    except TypeError as e:
        if kwargs and "unexpected keyword" in str(e):
            raise UnsupportedModel(f"this engine's Engine.load does not take {', '.join(kwargs)} yet: {e}") from None
        raise


# ---------------------------------------------------------------------------------------------------
# timing


class DeviceClock:
    """CUDA events and GPU spins on the current stream of one device (see the module docstring).

    ``mark()`` records an event, ``spin(ms)`` queues a GPU spin of about ``ms`` milliseconds,
    ``elapsed(a, b)`` is the device time between two marks after ``sync()``.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cycles_per_ms = self._calibrate()

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    @staticmethod
    def elapsed(a: torch.cuda.Event, b: torch.cuda.Event) -> float:
        return float(a.elapsed_time(b))

    def _calibrate(self) -> float:
        """Clock cycles per millisecond of ``torch.cuda._sleep`` (after warm-up, so clocks are up)."""
        cycles = 2_000_000
        rates = []
        for _ in range(3):
            a, b = self.mark(), None
            torch.cuda._sleep(cycles)
            b = self.mark()
            b.synchronize()
            ms = a.elapsed_time(b)
            if ms > 0:
                rates.append(cycles / ms)
        if not rates:
            raise RuntimeError("torch.cuda._sleep did not take measurable time")
        return max(rates)  # the fastest clock seen: a spin is never shorter than asked

    def mark(self) -> torch.cuda.Event:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def spin(self, ms: float) -> None:
        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))


@dataclass
class _Timings:
    ttft: dict[int, list[float]] = field(default_factory=dict)  # prompt length -> wall ms of each repeat
    steps: dict[int, list[float]] = field(default_factory=dict)  # position -> wall ms of each repeat
    ttft_device: dict[int, list[float]] = field(default_factory=dict)
    steps_device: dict[int, list[float]] = field(default_factory=dict)
    deep: bool = False  # a deep run on one process: only its (shortened) decode runs, see ``_wall_pass``
    rounds: int = 0  # wall-pass rounds taken


class TokenSink:
    """What a serving worker does with each token, so that profiling pays it too: the engine runs in
    the calling thread while an asyncio loop in another thread receives every token through
    ``call_soon_threadsafe`` and encodes its ``TokenChunk`` (the worker then publishes it)."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="profile-token-sink", daemon=True)
        self.thread.start()
        self.count = 0

    def push(self, token_id: int) -> None:
        self.loop.call_soon_threadsafe(self._consume, token_id)

    def _consume(self, token_id: int) -> None:
        encode(TokenChunk(request_id="profile", index=self.count, token_id=token_id, text=""))
        self.count += 1

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


# -- several tensor-parallel engines in one set of processes -----------------------------------------
#
# A TP engine's followers sit in ``Engine.follow_one()`` for the leader's next generation, on that
# engine's own control group. When a measurement holds several engines (the fingerprint pair, timed
# interleaved), the followers must also learn *which* engine the leader runs next: the leader
# broadcasts its index on a gloo group of the measurement (``coord``) before each generation,
# outside the timed window, and -1 when a phase (one engine's warm-up, the timed passes) ends.

_PHASE_END = -1


def _broadcast_index(coord, value: int | None) -> int:
    import torch.distributed as dist

    box = torch.tensor([_PHASE_END if value is None else value], dtype=torch.long)
    dist.broadcast(box, src=0, group=coord)
    return int(box.item())


class _Announced:
    """A TP leader's engine, one of several in a measurement: ``announce()`` tells the followers that
    its generation comes next. Everything else is the engine's."""

    def __init__(self, engine, index: int, coord):
        self.engine = engine
        self.index = index
        self.coord = coord

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def announce(self) -> None:
        _broadcast_index(self.coord, self.index)


def _announce(engine) -> None:
    """Before a timed generation: let the followers know which engine runs it (TP leaders only)."""
    announce = getattr(engine, "announce", None)
    if announce is not None:
        announce()


def _follow_phase(coord, engines: list) -> int:
    """A follower: run the generations the leader announces until it ends the phase."""
    done = 0
    while (index := _broadcast_index(coord, None)) != _PHASE_END:
        if not engines[index].follow_one():
            raise RuntimeError(f"the TP leader closed engine {index} while the followers expected a generation")
        done += 1
    return done


def _run_wall(engine, ids: list[int], max_tokens: int, sink: TokenSink | None = None) -> tuple[float, list[float]]:
    """One generation; returns host wall TTFT and the wall time of every further step (ms)."""
    stamps: list[float] = []

    def on_token(t: int) -> None:
        stamps.append(time.perf_counter())
        if sink is not None:
            sink.push(t)

    _announce(engine)
    t0 = time.perf_counter()
    engine.generate(ids, max_tokens=max_tokens, ignore_eos=True, on_token=on_token)
    if len(stamps) != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos but got {len(stamps)}")
    ttft = (stamps[0] - t0) * 1000.0
    steps = [(b - a) * 1000.0 for a, b in zip(stamps, stamps[1:])]
    return ttft, steps


def _prompt(vocab: int, length: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _warm_up(engine, protocol: Protocol, prompts: dict[int, list[int]], runs: list[tuple[int, int]], gpu_warmup_s: float,
             deep: bool = False) -> None:
    """Busy for ``gpu_warmup_s`` on a GPU (clocks ramp up), then every run of the protocol, untimed
    (lazily loaded kernels, autotuning, graph buckets, allocator growth); a deep run's decode runs
    are cut short."""
    dev = engine.stages[0].device
    t0 = time.perf_counter()
    while dev.type == "cuda" and time.perf_counter() - t0 < gpu_warmup_s:
        _run_wall(engine, prompts[runs[0][0]], 2)
    for _ in range(protocol.warmup):
        for p in prompts:
            _run_wall(engine, prompts[p], 2)
        for p, o in runs:
            _run_wall(engine, prompts[p], min(o, 2 if deep else 4))


DEEP_REPEATS = 3  # repeats of a replayed deep run: its passes are a full model's length (validation uses 3)


def _done(engine, t: "_Timings") -> bool:
    """Whether ``engine`` has had its wall-pass rounds: a replayed deep run takes ``DEEP_REPEATS``."""
    return bool(getattr(engine, "replayed", False)) and t.rounds >= DEEP_REPEATS


def _wall_pass(engines: list, protocol: Protocol, prompts: dict[int, list[int]], runs: list[tuple[int, int]],
               timings: list[_Timings], after_run: Callable[[], None]) -> None:
    """``repeats`` rounds; in each, every engine in turn runs every prompt length and decode run, so
    that drift (clocks, temperature, other work on the host) affects all engines alike. A deep run
    cuts its decode runs to ``DEEP_STEPS`` steps: its passes cost a model's, and a
    few of them fix the line at the model's depth (they keep their prefill: the steps right after
    one are slower than later ones, on an H100 by up to 10%)."""
    sink = TokenSink() if protocol.serving_path else None
    try:
        for _ in range(protocol.repeats):
            for engine, t in zip(engines, timings):
                if _done(engine, t):
                    continue
                t.rounds += 1
                for p in prompts:
                    ttft, _ = _run_wall(engine, prompts[p], 1, sink)
                    t.ttft.setdefault(p, []).append(ttft)
                for p, o in runs:
                    _, steps = _run_wall(engine, prompts[p], min(o, DEEP_STEPS + 1) if t.deep else o, sink)
                    for i, step in enumerate(steps):
                        t.steps.setdefault(p + i, []).append(step)
            after_run()
    finally:
        if sink is not None:
            sink.close()


def _queued(clock, queue_one: Callable[[], None], count: int, spin_ms: float) -> float:
    """Mean device ms of ``count`` passes queued back to back behind a GPU spin of ``spin_ms`` (long
    enough for the host to queue them all): the events bracket the device's own work, with no
    host gaps in it."""
    clock.spin(spin_ms)
    start = clock.mark()
    for _ in range(count):
        queue_one()
    end = clock.mark()
    clock.sync()
    return clock.elapsed(start, end) / count


def _device_pass(engines: list, clock, protocol: Protocol, prompts: dict[int, list[int]], runs: list[tuple[int, int]],
                 timings: list[_Timings], after_run: Callable[[], None]) -> None:
    """``device_repeats`` samples, interleaved over the engines like the wall pass: per prompt length
    the mean of ``DEVICE_PREFILLS`` prefills queued back to back, per decode run the mean of
    ``DEVICE_STEPS`` steps at its first and at its last position (``Engine.queue_prefill`` /
    ``queue_decode``: what ``generate`` runs, less sampling and the host's wait). The spin before a
    batch lasts twice the batch's wall time, so the host has queued the batch before the GPU starts
    it. Deep runs are not device-timed (their wall times are measured at depth)."""
    for _ in range(protocol.device_repeats):
        for engine, t in zip(engines, timings):
            if t.deep:
                continue
            for p in prompts:
                spin = 2.0 * DEVICE_PREFILLS * _median(t.ttft[p]) + 1.0
                t.ttft_device.setdefault(p, []).append(
                    _queued(clock, lambda p=p: engine.queue_prefill(prompts[p]), DEVICE_PREFILLS, spin))
            step_wall = max(_median(v) for v in t.steps.values())
            for p, o in runs:
                for pos in sorted({p, p + o - 2}):
                    t.steps_device.setdefault(pos, []).append(
                        _queued(clock, lambda pos=pos: engine.queue_decode(pos), DEVICE_STEPS, 2.0 * DEVICE_STEPS * step_wall + 1.0))
        after_run()


def _time_engines(engines: list, protocol: Protocol, *, device_timing: bool, seed: int, after_run: Callable[[], None],
                  clock_factory: Callable[[torch.device], object] | None = None,
                  deep: Sequence[bool] | None = None) -> list[_Timings]:
    """The wall pass and (on CUDA, when asked, on one process) the device pass of ``protocol`` over
    ``engines`` (already warmed up), interleaved; the garbage collector is off while timing."""
    dev = engines[0].stages[0].device
    g = torch.Generator().manual_seed(seed)
    prompts = {p: _prompt(engines[0].arch.vocab_size, p, g) for p in sorted(set(protocol.prompt_lengths))}
    runs = protocol.decode_runs()
    timings = [_Timings(deep=bool(d)) for d in (deep or [False] * len(engines))]
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside a timed run is noise that medians of a few runs do not always hide
    try:
        _wall_pass(engines, protocol, prompts, runs, timings, after_run)
        can_time = clock_factory is not None or (dev.type == "cuda" and hasattr(torch.cuda, "_sleep"))
        one_process = all(getattr(e, "tp_size", 1) == 1 for e in engines)
        if device_timing and protocol.device_repeats > 0 and can_time and one_process:
            with torch.cuda.device(dev) if dev.type == "cuda" else _nullcontext():
                clock = (clock_factory or DeviceClock)(dev)
                _device_pass(engines, clock, protocol, prompts, runs, timings, after_run)
    finally:
        if gc_was_on:
            gc.enable()
    return timings


def _prompts(protocol: Protocol, vocab: int, seed: int) -> tuple[dict[int, list[int]], list[tuple[int, int]]]:
    g = torch.Generator().manual_seed(seed)
    return {p: _prompt(vocab, p, g) for p in sorted(set(protocol.prompt_lengths))}, protocol.decode_runs()


# ---------------------------------------------------------------------------------------------------
# measuring


def _check_model(model_dir: str | Path, protocol: Protocol, num_layers: int | None):
    ck = scan_checkpoint(model_dir)
    if num_layers is not None and ck.arch.num_layers != num_layers:
        raise CheckpointError(
            f"{model_dir} has {ck.arch.num_layers} hidden layers but the job expects a {num_layers}-layer fingerprint; "
            "regenerate the fingerprint checkpoints."
        )
    if ck.arch.vocab_size <= 3:
        raise CheckpointError(f"{model_dir} has a vocabulary of {ck.arch.vocab_size} ids; a fingerprint needs more than 3.")
    if max(protocol.prompt_lengths) + max(protocol.output_lengths) > min(protocol.context_tokens, ck.arch.max_position):
        raise BadRequest(f"the protocol's longest prompt plus output does not fit {model_dir}'s context of {ck.arch.max_position} tokens.")
    return ck


class _Loaded:
    """One engine loaded for measuring, with its own memory figures (taken while it loaded and warmed
    up before any other engine of the measurement ran).

    With tensor parallelism every rank loads it; the leader warms it up (``runner``: the engine,
    announced to the followers by ``index`` on ``coord``), a follower runs the leader's warm-up
    generations, and each rank then reads its own memory peaks."""

    def __init__(self, model_dir, device: str, protocol: Protocol, variant: ProfileVariant, *, seed: int, tp_rank: int,
                 tp_size: int, gpu_warmup_s: float, index: int = 0, coord=None, replay_layers: int = 0):
        self.t_start = time.perf_counter()
        self.probe = _NvmlProbe(torch.device(device))
        self.base = _Baseline(torch.device(device), self.probe)
        # A deep run's decode runs are cut short (``DEEP_STEPS``). On one process it captures only the
        # prefills of the protocol's prompt lengths (at a model's depth, capturing every length cost
        # up to 6 s, more than its timing); with tensor parallelism it captures every serving graph,
        # because there its memory says how NCCL's share grows with depth (``estimator.fit_variant``).
        self.deep = bool(replay_layers)
        self.engine = load_engine(model_dir, device, protocol.context_tokens, variant, seed=seed, tp_rank=tp_rank, tp_size=tp_size,
                                  replay_layers=replay_layers, replay_distinct=protocol.replay_distinct,
                                  prefill_lengths=sorted(set(protocol.prompt_lengths)) if self.deep and tp_size == 1 else None)
        self.num_layers = replay_layers or self.engine.arch.num_layers
        self.replayed_from = self.engine.stages[0].replayed_from  # replay_layers loads one stage
        self.runner = _Announced(self.engine, index, coord) if coord is not None and tp_rank == 0 else self.engine
        self.dev = self.engine.stages[0].device
        self.nvml_peak = 0
        self.weight_bytes, self.kv_bytes = self.engine.weight_bytes(), self.engine.kv_cache_bytes()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            # Loading leaves its temporaries (16-bit copies of a layer, quantization scratch) in the
            # allocator's cache; a serving worker does not need them, and how many stay cached differs
            # from one fingerprint to the next, which a per-layer memory slope would multiply by L.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.sample()
        if tp_rank == 0:
            prompts, runs = _prompts(protocol, self.engine.arch.vocab_size, seed)
            _warm_up(self.runner, protocol, prompts, runs, gpu_warmup_s, self.deep)
            if coord is not None:
                _broadcast_index(coord, _PHASE_END)
        else:
            _follow_phase(coord, {index: self.engine})
        self.finish_memory(protocol)

    def sample(self) -> None:
        self.nvml_peak = max(self.nvml_peak, self.probe.sample())

    def finish_memory(self, protocol: Protocol) -> None:
        """Read this engine's peaks (its warm-up ran every shape of the protocol)."""
        self.sample()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak, self.reserved, self.nvml = self.base.own(
                int(torch.cuda.max_memory_allocated(self.dev)), int(torch.cuda.max_memory_reserved(self.dev)), self.nvml_peak)
        else:
            dtype_bytes = self.engine.stages[0].dtype.itemsize
            self.peak = self.engine.memory_bytes()[0] + activation_bytes_estimate(self.engine.arch, max(protocol.prompt_lengths), dtype_bytes)
            self.reserved = self.nvml = 0

    def close(self, follower: bool = False) -> None:
        """Close the engine; a TP follower first takes the leader's close message."""
        self.probe.close()
        if follower:
            self.engine.follow_one()
        self.engine.close()
        if hasattr(self.engine, "release_groups"):
            self.engine.release_groups()


def _measurement(loaded: _Loaded, variant: ProfileVariant, protocol: Protocol, timings: _Timings | None, gpu_seconds: float,
                 tp_size: int) -> FingerprintMeasurement:
    m = FingerprintMeasurement(
        num_layers=loaded.num_layers,
        variant=variant,
        ttft=[],
        tpot_ms=0.0,
        decode_steps=0,
        peak_bytes=loaded.peak,
        nvml_peak_bytes=loaded.nvml,
        weight_bytes=loaded.weight_bytes,
        kv_cache_bytes=loaded.kv_bytes,
        timer="perf_counter",
        context_tokens=protocol.context_tokens,
        reserved_peak_bytes=loaded.reserved,
        gpu_seconds=gpu_seconds,
        tp=tp_size,
        base_allocated_bytes=loaded.base.allocated,
        decode_graphs=bool(loaded.engine.graphs_captured) and all(loaded.engine.graphs_captured),
        replayed_from=loaded.replayed_from,
        prefill_graph_tokens=loaded.engine.prefill_graph_tokens,
        replay_copies=sum(s.replay_copies for s in loaded.engine.stages),
        fused_decode=bool(loaded.engine.fused_decode) and all(loaded.engine.fused_decode),
        fused_error=loaded.engine.fused_error,
        graphs=getattr(loaded.engine, "graph_count", 0),
    )
    if timings is None:
        return m
    m.ttft = [PromptTiming(prompt_tokens=p, ttft_ms=_median(v)) for p, v in sorted(timings.ttft.items())]
    m.decode = [DecodeTiming(position=pos, step_ms=_median(v)) for pos, v in sorted(timings.steps.items())]
    all_steps = [s for v in timings.steps.values() for s in v]
    m.tpot_ms = _median(all_steps)
    m.decode_steps = len(all_steps)
    if timings.ttft_device:
        m.timer = "perf_counter+cuda_events"
        m.ttft_device = [PromptTiming(prompt_tokens=p, ttft_ms=_median(v)) for p, v in sorted(timings.ttft_device.items())]
        m.decode_device = [DecodeTiming(position=pos, step_ms=_median(v)) for pos, v in sorted(timings.steps_device.items())]
        m.tpot_device_ms = _median([s for v in timings.steps_device.values() for s in v])
    return m


def measure_models(
    model_dirs: Sequence[str | Path],
    device: str,
    *,
    protocol: Protocol,
    variant: ProfileVariant | None = None,
    num_layers: Sequence[int] | None = None,
    device_timing: bool = True,
    gpu_warmup_s: float = ENGINE_WARMUP_S,
    seed: int = 0,
    clock_factory: Callable[[torch.device], object] | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    coord=None,
) -> list[FingerprintMeasurement]:
    """Measure several checkpoints of one architecture as ``variant`` on ``device`` together: each
    is loaded in turn and its memory taken as it loads and warms up (with the others' memory told
    apart, see ``_Baseline``), then all are timed with their runs interleaved. The fingerprint
    pair is measured this way: a layer's cost is the difference of the two, and interleaving keeps
    drift between them out of it. Each measurement's GPU-seconds are an equal share of the total
    (times ``tp_size`` on CUDA).

    With ``tp_size > 1`` every rank calls this with the same arguments and its ``tp_rank``
    (``torch.distributed`` initialized); ``coord`` is a gloo group of the ranks (made here when not
    given). Rank 0 times, interleaved exactly as at TP=1; the other ranks follow its generations.
    Every rank returns its measurements, with its own memory; only rank 0's carry timings."""
    variant = variant or ProfileVariant(tp=tp_size)
    for i, d in enumerate(model_dirs):
        _check_model(d, protocol, num_layers[i] if num_layers is not None else None)
    if tp_size > 1 and coord is None:
        import torch.distributed as dist

        coord = dist.new_group(list(range(tp_size)), backend="gloo")
    leader = tp_rank == 0
    t_start = time.perf_counter()
    loaded: list[_Loaded] = []
    # The deepest model again, replayed to the protocol's depth (a deep pass from its weights).
    plan = [(d, 0) for d in model_dirs]
    if protocol.replay_depth:
        deepest = max(range(len(model_dirs)), key=lambda i: scan_checkpoint(model_dirs[i]).arch.num_layers)
        if protocol.replay_depth > scan_checkpoint(model_dirs[deepest]).arch.num_layers:
            plan.append((model_dirs[deepest], protocol.replay_depth))
    try:
        for i, (d, replay) in enumerate(plan):
            loaded.append(_Loaded(d, device, protocol, variant, seed=seed, tp_rank=tp_rank, tp_size=tp_size,
                                  gpu_warmup_s=gpu_warmup_s, index=i, coord=coord, replay_layers=replay))

        def after_run() -> None:
            for item in loaded:
                item.sample()

        timings: list[_Timings | None] = [None] * len(loaded)
        if leader:
            timings = list(_time_engines([x.runner for x in loaded], protocol, device_timing=device_timing, seed=seed,
                                         after_run=after_run, clock_factory=clock_factory,
                                         deep=[x.deep for x in loaded]))
            if coord is not None:
                _broadcast_index(coord, _PHASE_END)
        else:
            _follow_phase(coord, [x.engine for x in loaded])
        cuda = loaded[0].dev.type == "cuda"
        share = (time.perf_counter() - t_start) / len(loaded) * (tp_size if cuda else 1)
        return [_measurement(x, variant, protocol, t, share, tp_size) for x, t in zip(loaded, timings)]
    finally:
        for x in loaded:
            # A follower takes each engine's close message. (After a failure on one rank only, the
            # ranks disagree on where they are; the parent kills them when the leader reports it.)
            x.close(follower=not leader)


def measure_model(
    model_dir: str | Path,
    device: str,
    *,
    protocol: Protocol,
    variant: ProfileVariant | None = None,
    num_layers: int | None = None,
    device_timing: bool = True,
    gpu_warmup_s: float = ENGINE_WARMUP_S,
    seed: int = 0,
    tp_rank: int = 0,
    tp_size: int = 1,
    clock_factory: Callable[[torch.device], object] | None = None,
    coord=None,
) -> FingerprintMeasurement:
    """Load ``model_dir`` on ``device`` as ``variant`` and measure it with ``protocol`` (one model of
    ``measure_models``; used for full models in validation, ``device_timing=False``)."""
    [m] = measure_models([model_dir], device, protocol=protocol, variant=variant or ProfileVariant(tp=tp_size),
                         num_layers=[num_layers] if num_layers is not None else None, device_timing=device_timing,
                         gpu_warmup_s=gpu_warmup_s, seed=seed, clock_factory=clock_factory, tp_rank=tp_rank, tp_size=tp_size,
                         coord=coord)
    return m


def measure_fingerprint(
    model_dir: str | Path,
    device: str,
    *,
    num_layers: int,
    prompt_lengths: list[int],
    output_lengths: list[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    variant: ProfileVariant | None = None,
    seed: int = 0,
    device_timing: bool = True,
    gpu_warmup_s: float = ENGINE_WARMUP_S,
) -> FingerprintMeasurement:
    """Measure one fingerprint checkpoint (``num_layers`` hidden layers) on ``device`` as ``variant``
    (default fp16); see the module docstring for what each number means."""
    protocol = Protocol(
        prompt_lengths=tuple(prompt_lengths),
        output_lengths=tuple(output_lengths),
        repeats=repeats,
        warmup=warmup,
        device_repeats=repeats if device_timing else 0,
        context_tokens=context_tokens,
    )
    return measure_model(model_dir, device, protocol=protocol, variant=variant or ProfileVariant(), num_layers=num_layers,
                         device_timing=device_timing, gpu_warmup_s=gpu_warmup_s, seed=seed)


# ---------------------------------------------------------------------------------------------------
# a profiling job


def _variant_key(v: ProfileVariant) -> str:
    return f"tp{v.tp}-w{v.weight_quant}-kv{v.kv_quant}-p{v.pruning.replace(':', '')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_gpu(device: str, seconds: float) -> None:
    """Keep a CUDA device busy with matrix products for ``seconds`` (clocks ramp up under load)."""
    dev = torch.device(device)
    if dev.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(dev)
    del a


def _tp_rank_main(rank: int, size: int, port: int, job_bytes: bytes, devices: list[str], variants_bytes: list[bytes],
                  queue) -> None:
    """One rank of the tensor-parallel measurements (spawned once per TP degree): measure every
    fingerprint of the job as each of the variants, rank 0 timing; send ``(rank, {variant key:
    [measurement bytes] or error text}, allreduce, fatal error)`` to ``queue``. A variant the engine
    refuses is reported by its key and the next one goes on, on every rank alike."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank that hangs (a collective its peers never join) shows where: the parent signals SIGUSR1
    # before it kills a rank that overran the job's time limit, and every thread's stack goes to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def report(e: Exception) -> None:
        queue.put((rank, {}, (0.0, 0.0), f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-300:]}"))

    try:
        job = decoder(ProfileJob).decode(job_bytes)
        device = devices[rank]
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
            pin_to_gpu_cpus(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        report(e)
        return
    try:
        allreduce = measure_allreduce(device) if cuda else (0.0, 0.0)
        protocol = protocol_of_job(job)
        coord = dist.new_group(list(range(size)), backend="gloo")  # which engine the leader runs next
        out: dict[str, list[bytes] | str] = {}
        for vb in variants_bytes:
            variant = decoder(ProfileVariant).decode(vb)
            try:
                # The fingerprints of a variant together, timed interleaved as at TP=1.
                out[_variant_key(variant)] = [
                    encode(m) for m in measure_models(job.fingerprint_paths, device, protocol=protocol, variant=variant,
                                                      device_timing=job.device_timing, gpu_warmup_s=ENGINE_WARMUP_S,
                                                      tp_rank=rank, tp_size=size, coord=coord)
                ]
            except UnsupportedModel as e:  # raised alike on every rank, before any collective of the variant
                out[_variant_key(variant)] = e.message
        queue.put((rank, out, allreduce, ""))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides (and kills the other ranks)
        # Reported before the group is destroyed: destroying it can wait on a peer that is stuck in a
        # collective this rank left with the exception, and the parent would then see only a timeout.
        report(e)
    finally:
        dist.destroy_process_group()


def measure_allreduce(device: str, sizes: Sequence[int] = (8 << 10, 256 << 10, 4 << 20, 32 << 20)) -> tuple[float, float]:
    """All-reduce cost over the initialized default process group: ``(latency_us, bus_GBps)`` from a
    least-squares line ``t = latency + 2 (n-1)/n * bytes / bus_bandwidth`` over ``sizes``."""
    import torch.distributed as dist

    n = dist.get_world_size()
    dev = torch.device(device)
    xs, ys = [], []
    for size in sizes:
        t = torch.ones(size // 2, dtype=torch.float16, device=dev)
        for _ in range(3):
            dist.all_reduce(t)
        torch.cuda.synchronize(dev)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        torch.cuda.synchronize(dev)
        ys.append((time.perf_counter() - t0) / reps * 1e6)
        xs.append(2 * (n - 1) / n * size)
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    bus = 1e-3 / slope if slope > 0 else 0.0  # bytes per microsecond -> GB/s
    return float(max(intercept, 0.0)), float(bus)


def _measure_tp(job: ProfileJob, devices: list[str], variants: list[ProfileVariant], timeout_s: float):
    """Measure ``variants`` (all of one TP degree ``t`` > 1) on ``devices[:t]``, one spawned process
    per rank for all of them. Returns ``({variant key: [measurements] or reason}, (latency_us, GB/s))``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    size = variants[0].tp
    port = _free_port()
    blobs = [encode(v) for v in variants]
    procs = [ctx.Process(target=_tp_rank_main, args=(r, size, port, encode(job), devices[:size], blobs, queue), daemon=True)
             for r in range(size)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _dump_stacks(procs)
                keys = ", ".join(_variant_key(v) for v in variants)
                codes = ", ".join(f"rank {r} {'alive' if p.exitcode is None else f'exited {p.exitcode}'}" for r, p in enumerate(procs))
                raise TimeoutError(f"tensor-parallel profiling of {keys} took longer than {timeout_s:.0f} s ({codes})")
            try:
                rank, out, allreduce, error = queue.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty: check that the ranks are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a rank of the TP={size} measurement died with exit code {dead[0].exitcode}") from None
                continue
            if error:
                raise RuntimeError(f"rank {rank} of the TP={size} measurement: {error}")
            results[rank] = (out, allreduce)
    finally:
        for p in procs:  # ranks that sent their results exit on their own; the others are killed
            p.join(timeout=30 if len(results) == size else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    lead, allreduce = results[0]
    merged: dict[str, list[FingerprintMeasurement] | str] = {}
    for key, value in lead.items():
        if isinstance(value, str):
            merged[key] = value
            continue
        ms = [decoder(FingerprintMeasurement).decode(b) for b in value]
        for r in range(1, size):  # memory: the largest rank's
            other = results[r][0].get(key)
            if isinstance(other, list):
                for m, b in zip(ms, other):
                    o = decoder(FingerprintMeasurement).decode(b)
                    m.peak_bytes = max(m.peak_bytes, o.peak_bytes)
                    m.nvml_peak_bytes = max(m.nvml_peak_bytes, o.nvml_peak_bytes)
                    m.reserved_peak_bytes = max(m.reserved_peak_bytes, o.reserved_peak_bytes)
        merged[key] = ms
    return merged, allreduce


def _dump_stacks(procs) -> None:
    """Ask live rank processes for their threads' stacks (on their stderr) before they are killed."""
    alive = [p for p in procs if p.is_alive() and p.pid]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except OSError:
            pass
    if alive:
        time.sleep(1.0)


def _measure_tp_variant(job: ProfileJob, devices: list[str], variant: ProfileVariant, timeout_s: float):
    """One TP variant (``iserve validate`` measures full models this way): its measurements and the
    all-reduce cost. Raises ``UnsupportedModel`` when the engine refuses it."""
    merged, allreduce = _measure_tp(job, devices, [variant], timeout_s)
    value = merged[_variant_key(variant)]
    if isinstance(value, str):
        raise UnsupportedModel(value)
    return value, allreduce


def run_profile_job(job: ProfileJob, devices: Sequence[str], *, log: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure every fingerprint of ``job`` as every variant, on ``devices`` (``devices[0]`` for TP=1;
    ``devices[:tp]`` for a TP variant). A variant the engine refuses (``UnsupportedModel``), or that
    needs more devices than given, is listed in ``skipped`` with the reason; other errors propagate
    (the agent then reports the run as failed and the service retries on another GPU)."""
    devices = list(devices)
    if not devices:
        raise BadRequest("a profiling job needs at least one device.")
    if all(torch.device(d).type == "cpu" for d in devices):
        # The replayed deep run measures how a GPU's host launches and device work overlap over a
        # model's depth; on CPU workers (simulated GPUs) it would only triple the job's time.
        job = msgspec.structs.replace(job, replay_depth=0)
        # Simulated GPUs: fingerprints of tiny models gain nothing from intra-op threads, and on a
        # busy CPU multi-threaded ops stall (a job took 8x longer with 2 threads than with 1).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run_profile_job(job, devices, log)
        finally:
            torch.set_num_threads(threads)
    return _run_profile_job(job, devices, log)


def _run_profile_job(job: ProfileJob, devices: list[str], log: Callable[[str], None] | None) -> ProfileResult:
    protocol = protocol_of_job(job)
    t0 = time.perf_counter()
    _warm_gpu(devices[0], job.gpu_warmup_s)
    measurements: list[FingerprintMeasurement] = []
    skipped: dict[str, str] = {}
    allreduce = (0.0, 0.0)
    by_tp: dict[int, list[ProfileVariant]] = {}
    for variant in job.variants:
        if variant.tp > 1:
            by_tp.setdefault(variant.tp, []).append(variant)
    for tp, variants in sorted(by_tp.items()):
        if tp > len(devices):
            skipped.update({_variant_key(v): f"needs {tp} GPUs, the profiling job had {len(devices)}" for v in variants})
            continue
        # Fresh rank processes per variant, as a serving worker is: what NCCL keeps on the GPU outside
        # the allocator grew with the first variant's deep run in a process and then stayed, so
        # later variants measured in the same processes showed none of it (two H200s: the full TP=2
        # model 9.32 GiB per GPU, int8 0.46 GiB above its estimate when measured third).
        for variant in variants:
            remaining = job.timeout_s - (time.perf_counter() - t0)  # the job's time limit covers all of them
            if remaining <= 0:
                raise TimeoutError(f"the profiling job ran out of its {job.timeout_s:.0f} s before {_variant_key(variant)}")
            if log:
                log(f"measuring the fingerprints as {_variant_key(variant)} on {', '.join(devices[:tp])}")
            merged, ar = _measure_tp(job, devices, [variant], remaining)
            if ar[1] > 0:
                allreduce = ar
            for key, value in merged.items():
                if isinstance(value, str):
                    skipped[key] = value
                else:
                    measurements += value
    one_gpu = [v for v in job.variants if v.tp == 1]
    cache = _fingerprint_cache(job.fingerprint_paths, devices[0]) if one_gpu else None
    try:
        with cache.active() if cache is not None else _nullcontext():
            for variant in one_gpu:
                key = _variant_key(variant)
                try:
                    ms = measure_models(job.fingerprint_paths, devices[0], protocol=protocol, variant=variant,
                                        device_timing=job.device_timing, seed=0)
                except UnsupportedModel as e:
                    skipped[key] = e.message
                    continue
                measurements += ms
                if log:
                    for path, m in zip(job.fingerprint_paths, ms):
                        log(f"measured {Path(path).name} as {key}: TPOT {m.tpot_ms:.3f} ms (device {m.tpot_device_ms:.3f} ms)")
    finally:
        cache_bytes = cache.nbytes if cache is not None else 0
        if cache is not None:
            cache.clear()
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t0
    # The first device is held throughout; a TP measurement also holds tp - 1 more for its duration.
    extra = sum(m.gpu_seconds * (m.tp - 1) / m.tp for m in measurements if m.tp > 1)
    return ProfileResult(
        job_id=job.job_id,
        device=devices[0],
        gpu_type=gpu_type_of(devices[0]),
        measurements=measurements,
        gpu_seconds=wall + extra,
        wall_seconds=wall,
        peak_bytes=max((m.peak_bytes for m in measurements), default=0) + cache_bytes,
        skipped=skipped,
        allreduce_latency_us=allreduce[0],
        allreduce_bus_gbps=allreduce[1],
        nvml_peak_bytes=max((m.nvml_peak_bytes for m in measurements), default=0) + cache_bytes,
    )


CACHE_ROOM = 4  # hold the fingerprints' tensors on the GPU only when it has this many times their size free


def _fingerprint_cache(paths: Sequence[str], device: str) -> TensorCache | None:
    """The job's fingerprint tensors read once onto ``device`` (``TensorCache``): every variant
    builds its engines from copies of them instead of reading the files again. None on a CPU or
    without room. The process's first memory baseline is taken before, so that the cache is
    counted as another's memory, not as the engines' (``_Baseline``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    cks = [scan_checkpoint(p) for p in paths]
    free, _ = torch.cuda.mem_get_info(dev)
    if CACHE_ROOM * sum(ck.data_bytes for ck in cks) > free:
        return None
    probe = _NvmlProbe(dev)
    try:
        _Baseline(dev, probe)
    finally:
        probe.close()
    cache = TensorCache(str(dev))
    for ck in cks:
        cache.add(ck)
    return cache


def run_profile_job_file(job_path: str | Path, result_path: str | Path, devices: Sequence[str],
                         log: Callable[[str], None] | None = None) -> ProfileResult:
    """The worker's profile mode: read a ``ProfileJob``, run it, write the ``ProfileResult``
    atomically. Errors propagate for the worker to report."""
    job = decoder(ProfileJob).decode(Path(job_path).read_bytes())
    result = run_profile_job(job, devices, log=log)
    out = Path(result_path)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(encode(result))
    os.replace(tmp, out)
    return result


__all__ = [
    "DeviceClock",
    "Protocol",
    "activation_bytes_estimate",
    "gpu_type_of",
    "load_engine",
    "measure_allreduce",
    "measure_fingerprint",
    "measure_model",
    "measure_models",
    "protocol_of_job",
    "run_profile_job",
    "run_profile_job_file",
    "variant_kwargs",
]
