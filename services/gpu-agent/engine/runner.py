"""``Engine``: a loaded model, split into pipeline stages, that generates tokens for one request at a time.

Typical use (the worker process)::

    engine = Engine.load("/models/llama-2-7b", [("cuda:0", 0, 16), ("cuda:1", 16, 16)], context_tokens=2048)
    ids = engine.tokenizer.encode("Hello")
    result = engine.generate(ids, max_tokens=64, on_token=send_chunk, should_stop=cancelled)

``generate`` runs the prompt through every stage (prefill), then one decode step per further token,
calling ``on_token`` as soon as each token is known so that it can be streamed. Timing: on a single
CUDA device each phase is bracketed by CUDA events; otherwise (CPU, or stages spread over several
devices, where one event pair cannot span devices) by ``time.perf_counter`` after a device sync. The
token id is read back to the host every step anyway, so both measure what a client sees.

Fused decode kernels (CUDA, when Triton runs): after loading, one decode step is run with and without
the Triton kernels of ``kernels.py``; if they agree, every CUDA stage decodes through them
(``fused_decode``), else ``fused_error`` says why and the plain torch decode is used.

CUDA graphs (``cuda_graphs=True``, the default on CUDA): each CUDA stage's decode step is then run on
a side stream to warm up (cuBLAS handles, Triton auto-tuning) and captured in ``torch.cuda.CUDAGraph``s
sharing one memory pool per device: one graph when the fused attention reads exactly the valid cache
rows, else one per key-length bucket (``graph_buckets``: multiples of 256 positions, at most 16; SDPA
reads that many rows under a mask computed on the device). A decode step writes the position into
each stage's ``pos`` buffer, replays the stage's graph and copies its static output into the next
stage's static input. A step of a 32-layer model is a few hundred kernels; replaying them as one
graph removes the per-kernel launch cost that bounds eager decode at batch 1. CPU stages, and
Mixtral stages (their decode reads the chosen experts back to the host), run eagerly.

Prefill is captured too (``prefill_graph_tokens``, default 2048): one graph per prompt length of
``prefill_buckets`` (multiples of 64 tokens up to 1024, of 128 beyond, so padding adds at most an
eighth). A shorter prompt is padded at its end up to the next such length; causal attention keeps the
padding out of the real tokens' results, the last stage returns the logits of the real last position,
and the padding's cache rows are overwritten by the decode steps that reach them. An eager prefill of
a 32-layer model launches about a thousand kernels, and the host's launching, not the GPU, then sets
its time, varying from run to run: on an H100, Llama-3-8B at 128 tokens took 14 ms eagerly and 8.7
captured, with an int8 KV cache 31 and 10 (``bench/bench_prefill.py``); 2:4-pruned Llama-2-7B took
226 ms eagerly at 1024 tokens where the GPU needed 61; and with TP the GPU's share halves while the
host's does not. Longer prompts run eagerly. Every stage must be captured, or none is; a model with
a projection whose kernel's time grows with the padding (``Linear.pads_cheaply``: int4's tinygemm)
stays eager.

Tensor parallelism (``tp_size > 1``): ``torch.distributed`` must already be initialized with one
process per rank (NCCL for CUDA, gloo for CPU); every rank calls ``Engine.load`` with the same
arguments and its own ``tp_rank`` and devices. Rank 0 is the leader: its ``generate`` first
broadcasts the request to the other ranks (a gloo group, pickled arguments), which sit in
``Engine.follow()`` and run the same generation in lockstep. Before every decode step the leader
broadcasts the token it chose and whether to stop (cancellation is known only to the leader), so
all ranks feed the same token. ``Engine.close()`` on the leader releases the followers.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from iserve.checkpoint import Checkpoint, scan_checkpoint
from iserve.errors import BadRequest, PromptTooLong, UnsupportedModel
from iserve.messages import ArchSpec

from . import arch_other
from .model import Stage, TensorParallel, release_cached
from .tokenizer import Tokenizer, load_tokenizer

GRAPH_BUCKET = 256  # positions per CUDA-graph key-length bucket (the step grows for long contexts)
MAX_GRAPH_BUCKETS = 16
PREFILL_GRAPH_STEP = 64  # captured prefills take prompts padded up to a multiple of this many tokens (twice it past 1024) ...
PREFILL_GRAPH_TOKENS = 2048  # ... up to this many (the default); longer prompts run eagerly

_CUDA_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# Attention kernels the engine lets scaled_dot_product_attention pick. cuDNN's is left out: it builds
# a new execution plan for every new key length (about a millisecond per layer and decode step, on
# an H200 with torch 2.11) and was seen to give run-to-run differences.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def _compute() -> Iterator[None]:
    """Inference mode with the engine's attention kernels; entered once per public call."""
    with torch.inference_mode(), sdpa_kernel(_SDPA_BACKENDS):
        yield
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GenerationResult:
    """What ``Engine.generate`` produced; times in milliseconds."""

    tokens: list[int]
    finish_reason: str  # "stop" (eos), "length" (max_tokens reached) or "cancelled"
    ttft_ms: float  # prefill + choosing the first token
    step_ms: list[float] = field(default_factory=list)  # each further token's decode step
    prompt_tokens: int = 0
    timer: str = "perf_counter"  # or "cuda_events"

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first (0.0 with fewer than two tokens)."""
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0


class _PerfTimer:
    """Wall-clock timer; syncs the CUDA devices in use so that queued work is counted."""

    name = "perf_counter"

    def __init__(self, cuda_devices: list[torch.device]):
        self._cuda = cuda_devices
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        for d in self._cuda:
            torch.cuda.synchronize(d)
        return (time.perf_counter() - self._t0) * 1000.0


class _CudaEventTimer:
    """CUDA events on the current stream of one device."""

    name = "cuda_events"

    def __init__(self, device: torch.device):
        self._device = device
        with torch.cuda.device(device):
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        with torch.cuda.device(self._device):
            self._start.record()

    def stop(self) -> float:
        with torch.cuda.device(self._device):
            self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))


def _parse_device(spec: str, index: int) -> torch.device:
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise BadRequest(f"stage {index} names device {spec!r}, which is not a torch device; use 'cpu' or 'cuda:N'.") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise BadRequest(f"stage {index} names device {spec!r}; the torch engine runs on 'cpu' and 'cuda:N' devices only.")
    if not torch.cuda.is_available():
        raise BadRequest(f"stage {index} asks for {spec!r} but this process sees no CUDA device; check CUDA_VISIBLE_DEVICES and the driver.")
    idx = torch.cuda.current_device() if dev.index is None else dev.index
    if idx >= torch.cuda.device_count():
        raise BadRequest(f"stage {index} asks for {spec!r} but this process sees only {torch.cuda.device_count()} CUDA device(s).")
    return torch.device("cuda", idx)


def _check_stages(stages: Sequence[tuple[str, int, int]], num_layers: int) -> None:
    if not stages:
        raise BadRequest("no pipeline stages were given; pass at least one (device, first_layer, num_layers).")
    end = 0
    for i, stage in enumerate(stages):
        try:
            _, first, n = stage
            first, n = int(first), int(n)
        except (TypeError, ValueError):
            raise BadRequest(f"stage {i} is {stage!r}; each stage is (device, first_layer, num_layers).") from None
        if n < 1:
            raise BadRequest(f"stage {i} holds {n} layers; every stage needs at least one layer.")
        if first != end:
            raise BadRequest(
                f"stage {i} starts at layer {first} but the stages before it end at layer {end}; stages must cover "
                f"layers 0..{num_layers - 1} once each, contiguously and in order."
            )
        end += n
    if end != num_layers:
        raise BadRequest(f"the stages hold {end} layers but the model has {num_layers}; make them cover every layer exactly once.")


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
    """The process's one side stream per device for warming up captures. A new ``torch.cuda.Stream``
    per capture comes from a pool of 32 and gets its own cuBLAS workspace on first use, which stays
    allocated: on an H100 every engine load left 64 MiB behind until the pool wrapped (about 1 GiB
    per process), and an engine's measured peak depended on how many engines the process had
    loaded before it."""
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
    warm-up and the capture stream) their library workspaces now: a matrix product on each. They
    stay for the life of the process, so the first engine loaded used to carry them in its memory
    peak and later ones not (97 MiB on an H100). Profiling primes before its first memory
    baseline, so that every engine's figure includes them once, as a serving worker's does."""
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


