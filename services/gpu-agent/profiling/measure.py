"""Measuring models on a device: each engine loaded as a worker loads it, its memory taken while it
loads and warms up, then all timed interleaved (see docs/profiling.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from iserve.checkpoint import scan_checkpoint
from iserve.errors import BadRequest, CheckpointError, UnsupportedModel
from iserve.gpu_agent.engine.capabilities import CAPABILITIES
from iserve.gpu_agent.engine.runner import Engine
from iserve.gpu_agent.engine.tensors import TensorCache
from iserve.messages import BatchDecodeTiming, DecodeTiming, FingerprintMeasurement, ProfileVariant, PromptTiming

from .batched import time_batched
from .memory import Baseline, NvmlProbe, activation_bytes_estimate
from .protocol import ENGINE_WARMUP_S, Protocol
from .timing import Timings, median, prompts_of, time_engines, warm_up
from .tp import PHASE_END, Announced, broadcast_index, follow_phase


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
    for knob, value in (
        ("tp", variant.tp),
        ("weight_quant", variant.weight_quant),
        ("kv_quant", variant.kv_quant),
        ("pruning", variant.pruning),
    ):
        allowed = CAPABILITIES.get(knob)
        if allowed is not None and value not in allowed:
            raise UnsupportedModel(
                f"the torch engine cannot run {knob}={value!r} yet (it supports {allowed}); "
                "profile only the variants in its CAPABILITIES."
            )


def load_engine(
    model_dir: str | Path,
    device: str,
    context_tokens: int,
    variant: ProfileVariant,
    *,
    seed: int = 0,
    tp_rank: int = 0,
    tp_size: int = 1,
    replay_layers: int = 0,
    replay_distinct: bool = False,
    prefill_lengths: Sequence[int] | None = None,
    tensors: TensorCache | None = None,
):
    """Load ``model_dir`` as one stage on ``device`` as ``variant``, the way a worker does
    (``prefill_lengths``: capture only the prefill graphs of these prompt lengths, for a deep run
    whose capture of every length would cost more than its timing; ``tensors``: cached copies of the
    checkpoint's tensors)."""
    _check_variant(variant)
    kwargs: dict = variant_kwargs(variant)
    if tp_size > 1:
        kwargs.update(tp_rank=tp_rank, tp_size=tp_size)
    if replay_layers:
        kwargs.update(replay_layers=replay_layers, replay_distinct=replay_distinct)
    if prefill_lengths is not None:
        kwargs.update(prefill_graph_lengths=list(prefill_lengths))
    if tensors is not None:
        kwargs.update(tensors=tensors)
    ck = scan_checkpoint(model_dir)
    try:
        return Engine.load(model_dir, [(device, 0, ck.arch.num_layers)], context_tokens, seed, **kwargs)
    except TypeError as e:
        if kwargs and "unexpected keyword" in str(e):
            raise UnsupportedModel(f"this engine's Engine.load does not take {', '.join(kwargs)} yet: {e}") from None
        raise


def _check_model(model_dir: str | Path, protocol: Protocol, num_layers: int | None):
    ck = scan_checkpoint(model_dir)
    if num_layers is not None and ck.arch.num_layers != num_layers:
        raise CheckpointError(
            f"{model_dir} has {ck.arch.num_layers} hidden layers but the job expects a {num_layers}-layer "
            "fingerprint; "
            "regenerate the fingerprint checkpoints."
        )
    if ck.arch.vocab_size <= 3:
        raise CheckpointError(
            f"{model_dir} has a vocabulary of {ck.arch.vocab_size} ids; a fingerprint needs more than 3."
        )
    if max(protocol.prompt_lengths) + max(protocol.output_lengths) > min(protocol.context_tokens, ck.arch.max_position):
        raise BadRequest(
            f"the protocol's longest prompt plus output does not fit {model_dir}'s context of "
            f"{ck.arch.max_position} tokens."
        )
    return ck


class _Loaded:
    """One engine loaded for measuring, with its own memory figures (taken while it loaded and warmed
    up before any other engine of the measurement ran).

    With tensor parallelism every rank loads it; the leader warms it up (``runner``: the engine,
    announced to the followers by ``index`` on ``coord``), a follower runs the leader's warm-up
    generations, and each rank then reads its own memory peaks."""

    def __init__(
        self,
        model_dir,
        device: str,
        protocol: Protocol,
        variant: ProfileVariant,
        *,
        seed: int,
        tp_rank: int,
        tp_size: int,
        gpu_warmup_s: float,
        index: int = 0,
        coord=None,
        replay_layers: int = 0,
        tensors: TensorCache | None = None,
    ):
        self.t_start = time.perf_counter()
        self.probe = NvmlProbe(torch.device(device))
        self.base = Baseline(torch.device(device), self.probe)
        # A deep run on one process captures only the prefills of the protocol's prompt lengths, with
        # tensor parallelism every serving graph. See docs/profiling.md#the-deep-run.
        self.deep = bool(replay_layers)
        self.engine = load_engine(
            model_dir,
            device,
            protocol.context_tokens,
            variant,
            seed=seed,
            tp_rank=tp_rank,
            tp_size=tp_size,
            replay_layers=replay_layers,
            replay_distinct=protocol.replay_distinct,
            prefill_lengths=(sorted(set(protocol.prompt_lengths)) if self.deep and tp_size == 1 else None),
            tensors=tensors,
        )
        self.num_layers = replay_layers or self.engine.arch.num_layers
        self.replayed_from = self.engine.stages[0].replayed_from  # replay_layers loads one stage
        self.runner = Announced(self.engine, index, coord) if coord is not None and tp_rank == 0 else self.engine
        self.dev = self.engine.stages[0].device
        self.nvml_peak = 0
        self.weight_bytes, self.kv_bytes = self.engine.weight_bytes(), self.engine.kv_cache_bytes()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            # Load temporaries left in the allocator's cache would enter the per-layer memory slope
            # (docs/profiling.md#memory).
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.sample()
        if tp_rank == 0:
            prompts, runs = prompts_of(protocol, self.engine.arch.vocab_size, seed)
            warm_up(self.runner, protocol, prompts, runs, gpu_warmup_s, self.deep)
            if coord is not None:
                broadcast_index(coord, PHASE_END)
        else:
            follow_phase(coord, {index: self.engine})
        self.finish_memory(protocol)

    def sample(self) -> None:
        self.nvml_peak = max(self.nvml_peak, self.probe.sample())

    def finish_memory(self, protocol: Protocol) -> None:
        """Read this engine's peaks (its warm-up ran every shape of the protocol)."""
        self.sample()
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
            self.peak, self.reserved, self.nvml = self.base.own(
                int(torch.cuda.max_memory_allocated(self.dev)),
                int(torch.cuda.max_memory_reserved(self.dev)),
                self.nvml_peak,
            )
        else:
            dtype_bytes = self.engine.stages[0].dtype.itemsize
            self.peak = self.engine.memory_bytes()[0] + activation_bytes_estimate(
                self.engine.arch, max(protocol.prompt_lengths), dtype_bytes
            )
            self.reserved = self.nvml = 0

    def close(self, follower: bool = False) -> None:
        """Close the engine; a TP follower first takes the leader's close message."""
        self.probe.close()
        if follower:
            self.engine.follow_one()
        self.engine.close()
        if hasattr(self.engine, "release_groups"):
            self.engine.release_groups()


def _measurement(
    loaded: _Loaded,
    variant: ProfileVariant,
    protocol: Protocol,
    timings: Timings | None,
    gpu_seconds: float,
    tp_size: int,
) -> FingerprintMeasurement:
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
    m.ttft = [PromptTiming(prompt_tokens=p, ttft_ms=median(v)) for p, v in sorted(timings.ttft.items())]
    m.decode = [DecodeTiming(position=pos, step_ms=median(v)) for pos, v in sorted(timings.steps.items())]
    all_steps = [s for v in timings.steps.values() for s in v]
    m.tpot_ms = median(all_steps)
    m.decode_steps = len(all_steps)
    if timings.ttft_device:
        m.timer = "perf_counter+cuda_events"
        m.ttft_device = [
            PromptTiming(prompt_tokens=p, ttft_ms=median(v)) for p, v in sorted(timings.ttft_device.items())
        ]
        m.decode_device = [
            DecodeTiming(position=pos, step_ms=median(v)) for pos, v in sorted(timings.steps_device.items())
        ]
        m.tpot_device_ms = median([s for v in timings.steps_device.values() for s in v])
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
    tensors: TensorCache | None = None,
) -> list[FingerprintMeasurement]:
    """Measure several checkpoints of one architecture as ``variant`` on ``device`` together: each
    is loaded in turn and its memory taken as it loads and warms up (with the others' memory told
    apart, see ``Baseline``), then all are timed with their runs interleaved. The fingerprint
    pair is measured this way: a layer's cost is the difference of the two, and interleaving keeps
    drift between them out of it. Each measurement's GPU-seconds are an equal share of the total
    (times ``tp_size`` on CUDA).

    With ``tp_size > 1`` every rank calls this with the same arguments and its ``tp_rank``
    (``torch.distributed`` initialized); ``coord`` is a gloo group of the ranks (made here when not
    given). Rank 0 times, interleaved exactly as at TP=1; the other ranks follow its generations.
    Every rank returns its measurements, with its own memory; only rank 0's carry timings.
    ``tensors``: the job's tensor cache, which the engines copy their weights from."""
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
            loaded.append(
                _Loaded(
                    d,
                    device,
                    protocol,
                    variant,
                    seed=seed,
                    tp_rank=tp_rank,
                    tp_size=tp_size,
                    gpu_warmup_s=gpu_warmup_s,
                    index=i,
                    coord=coord,
                    replay_layers=replay,
                    tensors=tensors,
                )
            )

        def after_run() -> None:
            for item in loaded:
                item.sample()

        timings: list[Timings | None] = [None] * len(loaded)
        if leader:
            timings = list(
                time_engines(
                    [x.runner for x in loaded],
                    protocol,
                    device_timing=device_timing,
                    seed=seed,
                    after_run=after_run,
                    clock_factory=clock_factory,
                    deep=[x.deep for x in loaded],
                )
            )
            if coord is not None:
                broadcast_index(coord, PHASE_END)
        else:
            follow_phase(coord, [x.engine for x in loaded])
        batched: list[list[BatchDecodeTiming]] = [[] for _ in loaded]
        if protocol.batch_sizes and tp_size == 1:  # TP batches need every rank in the step: not timed here
            batched = [[] if x.deep else time_batched(x.engine, protocol, seed=seed) for x in loaded]
        cuda = loaded[0].dev.type == "cuda"
        share = (time.perf_counter() - t_start) / len(loaded) * (tp_size if cuda else 1)
        out = [_measurement(x, variant, protocol, t, share, tp_size) for x, t in zip(loaded, timings)]
        for m, bt in zip(out, batched):
            m.batch_decode = bt
        return out
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
    [m] = measure_models(
        [model_dir],
        device,
        protocol=protocol,
        variant=variant or ProfileVariant(tp=tp_size),
        num_layers=[num_layers] if num_layers is not None else None,
        device_timing=device_timing,
        gpu_warmup_s=gpu_warmup_s,
        seed=seed,
        clock_factory=clock_factory,
        tp_rank=tp_rank,
        tp_size=tp_size,
        coord=coord,
    )
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
    (default fp16); docs/profiling.md says what each number means."""
    protocol = Protocol(
        prompt_lengths=tuple(prompt_lengths),
        output_lengths=tuple(output_lengths),
        repeats=repeats,
        warmup=warmup,
        device_repeats=repeats if device_timing else 0,
        context_tokens=context_tokens,
    )
    return measure_model(
        model_dir,
        device,
        protocol=protocol,
        variant=variant or ProfileVariant(),
        num_layers=num_layers,
        device_timing=device_timing,
        gpu_warmup_s=gpu_warmup_s,
        seed=seed,
    )
