"""CUDA graphs of the batching engine's decode-only step, one per batch-size bucket.

A step in which every sequence decodes one token has fixed shapes once its batch is padded to a
bucket (1, 2, 4, ... up to ``max_batch``) and attention reads the pool through block tables
(``kernels.paged_decode_attention``), so it is captured once per bucket and replayed: the launch
cost of a few hundred kernels becomes one replay, which keeps batch 1 as fast as the batch-1
engine. Padding rows write their keys to the pool's scratch block and attend only to it. Steps that
carry prompt chunks run eagerly (``batch_forward.forward``). Buckets of at most ``FUSED_ROWS`` rows
project through the Triton GEMV with its fused RMSNorm, SwiGLU and residual (``DecoderLayer.step_fused``,
the batch-1 engine's kernels) where the engine turned them on; larger ones through cuBLAS.

The step's inputs go up in two copies from pinned host mirrors; a block table row is rewritten
only where its sequence changed or grew, so the host work per step stays small at large batches.
See docs/engine.md#continuous-batching.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from . import kernels
from .batch_forward import paged_attend, paged_kernel_runs
from .batch_plan import blocks_for
from .graphs import _capture_graphs
from .kv_pool import PagedKV
from .stage import Stage

# Rows up to which a captured step projects through the Triton GEMV (it reads each weight once per
# row, cuBLAS once per step); measured by bench/profile_decode.py (results/*-decode-profile).
FUSED_ROWS = 1


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, and ``max_batch``."""
    out = []
    b = 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def graphs_apply(stages: Sequence[Stage]) -> bool:
    """Whether the decode step can be captured: every stage on one CUDA device, dense MLPs (the MoE
    routing reads expert ids back to the host) and the paged kernel."""
    devices = {s.device for s in stages}
    return len(devices) == 1 and all(paged_kernel_runs(s) and not s.is_moe for s in stages)


class StepInputs:
    """The pinned host mirrors of a captured step's inputs: ``meta [4, n]`` (ids, positions, slots,
    attended lengths) and block tables ``[n, blocks]``; ``fill`` brings the first ``b`` rows up to a
    step, rewriting a table row only where its sequence changed or grew."""

    def __init__(self, n: int, blocks: int, scratch_block: int, block_size: int, pinned: bool):
        self.blocks = blocks
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.meta = torch.zeros(4, n, dtype=torch.long, pin_memory=pinned)
        self.meta[2], self.meta[3] = self.scratch_slot, 1  # padding: the scratch slot, attending over itself
        self.tables = torch.full((n, blocks), scratch_block, dtype=torch.int32, pin_memory=pinned)
        self._meta, self._tables = self.meta.numpy(), self.tables.numpy()
        self._row_key: list[Hashable | None] = [None] * n  # whose table each row holds ...
        self._row_len = [0] * n  # ... and how many of its blocks

    def fill(
        self,
        ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        tables: Sequence[Sequence[int]],
        keys: Sequence[Hashable] | None,
        b: int,
    ) -> None:
        """Rows ``0..len(ids)-1`` from the step, rows up to ``b`` padding (token 0 at position 0,
        writing to and attending over the scratch slot). ``keys`` name the sequences, whose tables
        only grow while they run; without them every row is rewritten."""
        n = len(ids)
        m = self._meta
        m[0, :n], m[1, :n], m[2, :n] = ids, positions, slots
        m[3, :n] = m[1, :n] + 1
        m[0, n:b], m[1, n:b], m[2, n:b], m[3, n:b] = 0, 0, self.scratch_slot, 1
        for i in range(b):
            key = keys[i] if keys is not None and i < n else None
            table = list(tables[i][: self.blocks]) if i < n else []
            if i >= n and self._row_key[i] is None and self._row_len[i] == 0:
                continue  # a padding row that already is one
            start = self._row_len[i] if key is not None and key == self._row_key[i] else 0
            if start > len(table):  # a known sequence's table never shrinks; rewrite to be safe
                start = 0
            if start == 0:
                self._tables[i, len(table) :] = self.scratch_block
            if len(table) > start:
                self._tables[i, start : len(table)] = table[start:]
            self._row_key[i], self._row_len[i] = key, len(table)


class DecodeStep:
    """The decode-only step over static buffers, and its CUDA graphs per bucket."""

    def __init__(
        self,
        stages: Sequence[Stage],
        pools: Sequence[PagedKV],
        max_batch: int,
        block_size: int,
        scratch_block: int,
        context: int,
    ):
        self.stages = list(stages)
        self.pools = list(pools)
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        dev = stages[0].device
        self.blocks = blocks_for(context, block_size)
        n = max_batch
        # ids, positions, slots and lengths (attended positions): one long row each, one copy per step.
        self.host = StepInputs(n, self.blocks, scratch_block, block_size, pinned=dev.type == "cuda")
        self.meta = self.host.meta.to(dev)
        self.ids, self.positions, self.slots, self.lens = self.meta.unbind(0)
        self.tables = self.host.tables.to(dev)
        self._copied: torch.cuda.Event | None = None  # the last step's uploads (the host mirrors are reused)
        self.fused_rows = FUSED_ROWS
        kv_heads = pools[0].k.shape[2]
        self.splits = {b: kernels.paged_splits(b, kv_heads, context) for b in self.buckets}
        pool = torch.cuda.graph_pool_handle()
        self.graphs = _capture_graphs(dev, sorted(self.buckets, reverse=True), self._forward, pool, warmups=2)

    def _forward(self, b: int) -> torch.Tensor:
        """The step for the first ``b`` rows of the static buffers; float32 logits ``[b, vocab]``."""
        x: torch.Tensor = self.ids[:b]
        positions, slots, tables, lens = self.positions[:b], self.slots[:b], self.tables[:b], self.lens[:b]
        for stage, pool in zip(self.stages, self.pools):
            h = stage._input(x)
            cos = stage.cos.index_select(0, positions).unsqueeze(1)
            sin = stage.sin.index_select(0, positions).unsqueeze(1)
            fused = b <= self.fused_rows and stage.fused
            for n, layer in enumerate(stage.layers):

                def attend(q, k, v, n=n, pool=pool, w=stage.window):
                    pool.write(n, slots, k, v)
                    return paged_attend(pool, n, q, tables, lens, self.block_size, w, self.splits[b])

                h = (layer.step_fused if fused else layer.step)(h, cos, sin, attend)
            x = stage._output(h)
        return x

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` sequences (0: none, run eagerly)."""
        return next((b for b in self.buckets if b >= n), 0)

    def run(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        keys: Sequence[Hashable] | None = None,
    ) -> torch.Tensor:
        """Replay the bucket of ``len(ids)`` decode tokens; their logits ``[len(ids), vocab]``.
        ``keys`` name the sequences (their tables only grow while they run), so that a row whose
        sequence is unchanged gets only its new blocks; without them every row is rewritten."""
        n = len(ids)
        b = self.bucket(n)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's uploads have left the mirrors
        self.host.fill(ids, positions, slots, tables, keys, b)
        self.meta.copy_(self.host.meta, non_blocking=True)
        self.tables[:b].copy_(self.host.tables[:b], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