def _capture_graphs(dev: torch.device, keys: Sequence[int], run: Callable[[int], torch.Tensor], pool, *,
                    warmups: int = 1) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
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


class _StageGraphs:
    """One stage's decode step captured in CUDA graphs, one per key-length bucket.

    ``inp`` is the stage's static input (token id ``[1]`` or hidden ``[1, hidden]``); ``run(kv_len)``
    replays the bucket's graph and returns its static output. The position comes from ``stage.pos``.
    """

    def __init__(self, stage: Stage, inp: torch.Tensor, buckets: list[int], pool):
        self.stage = stage
        self.inp = inp
        with torch.cuda.device(stage.device):
            stage.pos.zero_()  # warm-up writes cache row 0, which every prefill rewrites
        self.graphs = _capture_graphs(stage.device, buckets, lambda kv_len: stage.decode(inp, kv_len=kv_len, masked=True),
                                      pool, warmups=2)

    def run(self, kv_len: int) -> torch.Tensor:
        graph, out = self.graphs[kv_len]
        graph.replay()
        return out


def _smallest_at_least(buckets: Sequence[int], n: int) -> int:
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


class _PrefillGraphs:
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
        self.graphs = _capture_graphs(dev, sorted(buckets, reverse=True), lambda b: stage.prefill(self.inp[:b], last=self.last), pool)

    def run(self, length: int) -> torch.Tensor:
        graph, out = self.graphs[length]
        graph.replay()
        return out


