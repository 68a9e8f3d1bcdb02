"""CUDA-graph capture of the engine's decode steps and prefills: buckets, streams, graph sets.

See docs/engine-internals.md#cuda-graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .stage import Stage
from .tp import TPControl

GRAPH_BUCKET = 256  # positions per CUDA-graph key-length bucket (the step grows for long contexts)
MAX_GRAPH_BUCKETS = 16
PREFILL_GRAPH_STEP = (
    64  # captured prefills take prompts padded up to a multiple of this many tokens (twice it past 1024) ...
)
PREFILL_GRAPH_TOKENS = 2048  # ... up to this many (the default); longer prompts run eagerly


def graph_buckets(context_tokens: int) -> list[int]:
    """Key lengths decode graphs are captured for: multiples of ``GRAPH_BUCKET`` (a larger step for
    long contexts, so that there are at most ``MAX_GRAPH_BUCKETS``), the last one the whole context."""
    step = GRAPH_BUCKET
    while -(-context_tokens // step) > MAX_GRAPH_BUCKETS:
        step *= 2
    return sorted({min(context_tokens, b) for b in range(step, context_tokens + step, step)})


_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _warmup_stream(dev: torch.device) -> torch.cuda.Stream:
    """The process's one side stream per device for warming up captures: a new stream per capture
    would get, and keep, a cuBLAS workspace of its own. See docs/engine-internals.md#cuda-graphs."""
    if dev not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[dev] = torch.cuda.Stream(dev)
    return _WARMUP_STREAMS[dev]


def _capture_stream(dev: torch.device) -> torch.cuda.Stream:
    """The process's one stream per device that graphs are captured on (named, so that
    ``prime_streams`` can reach it)."""
    if dev not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _CAPTURE_STREAMS[dev]


