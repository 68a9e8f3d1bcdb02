"""CUDA graphs of the batching engine's decode-only step, one per batch-size bucket.

A step in which every sequence decodes one token has fixed shapes once its batch is padded to a
bucket (1, 2, 4, ... up to ``max_batch``) and attention reads the pool through block tables
(``kernels.paged_decode_attention``), so it is captured once per bucket and replayed: the launch
cost of a few hundred kernels becomes one replay, which keeps batch 1 as fast as the batch-1
engine. Padding rows write their keys to the pool's scratch block and attend only to it. Steps that
carry prompt chunks run eagerly (``batch_forward.forward``). See docs/engine.md#continuous-batching.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kernels
from .batch_forward import paged_attend, paged_kernel_runs
from .batch_plan import blocks_for
from .graphs import _capture_graphs
from .kv_pool import PagedKV
from .stage import Stage


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
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = batch_buckets(max_batch)
        dev = stages[0].device
        self.blocks = blocks_for(context, block_size)
        n = max_batch
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((n, self.blocks), scratch_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
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
            for n, layer in enumerate(stage.layers):

                def attend(q, k, v, n=n, pool=pool, w=stage.window):
                    pool.write(n, slots, k, v)
                    return paged_attend(pool, n, q, tables, lens, self.block_size, w, self.splits[b])

                h = layer.step(h, cos, sin, attend)
            x = stage._output(h)
        return x

    def bucket(self, n: int) -> int:
        """The smallest bucket holding ``n`` sequences (0: none, run eagerly)."""
        return next((b for b in self.buckets if b >= n), 0)

    def run(self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Replay the bucket of ``len(ids)`` decode tokens; their logits ``[len(ids), vocab]``."""
        n = len(ids)
        b = self.bucket(n)
        dev = self.ids.device
        pad = b - n
        self.ids[:b].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        self.slots[:b].copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        lens = [p + 1 for p in positions] + [1] * pad
        self.lens[:b].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        rows = [t[: self.blocks] + [self.scratch_block] * (self.blocks - len(t[: self.blocks])) for t in tables]
        rows += [[self.scratch_block] * self.blocks] * pad
        self.tables[:b].copy_(torch.tensor(rows, dtype=torch.int32).to(dev, non_blocking=True))
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]
