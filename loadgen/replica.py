"""A simulated replica that serves up to ``max_batch`` requests at once, by the live engine's rules
(docs/simulator.md#continuous-batching). Pure: no clock, no I/O; the event loop passes times in and
stretches each step for contention.

* Admission and step plans are the engine's own functions (``iserve.gpu_agent.engine.batch_plan``):
  FCFS into free slots while the KV pool holds each sequence's worst case (prompt + output tokens),
  then one decode token per running sequence and prompt chunks under ``step_tokens``.
* A step's time is ``iserve.fingerprint.estimator.batching.StepModel.step_ms``; a sequence's first
  token comes at the end of the step that computed its last prompt chunk, and it ends when it has
  all its output tokens.
* Its memory reservation includes its KV pool (:func:`pooled_map`), as the deployer's plans do.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from iserve.deployer.memory import kv_pool_tokens, with_kv_pool
from iserve.fingerprint.estimator.batching import StepModel, map_kv_bytes
from iserve.gpu_agent.engine.batch_plan import BLOCK_SIZE, STEP_TOKENS, Chunk, SeqState, admit, blocks_for, plan_step
from iserve.messages import ConfigurationMap

P = TypeVar("P")


@dataclass(eq=False)
class Seq(Generic[P]):
    """One request on the replica: ``joined`` is when it took a slot (its queueing ended)."""

    payload: P
    prompt: int
    output: int
    joined: float
    seq_id: str = ""
    computed: int = 0  # positions whose keys and values are in the pool
    generated: int = 0
    first_token: float = 0.0


class BatchReplica(Generic[P]):
    """The engine of one batched replica: ``submit`` sequences, then alternate ``begin`` (plan the next
    step, get its time) and ``end`` (apply it at the time it ended)."""

    def __init__(
        self,
        model: StepModel,
        *,
        max_batch: int,
        kv_tokens: int,
        block_size: int = BLOCK_SIZE,
        step_tokens: int = STEP_TOKENS,
    ):
        if max_batch < 1 or step_tokens <= max_batch:
            raise ValueError(f"need 1 <= max_batch < step_tokens, not {max_batch} and {step_tokens}")
        self.model = model
        self.max_batch = max_batch
        self.block_size = block_size
        self.step_tokens = step_tokens
        self.pool_blocks = blocks_for(kv_tokens, block_size)
        self.waiting: deque[Seq[P]] = deque()
        self.running: list[Seq[P]] = []
        self.chunks: list[Chunk] = []  # the step in flight
        self._ids = 0

    @property
    def busy(self) -> bool:
        """A step is in flight."""
        return bool(self.chunks)

    def fits(self, prompt: int, output: int) -> bool:
        """Whether the pool can ever hold this request (the engine refuses one that cannot)."""
        return blocks_for(prompt + output, self.block_size) <= self.pool_blocks

    def submit(self, seq: Seq[P]) -> None:
        self._ids += 1
        seq.seq_id = str(self._ids)
        self.waiting.append(seq)

    def begin(self) -> float:
        """Admit what fits, plan the next step and return its time in ms (0.0: nothing to run)."""
        reserved = sum(blocks_for(s.prompt + s.output, self.block_size) for s in self.running)
        n = admit(
            [s.prompt + s.output for s in self.waiting],
            len(self.running),
            reserved,
            max_batch=self.max_batch,
            pool_blocks=self.pool_blocks,
            block_size=self.block_size,
        )
        for _ in range(n):
            self.running.append(self.waiting.popleft())
        states = [SeqState(s.seq_id, s.prompt, s.computed) for s in self.running]
        self.chunks = plan_step(states, self.step_tokens) if states else []
        if not self.chunks:
            return 0.0
        decodes = [c for c in self.chunks if c.decode]
        prompts = [(c.start, c.tokens) for c in self.chunks if not c.decode]
        return self.model.step_ms(len(decodes), sum(c.start for c in decodes), prompts)

    def end(self, now: float) -> list[Seq[P]]:
        """The step in flight ended at ``now``: every chunk's tokens are computed; returns the
        sequences that now have all their output tokens (they leave the batch)."""
        by_id = {s.seq_id: s for s in self.running}
        done: list[Seq[P]] = []
        for c in self.chunks:
            s = by_id[c.seq_id]
            s.computed += c.tokens
            if c.samples:
                s.generated += 1
                if s.generated == 1:
                    s.first_token = now
                if s.generated >= s.output:
                    done.append(s)
        self.chunks = []
        if done:
            gone = set(map(id, done))
            self.running = [s for s in self.running if id(s) not in gone]
        return done


def pooled_map(cmap: ConfigurationMap, max_batch: int) -> ConfigurationMap:
    """``cmap`` with every estimate reserving the KV pool of a replica of ``max_batch`` (``max_batch``
    full contexts, the deployer's default pool, priced from the map); ``cmap`` itself at batch 1."""
    if max_batch == 1:
        return cmap
    ctx = cmap.context_tokens
    pool, kv_bytes = kv_pool_tokens(max_batch, 0, ctx), map_kv_bytes(cmap.estimates, ctx)
    return msgspec.structs.replace(cmap, estimates=[with_kv_pool(e, pool, ctx, kv_bytes) for e in cmap.estimates])


def serve_alone(
    model: StepModel, requests: list[tuple[float, int, int]], *, max_batch: int, kv_tokens: int
) -> list[float]:
    """One replica alone (no other deployment on its GPUs) serving ``(arrival_s, prompt, output)``
    requests in arrival order: each request's end-to-end latency in ms, in the same order. The
    simulator's event loop reduced to one replica; the reference the capacity model is checked against."""
    rep: BatchReplica[int] = BatchReplica(model, max_batch=max_batch, kv_tokens=kv_tokens)
    out = [0.0] * len(requests)
    now, i, step_end = 0.0, 0, math.inf
    while i < len(requests) or rep.busy or rep.waiting:
        arrival = requests[i][0] * 1000.0 if i < len(requests) else math.inf
        if arrival < step_end:
            now = arrival
            rep.submit(Seq(i, requests[i][1], requests[i][2], now))
            i += 1
        else:
            now = step_end
            for s in rep.end(now):
                out[s.payload] = now - requests[s.payload][0] * 1000.0
            step_end = math.inf
        if not rep.busy:
            ms = rep.begin()
            step_end = now + max(ms, 1e-9) if rep.busy else math.inf
    return out
