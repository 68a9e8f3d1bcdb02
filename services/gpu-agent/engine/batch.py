"""``BatchEngine``: continuous batching over a loaded ``Engine``'s stages.

Requests join and leave the running batch between steps; each step computes one token of every
decoding sequence and chunks of arriving prompts (``batch_plan``), over a paged KV pool
(``kv_pool``), and streams each sequence's new token. Typical use (the worker's engine thread)::

    batch = BatchEngine(engine, max_batch=32)
    batch.submit("r1", ids, max_tokens=64)        # any thread
    while batch.busy:
        for event in batch.step():                 # the engine thread
            send(event)

With tensor parallelism rank 0 holds the ``BatchEngine`` the worker talks to and broadcasts every
step (its chunks, token ids and block tables) to the other ranks, which run ``follow()``; only rank 0
admits, plans and samples. Pipeline stages run one after the other per step, without micro-batches.
See docs/engine.md#continuous-batching.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from iserve.errors import BadRequest, PromptTooLong

from .batch_forward import forward, slot_of
from .batch_graphs import DecodeStep, graphs_apply
from .batch_plan import BLOCK_SIZE, STEP_TOKENS, Chunk, SeqState, admit, blocks_for, plan_step
from .checks import check_request
from .kv_pool import BlockAllocator, PagedKV
from .runner import Engine, GenerationResult, _compute
from .sampling import sample

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Event:
    """What a step produced for one sequence: a token, and/or its end with the whole result."""

    seq_id: str
    token: int | None = None
    result: GenerationResult | None = None  # set when the sequence finished (tokens, reason, times)


@dataclass
class StepStats:
    """What the last step computed (benchmarks, metrics)."""

    decodes: int = 0  # sequences that decoded one token
    prefill_tokens: int = 0  # prompt tokens computed
    kv_read: int = 0  # positions the decode tokens attended over, summed
    seconds: float = 0.0  # wall time of the step, from planning to the tokens on the host


@dataclass
class _Seq:
    seq_id: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator | None
    eos: frozenset[int]  # ids that end it (empty: ignore_eos)
    submitted: float
    serial: int = 0  # unique per admitted sequence (ids may repeat): names its block-table row
    tokens: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # pool blocks
    computed: int = 0  # positions in the pool
    reserved: int = 0  # blocks reserved at admission (the worst case)
    last_token_at: float = 0.0
    ttft_ms: float = 0.0
    step_ms: list[float] = field(default_factory=list)

    def result(self, reason: FinishReason) -> GenerationResult:
        return GenerationResult(
            tokens=list(self.tokens),
            finish_reason=reason,
            ttft_ms=self.ttft_ms,
            step_ms=list(self.step_ms),
            prompt_tokens=len(self.prompt),
        )


class BatchEngine:
    """Serves many sequences at once on ``engine``'s stages (on a tensor-parallel engine: rank 0's,
    the other ranks run ``follow``).

    ``max_batch``: sequences running at once; ``kv_tokens``: token slots of the KV pool (0: enough
    for ``max_batch`` full contexts, so admission is never short of blocks); ``step_tokens``: the
    tokens one step computes at most, decodes first (must exceed ``max_batch``). The engine's own
    static KV cache and CUDA graphs are released: this engine keeps all keys and values in its pool.
    ``cuda_graphs``: capture the decode-only step per batch-size bucket where it can be
    (``batch_graphs``; ``graph_error`` says why not when capture failed).

    ``submit`` and ``cancel`` may be called from any thread; ``step`` from one thread at a time.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int,
        kv_tokens: int = 0,
        block_size: int = BLOCK_SIZE,
        step_tokens: int = STEP_TOKENS,
        release_static_cache: bool = True,
        cuda_graphs: bool = True,
    ):
        if max_batch < 1:
            raise BadRequest(f"max_batch must be at least 1, not {max_batch}.")
        if step_tokens <= max_batch:
            raise BadRequest(f"step_tokens ({step_tokens}) must exceed max_batch ({max_batch}).")
        self.engine = engine
        self.max_batch = max_batch
        self.block_size = block_size
        self.step_tokens = step_tokens
        context = engine.context_tokens
        tokens = kv_tokens or max_batch * context
        # One block more than the sequences get: block 0, the scratch block that padded rows of a
        # captured step write to (batch_graphs).
        self.allocator = BlockAllocator(blocks_for(tokens, block_size) + 1, block_size)
        self._scratch: list[int] = []
        self.allocator.grow(self._scratch, 1)
        if release_static_cache:
            engine.release_static_cache()
        slots = self.allocator.blocks * block_size
        quant = engine.variant["kv_quant"]
        self.pools = [
            PagedKV(len(s.layers), slots, s._kv_shape[0], engine.arch.head_dim, s.dtype, s.device, quant)
            for s in engine.stages
        ]
        self._lock = threading.Lock()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cancelled: set[str] = set()
        self._ready = threading.Event()  # set while there is work
        self._serials = itertools.count(1)
        self._sample_device = engine.stages[-1].device
        self._generator = torch.Generator(device=self._sample_device).manual_seed(0)
        self.last_step = StepStats()
        self.graph_error = ""
        self._graphs: DecodeStep | None = None
        self._tp = engine._tp
        can_capture = graphs_apply(engine.stages)
        if self._tp is not None:  # every rank captures the same buckets, or none does (their collectives pair up)
            can_capture = self._tp.all_agree(can_capture)
        if cuda_graphs and can_capture:
            try:
                with _compute():
                    self._graphs = DecodeStep(
                        engine.stages, self.pools, max_batch, block_size, self._scratch[0], context
                    )
            except RuntimeError as e:  # a kernel that cannot be captured: decode stays eager, and says why
                self.graph_error = f"decode capture failed: {e}"
                torch.cuda.synchronize(engine.stages[0].device)
            if self._tp is not None and not self._tp.all_agree(self._graphs is not None) and self._graphs is not None:
                self._graphs = None  # every rank replays, or none does
                self.graph_error = "decode capture failed on another tensor-parallel rank"

    # -- state -----------------------------------------------------------------------------------

    @property
    def pool_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools)

    def memory_bytes(self) -> list[int]:
        """``Engine.memory_bytes`` with the pool: on CUDA already in the allocator's count; on the CPU added."""
        return [
            m + (p.nbytes if s.device.type != "cuda" else 0)
            for m, p, s in zip(self.engine.memory_bytes(), self.pools, self.engine.stages)
        ]

    @property
    def blocks_total(self) -> int:
        """Pool blocks the sequences can hold (the scratch block excluded)."""
        return self.allocator.blocks - 1

    @property
    def blocks_used(self) -> int:
        return self.allocator.used - 1

    @property
    def graphs_captured(self) -> list[int]:
        """The batch sizes whose decode step replays a CUDA graph (empty: every step runs eagerly)."""
        return list(self._graphs.buckets) if self._graphs is not None else []

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running or self._waiting)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a request is waiting or running (or ``timeout`` seconds pass)."""
        return self._ready.wait(timeout)

    # -- requests (any thread) ---------------------------------------------------------------------

    def submit(
        self,
        seq_id: str,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> None:
        """Queue a sequence (FCFS). Raises ``BadRequest`` / ``PromptTooLong`` for a request that can
        never run here: bad ids or settings, longer than the context, or larger than the whole pool."""
        ids = list(prompt_ids)
        check_request(ids, max_tokens, temperature, top_p, self.engine.arch.vocab_size, self.engine.context_tokens)
        need = blocks_for(len(ids) + max_tokens, self.block_size)
        if need > self.blocks_total:
            raise PromptTooLong(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) needs {need * self.block_size} "
                f"KV slots but this replica's pool holds {self.blocks_total * self.block_size}; "
                "lower max_tokens or deploy with a larger kv_tokens."
            )
        generator = None
        if temperature > 0.0:
            generator = self._generator
            if seed is not None:
                generator = torch.Generator(device=self._sample_device).manual_seed(seed)
        seq = _Seq(
            seq_id=seq_id,
            prompt=ids,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            eos=frozenset() if ignore_eos else self.engine.eos_ids,
            submitted=time.perf_counter(),
        )
        with self._lock:
            self._waiting.append(seq)
            self._ready.set()

    def cancel(self, seq_id: str) -> None:
        """Stop a sequence at the next step; it ends with reason "cancelled" (unknown ids are ignored)."""
        with self._lock:
            self._cancelled.add(seq_id)

    # -- the engine thread -------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Drop cancelled sequences, admit waiting ones, compute one step and sample; the events of
        every sequence that produced a token or ended."""
        events = self._reap_cancelled()
        self._admit()
        states = [SeqState(s.seq_id, len(s.prompt), s.computed) for s in self._running]
        chunks = plan_step(states, self.step_tokens)
        if chunks:
            events += self._run(chunks)
        with self._lock:
            if not (self._running or self._waiting):
                self._ready.clear()
        return events

    def abort_all(self) -> list[Event]:
        """End every waiting and running sequence (after a failed step), releasing their blocks; their
        events, reason "cancelled", for the caller to turn into errors."""
        with self._lock:
            gone = list(self._waiting) + list(self._running)
            self._waiting.clear()
            self._cancelled.clear()
            self._ready.clear()
        for s in gone:
            self._finish(s)
        return [Event(s.seq_id, result=s.result("cancelled")) for s in gone]

    def _reap_cancelled(self) -> list[Event]:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            gone = [s for s in self._waiting if s.seq_id in cancelled]
            self._waiting = deque(s for s in self._waiting if s.seq_id not in cancelled)
        gone += [s for s in self._running if s.seq_id in cancelled]
        for s in gone:
            self._finish(s)
        return [Event(s.seq_id, result=s.result("cancelled")) for s in gone]

    def _admit(self) -> None:
        with self._lock:
            need = [len(s.prompt) + s.max_tokens for s in self._waiting]
            reserved = sum(s.reserved for s in self._running)
            n = admit(
                need,
                len(self._running),
                reserved,
                max_batch=self.max_batch,
                pool_blocks=self.blocks_total,
                block_size=self.block_size,
            )
            for _ in range(n):
                s = self._waiting.popleft()
                s.reserved = blocks_for(len(s.prompt) + s.max_tokens, self.block_size)
                s.serial = next(self._serials)
                self._running.append(s)

    def _finish(self, s: _Seq) -> None:
        self.allocator.release(s.table)
        if s in self._running:
            self._running.remove(s)

    def _run(self, chunks: list[Chunk]) -> list[Event]:
        t0 = time.perf_counter()
        by_id = {s.seq_id: s for s in self._running}
        ids: list[int] = []
        for c in chunks:
            s = by_id[c.seq_id]
            self.allocator.grow(s.table, c.start + c.tokens)
            ids += [s.tokens[-1]] if c.decode else s.prompt[c.start : c.start + c.tokens]
        tables = {c.seq_id: by_id[c.seq_id].table for c in chunks}
        with _compute():
            logits = self._compute_step(chunks, ids, tables, {c.seq_id: by_id[c.seq_id].serial for c in chunks})
            sampled = [c for c in chunks if c.samples]
            tokens = self._sample(logits, [by_id[c.seq_id] for c in sampled])
        now = time.perf_counter()
        decodes = [c for c in chunks if c.decode]
        self.last_step = StepStats(
            decodes=len(decodes),
            prefill_tokens=sum(c.tokens for c in chunks if not c.decode),
            kv_read=sum(c.start + 1 for c in decodes),
            seconds=now - t0,
        )
        events: list[Event] = []
        for c in chunks:
            by_id[c.seq_id].computed = c.start + c.tokens
        for c, token in zip(sampled, tokens):
            s = by_id[c.seq_id]
            if s.tokens:
                s.step_ms.append((now - s.last_token_at) * 1000.0)
            else:
                s.ttft_ms = (now - s.submitted) * 1000.0
            s.last_token_at = now
            s.tokens.append(token)
            reason: FinishReason | None = None
            if token in s.eos:
                reason = "stop"
            elif len(s.tokens) >= s.max_tokens:
                reason = "length"
            if reason is None:
                events.append(Event(s.seq_id, token=token))
            else:
                self._finish(s)
                events.append(Event(s.seq_id, token=token, result=s.result(reason)))
        return events

    def _compute_step(
        self, chunks: list[Chunk], ids: list[int], tables: dict[str, list[int]], serials: dict[str, int]
    ) -> torch.Tensor:
        """Logits of the step's sampling chunks: a captured decode step when one holds it, else the
        eager pass. On a tensor-parallel leader the step goes to the other ranks first (``follow``)."""
        graphs = self._graphs
        if graphs is not None and all(c.decode for c in chunks) and graphs.bucket(len(chunks)):
            args = (
                ids,
                [c.start for c in chunks],
                [slot_of(tables[c.seq_id], c.start, self.block_size) for c in chunks],
                [tables[c.seq_id] for c in chunks],
                [serials[c.seq_id] for c in chunks],
            )
            if self._tp is not None:
                self._tp.send(("batch-graph", *args))
            return graphs.run(*args)
        if self._tp is not None:
            self._tp.send(("batch-step", chunks, ids, tables))
        return forward(self.engine.stages, self.pools, chunks, ids, tables, self.block_size)

    def follow(self) -> int:
        """Tensor-parallel ranks other than 0: run every step the leader's ``BatchEngine`` broadcasts,
        in lockstep, until the leader's engine closes. Returns how many steps were run."""
        tp = self._tp
        if tp is None or tp.leader:
            raise BadRequest("follow() is for the ranks other than 0 of a tensor-parallel engine.")
        steps = 0
        while True:
            message = tp.send(())
            with _compute():
                if message[0] == "batch-graph":
                    assert self._graphs is not None  # every rank captured the same buckets
                    self._graphs.run(*message[1:])
                elif message[0] == "batch-step":
                    _, chunks, ids, tables = message
                    forward(self.engine.stages, self.pools, chunks, ids, tables, self.block_size)
                else:  # the leader's close
                    return steps
            steps += 1

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """One token per row of ``logits [S, vocab]``: greedy rows by one argmax, the others drawn
        with each sequence's generator; one read back to the host for all."""
        picks = torch.argmax(logits, dim=-1)
        for i, s in enumerate(seqs):
            if s.temperature > 0.0:
                picks[i] = sample(logits[i], s.temperature, s.top_p, s.generator)[0]
        return [int(t) for t in picks.tolist()]

    # -- convenience -------------------------------------------------------------------------------

    def run_until_idle(self) -> list[Event]:
        """Step until no sequence is waiting or running; every event, in order (tests, warm-up)."""
        events: list[Event] = []
        while self.busy:
            events += self.step()
        return events