def _ids_to(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Token ids as a ``[T]`` long tensor on ``device``. On CUDA through pinned memory, without
    waiting: a copy from pageable memory synchronizes the host with the GPU, so the host could not
    queue the prefill while earlier work runs (and the profiler's device timing, which queues a
    pass behind a GPU spin, measured host-bound prefills as if they were device time)."""
    cpu = torch.tensor(list(ids), dtype=torch.long)
    if device.type != "cuda":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


FUSED_TOLERANCE = 0.1  # relative L2 between one layer's fused and reference updates (output less input)


def _fused_layer_gap(stage: Stage, n: int) -> float:
    """How far the fused decode of ``stage``'s first layer at position ``n - 1`` is from the reference
    decode, after a prefill of positions ``0..n-2`` (cache rows of layer 0, which every later prefill
    overwrites): the L2 of their difference relative to the reference's update (output less input),
    so that a wrong attention or MLP cannot hide behind the residual. The input is seeded, so TP
    ranks feed the same one. On a TP rank it runs without collectives (``TensorParallel.local``):
    both decodes see the same partial sums, and a rank that fails part-way cannot leave another
    waiting in a collective; only rank 0 adds the residual, so the others' update is the output."""
    layer = stage.layers[0]
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, stage.arch.hidden_size, generator=g).to(device=stage.device, dtype=stage.dtype)
    with stage.tp.local():
        cos, sin = stage.cos[: n - 1].unsqueeze(1), stage.sin[: n - 1].unsqueeze(1)
        layer.prefill(x[:-1], cos, sin, stage.cache, 0, None)
        pos = torch.full((1,), n - 1, dtype=torch.long, device=stage.device)
        one = stage.cos.index_select(0, pos).unsqueeze(1), stage.sin.index_select(0, pos).unsqueeze(1)
        ref = layer.decode(x[-1:], one[0], one[1], stage.cache, 0, pos, n, None).float()
        got = layer.decode_fused(x[-1:], stage.cos, stage.sin, stage.cache, 0, pos, stage.window or 0, stage.splits).float()
    update = (ref - x[-1:].float()).norm() if stage.tp.rank == 0 else ref.norm()
    return float((got - ref).norm() / update.clamp_min(1e-12))


class _TPControl:
    """The leader/follower protocol of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, rank: int, size: int, control_group, step_group, step_device: torch.device):
        self.rank = rank
        self.size = size
        self.control = control_group  # gloo: requests (pickled)
        self.step = step_group  # the last stage's group: per-step token and stop flag
        self.flag = torch.zeros(2, dtype=torch.long, device=step_device)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, message: tuple) -> tuple:
        """Leader: broadcast ``message``; follower: receive it (the argument is ignored)."""
        import torch.distributed as dist

        box = [message if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank calls it at the same point).
        Decisions each rank takes from its own checks (fused kernels, prefill graphs) must agree:
        a fused stage captures one decode graph where an unfused one captures a graph per bucket,
        and the collectives of their warm-ups would no longer pair up across the ranks."""
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.control)
        return bool(flag.item())

    def agree(self, token: torch.Tensor | None, stop: bool) -> tuple[int, bool]:
        """Every rank gets the leader's token and stop flag. The leader's ``token`` (a ``[1]`` long
        tensor on the last stage's device; followers pass None) goes into the flag on the device and
        is broadcast from there, so each step waits on the host once, for the broadcast flag, not
        also for the leader's own token first. ``self.token`` then holds the token on the device,
        for the next decode step to read without a copy from the host."""
        import torch.distributed as dist

        if self.leader:
            self.flag[:1].copy_(token.view(1))
            self.flag[1].fill_(int(stop))
        dist.broadcast(self.flag, src=0, group=self.step)
        token_id, flag = self.flag.tolist()
        return int(token_id), bool(flag)

    @property
    def token(self) -> torch.Tensor:
        """The last agreed token, a ``[1]`` view of the flag on the device."""
        return self.flag[:1]


