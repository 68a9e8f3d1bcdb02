"""The paged KV pool of the batching engine: fixed-size blocks of token slots shared by the running
sequences, each holding a block table (docs/engine.md#continuous-batching).

``BlockAllocator`` is the bookkeeping (pure Python, no torch); ``PagedKV`` is one stage's storage:
keys and values of its layers for every slot, 16-bit or int8 with one scale per (slot, head).
A sequence's token at position ``p`` lives in slot ``table[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

import torch

from iserve.errors import BadRequest

from .batch_plan import blocks_for


class BlockAllocator:
    """Hands out block ids ``0..blocks-1``; the lowest free ids first, so that tests can predict them."""

    def __init__(self, blocks: int, block_size: int):
        if blocks < 1 or block_size < 1:
            raise BadRequest(f"a KV pool needs at least one block of at least one token, not {blocks} x {block_size}.")
        self.blocks = blocks
        self.block_size = block_size
        self._free = list(range(blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.blocks - len(self._free)

    def grow(self, table: list[int], tokens: int) -> None:
        """Append blocks to ``table`` until it holds ``tokens`` slots. Raises ``RuntimeError`` when the
        pool is out of blocks: admission (``batch_plan.admit``) reserves every admitted sequence's
        worst case, so this is a bug, not a load condition."""
        need = blocks_for(tokens, self.block_size) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {need} blocks needed, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())

    def release(self, table: list[int]) -> None:
        """Return ``table``'s blocks to the pool and empty it."""
        self._free.extend(reversed(table))
        table.clear()


class PagedKV:
    """Keys and values of ``layers`` layers for ``slots`` token slots: ``k, v [layers, slots, kv_heads, d]``
    in the computation dtype, or int8 with ``k_scale, v_scale [layers, slots, kv_heads]``."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: str,
    ):
        self.dtype = dtype
        store = torch.int8 if quant == "int8" else dtype
        self.k = torch.zeros(layers, slots, kv_heads, head_dim, dtype=store, device=device)
        self.v = torch.zeros_like(self.k)
        self.k_scale = self.v_scale = None
        if quant == "int8":
            self.k_scale = torch.ones(layers, slots, kv_heads, dtype=dtype, device=device)
            self.v_scale = torch.ones_like(self.k_scale)

    @property
    def nbytes(self) -> int:
        tensors = [self.k, self.v] + [s for s in (self.k_scale, self.v_scale) if s is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def bytes_per_slot(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, quant: str) -> int:
        """Pool bytes per token slot (keys, values and int8 scales of every layer)."""
        elem = torch.empty((), dtype=dtype).element_size()
        if quant == "int8":
            return layers * 2 * kv_heads * (head_dim + elem)
        return layers * 2 * kv_heads * head_dim * elem

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [N, kv_heads, d]`` at ``slots [N]`` (long, on the pool's device)."""
        if self.k_scale is None:
            self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
            self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))
            return
        assert self.v_scale is not None
        for data, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            s = (x.abs().amax(dim=-1).float() / 127.0).clamp(min=1e-8)
            q = torch.round(x.float() / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
            data[layer].index_copy_(0, slots, q)
            scale[layer].index_copy_(0, slots, s.to(self.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (any shape ``S``), ``[*S, kv_heads, d]`` in the computation dtype."""
        flat = slots.reshape(-1)
        k = self.k[layer].index_select(0, flat)
        v = self.v[layer].index_select(0, flat)
        if self.k_scale is not None:
            assert self.v_scale is not None
            k = k.to(self.dtype) * self.k_scale[layer].index_select(0, flat).unsqueeze(-1)
            v = v.to(self.dtype) * self.v_scale[layer].index_select(0, flat).unsqueeze(-1)
        shape = (*slots.shape, *self.k.shape[2:])
        return k.view(shape), v.view(shape)