def prime_streams(device: str | torch.device) -> None:
    """Give the streams every engine of this process uses on ``device`` (the current one, the
    warm-up and the capture stream) their library workspaces now, a matrix product on each, so that
    every engine's memory peak includes them once. See docs/engine-internals.md#cuda-graphs."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    with torch.cuda.device(dev):
        for stream in (torch.cuda.current_stream(dev), _warmup_stream(dev), _capture_stream(dev)):
            with torch.cuda.stream(stream):
                for dtype in (torch.float16, torch.bfloat16):
                    a = torch.ones(64, 64, device=dev, dtype=dtype)
                    (a @ a).sum()
                    torch.nn.functional.linear(a, a)
            torch.cuda.synchronize(dev)


def _capture_graphs(
    dev: torch.device, keys: Sequence[int], run: Callable[[int], torch.Tensor], pool, *, warmups: int = 1
) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """``run(key)`` captured in one CUDA graph per key, in the order of ``keys``, in the shared memory
    ``pool``: warmed up ``warmups`` times per key on a side stream first (library handles,
    workspaces, Triton tuning), as capture requires. Returns ``{key: (graph, static output)}``."""
    with torch.cuda.device(dev):
        side = _warmup_stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for key in keys:
                for _ in range(warmups):
                    run(key)
        torch.cuda.current_stream(dev).wait_stream(side)
        torch.cuda.synchronize(dev)
        graphs = {}
        for key in keys:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=_capture_stream(dev)):
                out = run(key)
            graphs[key] = (graph, out)
        torch.cuda.synchronize(dev)
    return graphs


class DecodeGraphs:
    """One stage's decode step captured in CUDA graphs, one per key-length bucket.

    ``inp`` is the stage's static input (token id ``[1]`` or hidden ``[1, hidden]``); ``run(kv_len)``
    replays the bucket's graph and returns its static output. The position comes from ``stage.pos``.
    """

    def __init__(self, stage: Stage, inp: torch.Tensor, buckets: list[int], pool):
        self.stage = stage
        self.inp = inp
        with torch.cuda.device(stage.device):
            stage.pos.zero_()  # warm-up writes cache row 0, which every prefill rewrites
        self.graphs = _capture_graphs(
            stage.device, buckets, lambda kv_len: stage.decode(inp, kv_len=kv_len, masked=True), pool, warmups=2
        )

    def run(self, kv_len: int) -> torch.Tensor:
        graph, out = self.graphs[kv_len]
        graph.replay()
        return out


def smallest_at_least(buckets: Sequence[int], n: int) -> int:
    """The first of the ascending ``buckets`` that holds ``n``; 0 when none does."""
    return next((b for b in buckets if b >= n), 0)


def prefill_buckets(context_tokens: int, max_tokens: int = PREFILL_GRAPH_TOKENS) -> list[int]:
    """Prompt lengths prefill graphs are captured for, up to ``max_tokens`` and the context (none
    when ``max_tokens`` is 0): multiples of ``PREFILL_GRAPH_STEP`` up to 1024, of twice it beyond,
    so that a prompt is padded by at most an eighth of its length past the first step."""
    top = min(max_tokens, context_tokens)
    out: list[int] = []
    b = 0
    while True:
        b += PREFILL_GRAPH_STEP if b < 1024 else 2 * PREFILL_GRAPH_STEP
        if b > top:
            return out
        out.append(b)


class PrefillGraphs:
    """One stage's prefill captured in CUDA graphs, one per padded prompt length (``buckets``).

    ``inp`` is the stage's static input, token ids ``[max]`` (first stage) or hidden ``[max, hidden]``,
    of which the graph of length ``b`` reads the first ``b`` rows; ``last`` (``[1]``) is the real
    prompt's last position, whose logits the last stage returns. The longest is captured first, so
    that the shorter ones reuse its memory in the shared pool (they never run at the same time).
    """

    def __init__(self, stage: Stage, buckets: list[int], pool):
        dev = stage.device
        longest = max(buckets)
        if stage.is_first:
            self.inp = torch.zeros(longest, dtype=torch.long, device=dev)
        else:
            self.inp = torch.zeros(longest, stage.arch.hidden_size, dtype=stage.dtype, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.graphs = _capture_graphs(
            dev, sorted(buckets, reverse=True), lambda b: stage.prefill(self.inp[:b], last=self.last), pool
        )

    def run(self, length: int) -> torch.Tensor:
        graph, out = self.graphs[length]
        graph.replay()
        return out


def capture(
    stages: list[Stage], token: torch.Tensor, buckets: list[int], prefill_lengths: list[int], tp: TPControl | None
) -> tuple[list[DecodeGraphs | None], list[PrefillGraphs], str]:
    """Capture the decode step of every CUDA stage that can be captured (``token`` is the first
    stage's input buffer), and the prefill of every stage when all can be. Returns the decode graphs
    per stage (None: eager), the prefill graphs (one per stage, or none) and why prefill stays
    eager ("" when it does not, or was not asked for)."""
    pools: dict[torch.device, object] = {}
    decode: list[DecodeGraphs | None] = [None] * len(stages)
    prefill: list[PrefillGraphs] = []
    error = ""
    inp = token
    for i, stage in enumerate(stages):
        if i > 0:
            inp = torch.zeros(1, stage.arch.hidden_size, dtype=stage.dtype, device=stage.device)
        if stage.device.type != "cuda" or stage.is_moe:
            continue
        pool = pools.setdefault(stage.device, torch.cuda.graph_pool_handle())
        decode[i] = DecodeGraphs(stage, inp, buckets, pool)
    if prefill_lengths and all(s.device.type == "cuda" and not s.is_moe for s in stages):
        try:
            prefill = [PrefillGraphs(s, prefill_lengths, pools[s.device]) for s in stages]
        except RuntimeError as e:  # a kernel that cannot be captured: prefill stays eager, and says why
            prefill = []
            error = f"prefill capture failed: {e}"
            for s in stages:
                torch.cuda.synchronize(s.device)
        if tp is not None and not tp.all_agree(bool(prefill)) and prefill:
            prefill = []  # every rank prefills the same way
            error = "prefill capture failed on another tensor-parallel rank"
    return decode, prefill, error
