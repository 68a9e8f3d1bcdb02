"""Timing warmed-up engines: the wall pass (what a request pays) and the device pass (what the GPU
needs), interleaved over the engines of a measurement (see docs/profiling.md)."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass, field

import torch

from iserve.messages import TokenChunk, encode

from .protocol import Protocol
from .tp import announce_next

DEVICE_PREFILLS = 4  # device timing: prefills of one prompt length queued back to back per sample ...
DEVICE_STEPS = 16  # ... and decode steps at one position
DEEP_STEPS = 8  # decode steps per decode run of a deep (replayed) run: its points fix the line at the model's depth
DEEP_REPEATS = 3  # repeats of a replayed deep run: its passes are a full model's length (validation uses 3)


class DeviceClock:
    """CUDA events and GPU spins on the current stream of one device (see docs/profiling.md).

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
class Timings:
    """One engine's timed samples (ms) by prompt length and by position, wall and device."""

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


def _run_wall(engine, ids: list[int], max_tokens: int, sink: TokenSink | None = None) -> tuple[float, list[float]]:
    """One generation; returns host wall TTFT and the wall time of every further step (ms)."""
    stamps: list[float] = []

    def on_token(t: int) -> None:
        stamps.append(time.perf_counter())
        if sink is not None:
            sink.push(t)

    announce_next(engine)
    t0 = time.perf_counter()
    engine.generate(ids, max_tokens=max_tokens, ignore_eos=True, on_token=on_token)
    if len(stamps) != max_tokens:
        raise RuntimeError(f"asked for {max_tokens} tokens with ignore_eos but got {len(stamps)}")
    ttft = (stamps[0] - t0) * 1000.0
    steps = [(b - a) * 1000.0 for a, b in zip(stamps, stamps[1:])]
    return ttft, steps


def _prompt(vocab: int, length: int, g: torch.Generator) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def warm_up(
    engine,
    protocol: Protocol,
    prompts: dict[int, list[int]],
    runs: list[tuple[int, int]],
    gpu_warmup_s: float,
    deep: bool = False,
) -> None:
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


def _done(engine, t: "Timings") -> bool:
    """Whether ``engine`` has had its wall-pass rounds: a replayed deep run takes ``DEEP_REPEATS``."""
    return bool(getattr(engine, "replayed", False)) and t.rounds >= DEEP_REPEATS


def _wall_pass(
    engines: list,
    protocol: Protocol,
    prompts: dict[int, list[int]],
    runs: list[tuple[int, int]],
    timings: list[Timings],
    after_run: Callable[[], None],
) -> None:
    """``repeats`` rounds; in each, every engine in turn runs every prompt length and decode run, so
    that drift (clocks, temperature, other work on the host) affects all engines alike. A deep run
    cuts its decode runs to ``DEEP_STEPS`` steps (see docs/profiling.md#the-deep-run)."""
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


def _device_pass(
    engines: list,
    clock,
    protocol: Protocol,
    prompts: dict[int, list[int]],
    runs: list[tuple[int, int]],
    timings: list[Timings],
    after_run: Callable[[], None],
) -> None:
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
                spin = 2.0 * DEVICE_PREFILLS * median(t.ttft[p]) + 1.0
                t.ttft_device.setdefault(p, []).append(
                    _queued(
                        clock,
                        lambda p=p: engine.queue_prefill(prompts[p]),  # type: ignore[misc]  # bound default
                        DEVICE_PREFILLS,
                        spin,
                    )
                )
            step_wall = max(median(v) for v in t.steps.values())
            for p, o in runs:
                for pos in sorted({p, p + o - 2}):
                    t.steps_device.setdefault(pos, []).append(
                        _queued(
                            clock,
                            lambda pos=pos: engine.queue_decode(pos),  # type: ignore[misc]  # bound default
                            DEVICE_STEPS,
                            2.0 * DEVICE_STEPS * step_wall + 1.0,
                        )
                    )
        after_run()


def time_engines(
    engines: list,
    protocol: Protocol,
    *,
    device_timing: bool,
    seed: int,
    after_run: Callable[[], None],
    clock_factory: Callable[[torch.device], object] | None = None,
    deep: Sequence[bool] | None = None,
) -> list[Timings]:
    """The wall pass and (on CUDA, when asked, on one process) the device pass of ``protocol`` over
    ``engines`` (already warmed up), interleaved; the garbage collector is off while timing."""
    dev = engines[0].stages[0].device
    g = torch.Generator().manual_seed(seed)
    prompts = {p: _prompt(engines[0].arch.vocab_size, p, g) for p in sorted(set(protocol.prompt_lengths))}
    runs = protocol.decode_runs()
    timings = [Timings(deep=bool(d)) for d in (deep or [False] * len(engines))]
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


def prompts_of(protocol: Protocol, vocab: int, seed: int) -> tuple[dict[int, list[int]], list[tuple[int, int]]]:
    """The protocol's prompts (seeded random ids, one per prompt length) and its decode runs."""
    g = torch.Generator().manual_seed(seed)
    return {p: _prompt(vocab, p, g) for p in sorted(set(protocol.prompt_lengths))}, protocol.decode_runs()
