"""Timing the batching engine's decode step on a loaded engine: ``b`` sequences at a position, the
step a continuous-batching replica runs (see docs/profiling.md#batched-steps).

For every batch size of the protocol and two positions (its shortest and longest prompt), ``b``
sequences are prefilled together, then ``warmup`` decode steps run untimed and ``repeats`` timed:
the median wall time of ``BatchEngine.step`` (planning, the captured or eager pass, sampling and the
token read-back), at the mean position the timed steps fed. The fingerprint pair measured this way
gives a step's per-layer and other parts at each batch size, as the batch-1 decode does.
"""

from __future__ import annotations

import statistics

from iserve.gpu_agent.engine.batch import BatchEngine
from iserve.gpu_agent.engine.batch_plan import BLOCK_SIZE, blocks_for
from iserve.gpu_agent.engine.runner import Engine
from iserve.messages import BatchDecodeTiming

from .protocol import Protocol


def batch_positions(protocol: Protocol) -> list[int]:
    """The prompt lengths the batched steps start from: the protocol's shortest and longest."""
    return sorted({min(protocol.prompt_lengths), max(protocol.prompt_lengths)})


def time_batched(engine: Engine, protocol: Protocol, *, seed: int = 0) -> list[BatchDecodeTiming]:
    """The batched decode steps of ``engine`` at the protocol's batch sizes (empty when it has none).
    The engine's own cache and graphs are kept; the pool and its graphs are freed on return."""
    sizes = sorted(set(protocol.batch_sizes))
    if not sizes:
        return []
    positions = batch_positions(protocol)
    steps = protocol.warmup + protocol.repeats
    top = max(sizes)
    need = max(positions) + steps + 2
    if need > engine.context_tokens:
        positions = [p for p in positions if p + steps + 2 <= engine.context_tokens] or [1]
        need = max(positions) + steps + 2
    batch = BatchEngine(
        engine,
        max_batch=top,
        kv_tokens=top * blocks_for(need, BLOCK_SIZE) * BLOCK_SIZE,  # every sequence's worst case admitted
        step_tokens=top * max(positions) + top + 1,  # every prompt in one step: no sequence runs ahead
        release_static_cache=False,
    )
    vocab = engine.arch.vocab_size
    out: list[BatchDecodeTiming] = []
    for b in sizes:
        for p in positions:
            for i in range(b):
                ids = [(seed * 7919 + 131 * i + 17 * j) % (vocab - 1) + 1 for j in range(p)]
                batch.submit(f"t{b}-{p}-{i}", ids, max_tokens=steps + 2, ignore_eos=True)
            batch.step()  # every prompt, and each sequence's first token
            times, fed = [], []
            for k in range(steps):
                batch.step()
                st = batch.last_step
                if k >= protocol.warmup and st.decodes == b and not st.prefill_tokens:
                    times.append(st.seconds * 1e3)
                    fed.append(st.kv_read / b - 1)
            batch.abort_all()
            if times:
                out.append(
                    BatchDecodeTiming(batch=b, position=round(statistics.fmean(fed)), step_ms=statistics.median(times))
                )
    return out
