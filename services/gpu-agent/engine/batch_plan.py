"""The batching engine's decisions, pure (no torch, no clock): which waiting sequences join the batch,
and which tokens of the running ones each step computes (docs/engine.md#continuous-batching).

* Admission is FCFS: the oldest waiting sequence joins while the batch has a free slot and the pool
  can hold its worst case (prompt + max_tokens); a sequence that does not fit blocks the ones behind
  it, so none overtakes it. Reserving the worst case means a running sequence never runs out of
  blocks: nothing is preempted or recomputed.
* A step runs one decode token of every sequence past its prompt, then prompt chunks of the others
  in admission order under the step's token budget, so a long prompt cannot stall running streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_SIZE = 16  # token slots per KV block
STEP_TOKENS = 512  # tokens one step computes at most (decodes first); must exceed max_batch


@dataclass(frozen=True)
class SeqState:
    """What the planner knows of a running sequence."""

    seq_id: str
    prompt_tokens: int
    computed: int  # positions whose keys and values are in the pool


@dataclass(frozen=True)
class Chunk:
    """Positions ``[start, start + tokens)`` of one sequence, computed in this step."""

    seq_id: str
    start: int
    tokens: int
    samples: bool  # whether the last position's logits choose the sequence's next token
    decode: bool = False  # one generated token fed back (else a chunk of the prompt)


def blocks_for(tokens: int, block_size: int) -> int:
    """How many blocks of ``block_size`` slots hold ``tokens`` tokens."""
    return -(-tokens // block_size)


def admit(
    waiting_need: Sequence[int],
    running: int,
    reserved_blocks: int,
    *,
    max_batch: int,
    pool_blocks: int,
    block_size: int,
) -> int:
    """How many sequences from the head of the waiting queue join now. ``waiting_need`` is each
    waiting sequence's worst-case token count (prompt + max_tokens), oldest first; ``reserved_blocks``
    is what the running sequences reserved."""
    n = 0
    for need in waiting_need:
        blocks = blocks_for(need, block_size)
        if running + n >= max_batch or reserved_blocks + blocks > pool_blocks:
            break
        reserved_blocks += blocks
        n += 1
    return n


def plan_step(running: Sequence[SeqState], step_tokens: int) -> list[Chunk]:
    """The chunks of one step, decodes first (in admission order), then prompt chunks.

    Every decoding sequence gets its token even past the budget (the engine keeps ``step_tokens``
    above ``max_batch``); prompts share what is left, oldest first, at least one token for the
    oldest prompt when nothing else runs.
    """
    chunks = [Chunk(s.seq_id, s.computed, 1, True, decode=True) for s in running if s.computed >= s.prompt_tokens]
    budget = step_tokens - len(chunks)
    if not chunks:
        budget = max(budget, 1)
    for s in running:
        left = s.prompt_tokens - s.computed
        if left <= 0 or budget <= 0:
            continue
        n = min(left, budget)
        chunks.append(Chunk(s.seq_id, s.computed, n, s.computed + n == s.prompt_tokens))
        budget -= n
    return chunks