def _init_tp_groups(stages: int, tp_rank: int, tp_size: int, backend_of_stage: list[str]):
    """One process group per stage (each binds to that stage's device) and a gloo control group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise BadRequest(
            f"tensor parallelism of degree {tp_size} needs torch.distributed initialized with one process per rank "
            "before Engine.load (the GPU agent's worker does this)."
        )
    if dist.get_world_size() != tp_size or dist.get_rank() != tp_rank:
        raise BadRequest(
            f"Engine.load got tp_rank={tp_rank}, tp_size={tp_size} but torch.distributed has rank {dist.get_rank()} "
            f"of {dist.get_world_size()}."
        )
    ranks = list(range(tp_size))
    groups = [dist.new_group(ranks, backend=backend) for backend in backend_of_stage]
    control = dist.new_group(ranks, backend="gloo")
    return groups, control


class Engine:
    """A model loaded as a pipeline of ``Stage``s, generating for one request at a time (batch size 1).

    Create it with ``Engine.load``. Not thread-safe: run one ``generate`` at a time.
    """

    def __init__(self, checkpoint: Checkpoint, stages: list[Stage], tokenizer: Tokenizer, context_tokens: int, seed: int,
                 *, cuda_graphs: bool = True, variant: dict[str, str] | None = None, tp: _TPControl | None = None,
                 prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS, prefill_graph_lengths: Sequence[int] | None = None):
        self.checkpoint = checkpoint
        self.stages = stages
        self._tokenizer = tokenizer
        self._context_tokens = context_tokens
        self.variant = dict(variant or {"weight_quant": "fp16", "kv_quant": "fp16", "pruning": "none"})
        self._tp = tp
        self._groups: list = []  # process groups this engine made (TP), destroyed by close()
        first, last = stages[0].device, stages[-1].device
        self._token = torch.zeros(1, dtype=torch.long, device=first)  # decode input buffer
        self._generator = torch.Generator(device=last).manual_seed(seed)  # for requests without a seed
        cuda_devices = sorted({s.device for s in stages if s.device.type == "cuda"}, key=str)
        if len(cuda_devices) == 1 and all(s.device.type == "cuda" for s in stages):
            self._timer: _PerfTimer | _CudaEventTimer = _CudaEventTimer(cuda_devices[0])
        else:
            self._timer = _PerfTimer(cuda_devices)
        self.fused_error = ""
        self.buckets = graph_buckets(context_tokens)
        self._graphs: list[_StageGraphs | None] = [None] * len(stages)
        self._prefill_graphs: list[_PrefillGraphs] = []  # one per stage, or none
        # A projection whose kernel's time grows with padded rows (int4's) keeps prefill eager.
        pads_cheaply = all(lin.pads_cheaply for s in stages for layer in s.unique_layers() for lin in layer.linears())
        self.prefill_buckets = prefill_buckets(context_tokens, prefill_graph_tokens) if cuda_graphs and pads_cheaply else []
        if prefill_graph_lengths is not None:  # profiling: only the buckets these prompt lengths use
            needed = {_smallest_at_least(self.prefill_buckets, n) for n in prefill_graph_lengths}
            self.prefill_buckets = [b for b in self.prefill_buckets if b in needed]
        self.prefill_graph_error = ""
        if any(s.can_fuse for s in stages):
            self._enable_fused()
        fused = [s.fused for s in stages if s.device.type == "cuda"]
        # Fused attention reads exactly the valid rows: one graph covers every position.
        if fused and all(fused):
            self.buckets = [context_tokens]
        if cuda_graphs:
            self._capture()

    def _enable_fused(self) -> None:
        """Turn on the fused Triton decode kernels where they apply, after checking them on this
        device, one layer at a time: each stage's first layer decodes one position after a short
        prefix with and without them, from the same input and cache, and the two outputs must
        agree (``_fused_layer_gap`` < ``FUSED_TOLERANCE``), else they stay off and ``fused_error`` says why.

        Per layer, not per model: every layer of a stage runs the same kernels on the same shapes,
        and a deep model's logits amplify the rounding differences of two correct kernels (a
        40-layer bfloat16 Llama-2-13B with random weights differed by more than 5% at the logits
        and silently decoded on the unfused path, 1.4-3x slower)."""
        n = min(8, self._context_tokens - 1)
        if n < 2:
            return
        problem = ""
        with _compute():
            for stage in self.stages:
                if not stage.can_fuse:
                    continue
                try:
                    rel = _fused_layer_gap(stage, n)
                    if not rel < FUSED_TOLERANCE:
                        problem = f"fused decode differs from the reference by {rel:.3g} (relative L2 of one layer's update)"
                except Exception as e:  # noqa: BLE001 - any failure of the optional kernels means: do not use them
                    problem = f"fused decode failed: {type(e).__name__}: {e}"
                if problem:
                    break
        if self._tp is not None and not self._tp.all_agree(not problem) and not problem:
            problem = "another tensor-parallel rank's check refused fused decode"
        for s in self.stages:
            s.fused = s.can_fuse and not problem
        self.fused_error = problem

    def _capture(self) -> None:
        """Capture the decode step of every CUDA stage that can be captured (see the module docstring)."""
        pools: dict[torch.device, object] = {}
        inp = self._token
        with _compute():
            for i, stage in enumerate(self.stages):
                if i > 0:
                    inp = torch.zeros(1, stage.arch.hidden_size, dtype=stage.dtype, device=stage.device)
                if stage.device.type != "cuda" or stage.is_moe:
                    continue
                pool = pools.setdefault(stage.device, torch.cuda.graph_pool_handle())
                self._graphs[i] = _StageGraphs(stage, inp, self.buckets, pool)
            if self.prefill_buckets and all(s.device.type == "cuda" and not s.is_moe for s in self.stages):
                try:
                    self._prefill_graphs = [_PrefillGraphs(s, self.prefill_buckets, pools[s.device]) for s in self.stages]
                except RuntimeError as e:  # a kernel that cannot be captured: prefill stays eager, and says why
                    self._prefill_graphs = []
                    self.prefill_graph_error = f"prefill capture failed: {e}"
                    for s in self.stages:
                        torch.cuda.synchronize(s.device)
                if self._tp is not None and not self._tp.all_agree(bool(self._prefill_graphs)) and self._prefill_graphs:
                    self._prefill_graphs = []  # every rank prefills the same way
                    self.prefill_graph_error = "prefill capture failed on another tensor-parallel rank"

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        stages: Sequence[tuple[str, int, int]],
        context_tokens: int,
        seed: int = 0,
        *,
        dtype: str | None = None,
        weight_quant: str = "fp16",
        kv_quant: str = "fp16",
        pruning: str = "none",
        cuda_graphs: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        replay_layers: int = 0,
        prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS,
        replay_distinct: bool = False,
        prefill_graph_lengths: Sequence[int] | None = None,
    ) -> "Engine":
        """Load ``model_dir`` as the given stages ``(device, first_layer, num_layers)``.

        Each stage reads only its own tensors, straight onto its device. Computation dtype: on CUDA
        the checkpoint's ``torch_dtype`` (bfloat16 stays bfloat16, anything else runs as float16;
        with int4 weights bfloat16, the activation type of the int4 kernel), on CPU float32;
        ``dtype`` ("float16", "bfloat16", "float32") overrides all of these. ``seed`` seeds the
        sampler of requests that bring no seed of their own.

        ``weight_quant`` ("fp16", "int8", "int4"), ``kv_quant`` ("fp16", "int8") and ``pruning``
        ("none", "2:4", "structured") pick the variant (see ``model.py`` and ``quant.py``);
        ``cuda_graphs`` captures the decode step of CUDA stages, and their prefill for prompts of up to
        ``prefill_graph_tokens`` tokens (0: eager prefill); ``tp_rank`` / ``tp_size`` load this
        process's share of a tensor-parallel deployment (see the module docstring).
        ``replay_layers`` (profiling only, one stage): run the checkpoint's layers cyclically as a
        model of that many layers (``Stage.replay``), for the timing of a deep model from a fingerprint;
        ``replay_distinct`` gives the replayed layers tensors of their own where they fit;
        ``prefill_graph_lengths`` (profiling) captures only the prefill graphs these prompt lengths use.

        Raises ``CheckpointError`` for a bad checkpoint, ``UnsupportedModel`` for an architecture or
        variant this engine cannot run, ``BadRequest`` for stages that do not cover every layer
        exactly once in order, unknown devices, a context longer than the model's, or a TP degree
        that does not divide the heads.
        """
        from . import CAPABILITIES

        ck = scan_checkpoint(model_dir)
        arch = ck.arch
        if arch.family not in CAPABILITIES["families"]:
            raise UnsupportedModel(
                f"the torch engine runs the {', '.join(CAPABILITIES['families'])} families, not {arch.family} "
                f"(model_type {arch.model_type!r})."
            )
        for knob, value in (("weight_quant", weight_quant), ("kv_quant", kv_quant), ("pruning", pruning), ("tp", tp_size)):
            if value not in CAPABILITIES[knob]:
                raise UnsupportedModel(f"the torch engine cannot run {knob}={value!r} (it supports {CAPABILITIES[knob]}).")
        if not 0 <= tp_rank < tp_size:
            raise BadRequest(f"tp_rank must be in 0..{tp_size - 1}, not {tp_rank}.")
        _check_stages(stages, arch.num_layers)
        if not isinstance(context_tokens, int) or context_tokens < 1:
            raise BadRequest(f"context_tokens must be a positive integer, not {context_tokens!r}.")
        if context_tokens > arch.max_position:
            raise BadRequest(
                f"context_tokens {context_tokens} exceeds the model's max_position_embeddings {arch.max_position}; "
                "deploy with a shorter context."
            )
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise BadRequest(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPE_NAMES)}.")
        devices = [_parse_device(s[0], i) for i, s in enumerate(stages)]
        tokenizer = load_tokenizer(model_dir, arch)
        tp_groups: list = [None] * len(stages)
        control = None
        if tp_size > 1:
            tp_groups, control = _init_tp_groups(len(stages), tp_rank, tp_size,
                                                 ["nccl" if d.type == "cuda" else "gloo" for d in devices])
        built = []
        stage_cls = arch_other.OtherStage if arch.family in arch_other.FAMILIES else Stage
        with torch.inference_mode():
            for i, (dev, (_, first, n)) in enumerate(zip(devices, stages)):
                if dtype is not None:
                    stage_dtype = _DTYPE_NAMES[dtype]
                elif dev.type == "cuda":
                    stage_dtype = torch.bfloat16 if weight_quant == "int4" else _CUDA_DTYPES.get(arch.torch_dtype, torch.float16)
                else:
                    stage_dtype = torch.float32
                if dev.type == "cuda":
                    torch.cuda.set_device(dev)
                try:
                    built.append(stage_cls(ck, dev, int(first), int(n), context_tokens=context_tokens, dtype=stage_dtype,
                                       weight_quant=weight_quant, kv_quant=kv_quant, pruning=pruning,
                                       tp=TensorParallel(tp_rank, tp_size, tp_groups[i])))
                except RuntimeError as e:
                    if "out of memory" in str(e).lower():
                        raise
                    raise UnsupportedModel(
                        f"stage {i} cannot be loaded as weight_quant={weight_quant}, pruning={pruning} on {dev}: {e}"
                    ) from None
            if replay_layers:
                if len(built) != 1:
                    raise BadRequest("replay_layers is for a model loaded as one stage.")
                built[0].replay(replay_layers, distinct=replay_distinct)
            for dev in devices:
                release_cached(dev)  # the last layer's and the head's load scratch
            tp = _TPControl(tp_rank, tp_size, control, tp_groups[-1], built[-1].device) if tp_size > 1 else None
            variant = {"weight_quant": weight_quant, "kv_quant": kv_quant, "pruning": pruning}
            engine = cls(ck, built, tokenizer, context_tokens, seed, cuda_graphs=cuda_graphs, variant=variant, tp=tp,
                         prefill_graph_tokens=prefill_graph_tokens, prefill_graph_lengths=prefill_graph_lengths)
            engine._groups = [g for g in [*tp_groups, control] if g is not None]
            return engine

    def close(self) -> None:
        """Drop every weight and cache so that the memory can be reused (the engine is unusable after).
        On a tensor-parallel leader this first releases the followers from ``follow()``."""
        if self._tp is not None and self._tp.leader and self.stages:
            self._tp.send(("stop",))
        self._graphs = []
        self._prefill_graphs = []
        self.stages = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release_groups(self) -> None:
        """Destroy the process groups this tensor-parallel engine made (its NCCL communicator holds
        buffers outside the allocator). After ``close``, on every rank alike: a communicator's
        teardown may wait for its peers. Profiling does this between engines; a serving worker
        exits instead."""
        groups, self._groups = self._groups, []
        if groups:
            import torch.distributed as dist

            for group in groups:
                dist.destroy_process_group(group)

    # -- properties ------------------------------------------------------------------------------

    @property
    def replayed(self) -> bool:
        """Whether a stage runs some of its layers more than once (``replay_layers``, profiling)."""
        return any(s.replayed_from for s in self.stages)

    @property
    def arch(self) -> ArchSpec:
        return self.checkpoint.arch

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def devices(self) -> list[str]:
        """Each stage's device, e.g. ``["cuda:0", "cuda:1"]``."""
        return [str(s.device) for s in self.stages]

    @property
    def timer(self) -> str:
        """How generate times itself: "cuda_events" or "perf_counter"."""
        return self._timer.name

    @property
    def tp_rank(self) -> int:
        return self._tp.rank if self._tp is not None else 0

    @property
    def tp_size(self) -> int:
        return self._tp.size if self._tp is not None else 1

    @property
    def fused_decode(self) -> list[bool]:
        """Per stage: whether decode runs the fused Triton kernels."""
        return [s.fused for s in self.stages]

    @property
    def graphs_captured(self) -> list[bool]:
        """Per stage: whether its decode step replays a CUDA graph."""
        return [g is not None for g in self._graphs]

    @property
    def graph_count(self) -> int:
        """CUDA graphs captured over all stages, decode and prefill."""
        return sum(len(g.graphs) for g in [*self._graphs, *self._prefill_graphs] if g is not None)

    @property
    def prefill_graph_tokens(self) -> int:
        """The longest prompt whose prefill replays CUDA graphs (0: every prefill runs eagerly)."""
        return self.prefill_buckets[-1] if self._prefill_graphs else 0

    def kernels(self) -> dict[str, int]:
        """How many projections of all stages run on each kernel (e.g. ``{"dense": 224}``)."""
        out: dict[str, int] = {}
        for s in self.stages:
            for k, n in s.kernels().items():
                out[k] = out.get(k, 0) + n
        return out

    def weight_bytes(self) -> int:
        """Bytes of weights held by all stages (as stored: quantized, sparse, this rank's share)."""
        return sum(s.weight_bytes for s in self.stages)

    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV caches of all stages (int8 caches include their scales)."""
        return sum(s.cache_bytes for s in self.stages)

    def memory_bytes(self) -> list[int]:
        """Memory per stage. CUDA: ``torch.cuda.memory_allocated`` of its device (shared among the
        stages on that device in proportion to their accounted bytes); CPU: accounted bytes of the
        stage's weights, KV cache and buffers."""
        out = []
        for s in self.stages:
            if s.device.type != "cuda":
                out.append(s.accounted_bytes)
                continue
            same = [o.accounted_bytes for o in self.stages if o.device == s.device]
            allocated = torch.cuda.memory_allocated(s.device)
            out.append(int(allocated * s.accounted_bytes / max(sum(same), 1)))
        return out

    # -- model passes ----------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            raise BadRequest("the prompt has no tokens; send at least one.")
        vocab = self.arch.vocab_size
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab:
            raise BadRequest(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary of {vocab} ids.")

    def _single_process(self, what: str) -> None:
        if self._tp is not None:
            raise BadRequest(f"{what} is not available on a tensor-parallel engine; use generate.")

    def prefill(self, ids: Sequence[int], *, all_positions: bool = False) -> torch.Tensor:
        """Run the prompt through every stage, filling the KV caches from position 0.

        Returns float32 logits on the last stage's device: ``[vocab]`` for the last position, or
        ``[len(ids), vocab]`` with ``all_positions``.
        """
        self._check_prompt("prefill", ids)
        with _compute():
            return self._prefill(ids, all_positions).clone()

    def _check_prompt(self, what: str, ids: Sequence[int]) -> None:
        """``what`` (a one-process call) may run a prefill of ``ids``."""
        self._single_process(what)
        self._check_ids(ids)
        if len(ids) > self._context_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context holds {self._context_tokens}; shorten it.")

    def _check_position(self, pos: int) -> None:
        if not 0 <= pos < self._context_tokens:
            raise BadRequest(f"position {pos} is outside the context of {self._context_tokens} tokens.")

    def _prefill(self, ids: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        """Logits ``[vocab]`` of the last position (or ``[T, vocab]`` with ``all_positions``); the
        last-position logits of a captured prefill are the graph's static output, valid until the
        next prefill."""
        length = self._prefill_length(len(ids)) if not all_positions else 0
        x = _ids_to(ids, self.stages[0].device)
        if not length:
            for stage in self.stages:
                x = stage.prefill(x, all_positions=all_positions)
            return x if all_positions else x[0]
        graphs = self._prefill_graphs
        graphs[0].inp[: len(ids)].copy_(x)
        graphs[-1].last.fill_(len(ids) - 1)
        for i, g in enumerate(graphs):
            x = g.run(length)
            if i + 1 < len(graphs):
                graphs[i + 1].inp[:length].copy_(x)
        return x[0]

    def _prefill_length(self, tokens: int) -> int:
        """The captured prompt length a prompt of ``tokens`` is padded to; 0 if it runs eagerly."""
        return _smallest_at_least(self.prefill_buckets, tokens) if self._prefill_graphs else 0

    def _bucket(self, kv_len: int) -> int:
        return _smallest_at_least(self.buckets, kv_len) or self.buckets[-1]

    def _decode(self, pos: int) -> torch.Tensor:
        """One decode step for the token in ``self._token`` at position ``pos``; logits ``[vocab]``."""
        for stage in self.stages:
            stage.pos.fill_(pos)
        x = self._token
        bucket = self._bucket(pos + 1)
        for stage, graphs in zip(self.stages, self._graphs):
            if graphs is None:
                x = stage.decode(x, kv_len=pos + 1, masked=stage.needs_mask(pos, pos + 1))
            else:
                if graphs.inp is not x:
                    graphs.inp.copy_(x)
                x = graphs.run(bucket)
        return x[0]

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Feed ``token`` at position ``pos`` (positions ``0..pos-1`` must be in the cache from an
        earlier prefill/decode); returns float32 logits ``[vocab]`` for the next position."""
        self._single_process("decode")
        self._check_ids([token])
        self._check_position(pos)
        with _compute():
            self._token.fill_(token)
            return self._decode(pos).clone()

    # -- profiling hooks (one process; ``profile`` times them) ---------------------------------------

    def queue_prefill(self, ids: Sequence[int]) -> None:
        """Profiling: queue one prefill of ``ids`` as ``generate`` runs it (captured when a graph
        holds its length), without sampling and without waiting for the device, so that passes
        queued back to back can be timed with CUDA events (``profile``)."""
        self._check_prompt("queue_prefill", ids)
        with _compute():
            self._prefill(ids)

    def queue_decode(self, pos: int) -> None:
        """Profiling: queue one decode step at ``pos`` (of the token last fed) as ``generate`` runs
        it, without sampling and without waiting for the device."""
        self._single_process("queue_decode")
        self._check_position(pos)
        with _compute():
            self._decode(pos)

    # -- generation ------------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
        """The next token as a ``[1]`` long tensor: argmax when ``temperature == 0``, else a draw from
        the temperature-scaled distribution restricted to the smallest set of tokens whose
        probability reaches ``top_p``."""
        if temperature == 0.0:
            return torch.argmax(logits).view(1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p >= 1.0:
            return torch.multinomial(probs, 1, generator=generator)
        # A stable sort: ties (common in half-precision logits) must keep one order for seeds to repeat.
        sorted_probs, order = torch.sort(probs, descending=True, stable=True)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return order[torch.multinomial(sorted_probs, 1, generator=generator)]

    def _check_request(self, ids: Sequence[int], max_tokens: int, temperature: float, top_p: float) -> None:
        self._check_ids(ids)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, not {max_tokens!r}.")
        if not temperature >= 0.0:
            raise BadRequest(f"temperature must be 0 (greedy) or positive, not {temperature!r}.")
        if not 0.0 < top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], not {top_p!r}.")
        if len(ids) + max_tokens > self._context_tokens:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, {len(ids) + max_tokens} in all, but "
                f"this deployment holds {self._context_tokens} tokens of context; shorten the prompt, lower max_tokens, "
                "or deploy with a larger context_tokens."
            )

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_tokens`` tokens after ``prompt_ids``.

        Greedy when ``temperature == 0``; otherwise temperature + top-p sampling from a generator
        seeded with ``seed`` (same seed, same tokens), or from the engine's own generator when
        ``seed`` is None. Stops at the tokenizer's eos (unless ``ignore_eos``; the eos token is
        included in ``tokens``), after ``max_tokens``, or when ``should_stop()`` returns True, which
        is asked before every decode step. ``on_token`` is called with each token id as soon as it
        is chosen. Raises ``PromptTooLong`` when ``len(prompt_ids) + max_tokens > context_tokens``.
        On a tensor-parallel engine only the leader (rank 0) calls this; see ``follow``.
        """
        ids = list(prompt_ids)
        self._check_request(ids, max_tokens, temperature, top_p)
        if self._tp is not None:
            if not self._tp.leader:
                raise BadRequest("only rank 0 of a tensor-parallel engine takes requests; the other ranks run follow().")
            if should_stop is not None and should_stop():
                return GenerationResult(tokens=[], finish_reason="cancelled", ttft_ms=0.0, prompt_tokens=len(ids),
                                        timer=self._timer.name)
            self._tp.send(("generate", ids, max_tokens, temperature, top_p, seed, ignore_eos))
        with _compute():
            return self._generate(ids, max_tokens, temperature, top_p, seed, ignore_eos, on_token, should_stop)

    def follow(self) -> int:
        """Tensor-parallel ranks other than 0: run every generation the leader broadcasts, in lockstep,
        until the leader closes. Returns how many generations were run."""
        done = 0
        while self.follow_one():
            done += 1
        return done

    def follow_one(self) -> bool:
        """Tensor-parallel ranks other than 0: take the leader's next message and run the generation
        it carries. Returns False when the message was the leader's close instead."""
        if self._tp is None or self._tp.leader:
            raise BadRequest("follow() is for the ranks other than 0 of a tensor-parallel engine.")
        message = self._tp.send(())
        if message[0] != "generate":
            return False
        _, ids, max_tokens, temperature, top_p, seed, ignore_eos = message
        with _compute():
            self._generate(ids, max_tokens, temperature, top_p, seed, ignore_eos, None, None)
        return True

    def _generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                  ignore_eos: bool, on_token: Callable[[int], None] | None,
                  should_stop: Callable[[], bool] | None) -> GenerationResult:
        generator = None
        if temperature > 0.0:
            generator = self._generator
            if seed is not None:
                generator = torch.Generator(device=self.stages[-1].device).manual_seed(seed)
        eos = None if ignore_eos else self._tokenizer.eos_id
        result = GenerationResult(tokens=[], finish_reason="length", ttft_ms=0.0, prompt_tokens=len(ids), timer=self._timer.name)
        tp = self._tp
        if tp is None and should_stop is not None and should_stop():
            result.finish_reason = "cancelled"
            return result

        timer = self._timer
        timer.start()
        # On a tensor-parallel engine only the leader samples; every rank takes its token (TPControl.agree).
        # From the second token on, the leader's cancellation decision rides along: asked after the
        # previous token was streamed, as without TP (the token of the step that found it cancelled is dropped).
        samples = tp is None or tp.leader
        logits = self._prefill(ids)
        token = self._sample(logits, temperature, top_p, generator) if samples else None
        cancel = False
        if tp is None:
            token_id = int(token.item())
        else:
            token_id, cancel = tp.agree(token, False)
        result.ttft_ms = timer.stop()

        pos = len(ids)
        while True:
            if cancel:
                result.finish_reason = "cancelled"
                break
            result.tokens.append(token_id)
            if on_token is not None:
                on_token(token_id)
            if eos is not None and token_id == eos:
                result.finish_reason = "stop"
                break
            if len(result.tokens) >= max_tokens:
                result.finish_reason = "length"
                break
            if tp is None and should_stop is not None and should_stop():
                result.finish_reason = "cancelled"
                break
            timer.start()
            self._token.copy_(token.view(1) if tp is None else tp.token)
            logits = self._decode(pos)
            token = self._sample(logits, temperature, top_p, generator) if samples else None
            if tp is None:
                token_id = int(token.item())
            else:
                token_id, cancel = tp.agree(token, should_stop is not None and should_stop())
            result.step_ms.append(timer.stop())
            pos += 1
        return result
