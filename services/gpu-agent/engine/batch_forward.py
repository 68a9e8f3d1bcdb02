"""One forward pass of the batching engine over the stages: the tokens of a step's chunks, each
sequence at its own positions, keys and values in the stages' paged pools (``kv_pool.PagedKV``).

Projections and MLPs run once over all the step's tokens (one matrix product per weight for the
whole batch); attention runs per group: every decode token at once over its sequence's slots
(padded to the longest, masked), and each prompt chunk over its sequence's slots so far.
See docs/engine.md#continuous-batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels
from .batch_plan import Chunk, blocks_for
from .kv_pool import PagedKV
from .stage import Stage


@dataclass
class _PrefillGroup:
    rows: slice  # the chunk's rows among the step's tokens
    slots: torch.Tensor  # [start + tokens]: the sequence's slots from position 0
    mask: torch.Tensor | None  # [tokens, start + tokens] boolean, None: plain causal from position 0
    fresh: bool  # the chunk starts at position 0: attend over its own k, v (no pool read)


@dataclass
class StepLayout:
    """Where every token of a step goes, on one device (built once per step and device)."""

    positions: torch.Tensor  # [N] each token's position
    slots: torch.Tensor  # [N] each token's pool slot
    decode_rows: torch.Tensor | None  # [B] rows of the decode tokens
    decode_tables: torch.Tensor | None  # [B, blocks] int32 block tables (padding: block 0, the scratch block)
    decode_lens: torch.Tensor | None  # [B] int32: positions each decode token attends over (its own included)
    decode_slots: torch.Tensor | None  # [B, L] each decode sequence's slots 0..L-1 (torch path only)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] which of them it attends to (torch path only)
    prefills: list[_PrefillGroup]
    sample_rows: torch.Tensor  # rows whose logits choose a token


def visible(q: torch.Tensor, k: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys (positions ``k``) each query (positions ``q``) attends to, broadcast: earlier or
    its own, and within the sliding window when the model has one."""
    seen = k <= q
    if window is not None:
        seen &= q - k < window
    return seen


def slot_of(table: Sequence[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def block_tables(tables: Sequence[Sequence[int]], blocks: int, device: torch.device) -> torch.Tensor:
    """``[len(tables), blocks]`` int32 on ``device``, each table cut or padded with block 0."""
    padded = [list(t[:blocks]) + [0] * (blocks - len(t[:blocks])) for t in tables]
    return torch.tensor(padded, dtype=torch.int32).to(device, non_blocking=True)


def slot_rows(tables: Sequence[Sequence[int]], length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """``[len(tables), length]`` slots of positions ``0..length-1`` of each block table, built on
    ``device`` from the tables (a sequence shorter than ``length`` reads block 0: the caller masks them)."""
    bt = block_tables(tables, blocks_for(length, block_size), device).long()
    offsets = torch.arange(block_size, device=device)
    return (bt.unsqueeze(-1) * block_size + offsets).view(len(tables), -1)[:, :length]


def layout(
    chunks: Sequence[Chunk],
    tables: dict[str, list[int]],
    block_size: int,
    window: int | None,
    device: torch.device,
    paged: bool,
) -> StepLayout:
    """The step's token positions, slots and attention groups on ``device``; ``paged``: decode
    attention runs the paged Triton kernel (block tables), else torch over gathered slots."""
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    decode_rows: list[int] = []
    decode_lens: list[int] = []
    decode_tables: list[list[int]] = []
    prefills: list[_PrefillGroup] = []
    row = 0
    for c in chunks:
        table = tables[c.seq_id]
        pos = list(range(c.start, c.start + c.tokens))
        positions += pos
        slots += [slot_of(table, p, block_size) for p in pos]
        if c.samples:
            sample_rows.append(row + c.tokens - 1)
        if c.decode:
            decode_rows.append(row)
            decode_lens.append(c.start + 1)
            decode_tables.append(table)
        else:
            end = c.start + c.tokens
            plain = c.start == 0 and (window is None or end <= window)
            mask = None
            if not plain:
                mask = visible(torch.arange(c.start, end).unsqueeze(1), torch.arange(end).unsqueeze(0), window)
            prefills.append(
                _PrefillGroup(
                    rows=slice(row, row + c.tokens),
                    slots=slot_rows([table], end, block_size, device)[0],
                    mask=None if mask is None else mask.to(device),
                    fresh=c.start == 0,
                )
            )
        row += c.tokens
    d_rows = d_tables = d_lens = d_slots = d_mask = None
    if decode_rows:
        length = max(decode_lens)
        d_rows = torch.tensor(decode_rows, device=device)
        if paged:
            d_tables = block_tables(decode_tables, blocks_for(length, block_size), device)
            d_lens = torch.tensor(decode_lens, dtype=torch.int32, device=device)
        else:
            d_slots = slot_rows(decode_tables, length, block_size, device)
            last = torch.tensor(decode_lens).unsqueeze(1) - 1
            valid = visible(last, torch.arange(length).unsqueeze(0), window)
            d_mask = valid.view(len(decode_rows), 1, 1, length).to(device)
    return StepLayout(
        positions=torch.tensor(positions, device=device),
        slots=torch.tensor(slots, device=device),
        decode_rows=d_rows,
        decode_tables=d_tables,
        decode_lens=d_lens,
        decode_slots=d_slots,
        decode_mask=d_mask,
        prefills=prefills,
        sample_rows=torch.tensor(sample_rows, device=device),
    )


def paged_attend(
    pool: PagedKV,
    layer: int,
    q: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    window: int | None,
    splits: int,
) -> torch.Tensor:
    """Decode attention of ``q [B, heads, d]`` through the block tables (``kernels.paged_decode_attention``)."""
    return kernels.paged_decode_attention(
        q,
        pool.k[layer],
        pool.v[layer],
        pool.k_scale[layer] if pool.k_scale is not None else None,
        pool.v_scale[layer] if pool.v_scale is not None else None,
        tables,
        lens,
        block_size,
        window or 0,
        splits,
    )


def _attend(
    lay: StepLayout,
    pool: PagedKV,
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    window: int | None,
) -> torch.Tensor:
    """Store ``k, v [N, kv_heads, d]`` and return attention ``[N, heads * d]`` for ``q [N, heads, d]``."""
    pool.write(layer, lay.slots, k, v)
    N, heads, d = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    out = q.new_empty(N, heads * d)
    if lay.decode_tables is not None and lay.decode_lens is not None and lay.decode_rows is not None:
        B, blocks = lay.decode_tables.shape
        splits = kernels.paged_splits(B, kv_heads, blocks * block_size)
        qd = q.index_select(0, lay.decode_rows)
        o = paged_attend(pool, layer, qd, lay.decode_tables, lay.decode_lens, block_size, window, splits)
        out.index_copy_(0, lay.decode_rows, o)
    elif lay.decode_rows is not None:
        assert lay.decode_slots is not None
        B, L = lay.decode_slots.shape
        keys, values = pool.gather(layer, lay.decode_slots)  # [B, L, kv_heads, d]
        # GQA without copying keys: the query heads of one kv head are that head's query rows.
        qd = q.index_select(0, lay.decode_rows).view(B, kv_heads, groups, d)
        o = F.scaled_dot_product_attention(
            qd, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=lay.decode_mask
        )  # [B, kv_heads, groups, d]
        out.index_copy_(0, lay.decode_rows, o.reshape(B, heads * d))
    for g in lay.prefills:
        qc = q[g.rows]  # [T, heads, d]
        if g.fresh and g.mask is None:
            kc, vc = k[g.rows], v[g.rows]
        else:
            kc, vc = pool.gather(layer, g.slots)  # [S, kv_heads, d]
            if g.fresh:  # the chunk's own keys as computed, not as stored (int8), like the batch-1 prefill
                kc, vc = torch.cat((kc[: -qc.shape[0]], k[g.rows])), torch.cat((vc[: -qc.shape[0]], v[g.rows]))
        kh, vh = kc.transpose(0, 1), vc.transpose(0, 1)  # [kv_heads, S, d]
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, dim=0), vh.repeat_interleave(groups, dim=0)
        o = F.scaled_dot_product_attention(
            qc.transpose(0, 1).unsqueeze(0),
            kh.unsqueeze(0),
            vh.unsqueeze(0),
            attn_mask=g.mask,
            is_causal=g.mask is None,
        )  # [1, heads, T, d]
        out[g.rows] = o[0].transpose(0, 1).reshape(-1, heads * d)
    return out


def paged_kernel_runs(stage: Stage) -> bool:
    """Whether decode attention on ``stage`` runs the paged Triton kernel (``kernels.attention_runs``)."""
    return kernels.attention_runs(stage.device, stage.arch.head_dim)


def forward(
    stages: Sequence[Stage],
    pools: Sequence[PagedKV],
    chunks: Sequence[Chunk],
    ids: list[int],
    tables: dict[str, list[int]],
    block_size: int,
) -> torch.Tensor:
    """Run the step's tokens ``ids`` (the chunks' tokens, concatenated) through every stage; float32
    logits ``[S, vocab]`` of the chunks that sample, in chunk order."""
    layouts: dict[torch.device, StepLayout] = {}
    x: torch.Tensor = torch.tensor(ids, dtype=torch.long)
    for stage, pool in zip(stages, pools):
        lay = layouts.get(stage.device)
        if lay is None:
            paged = paged_kernel_runs(stage)
            lay = layouts[stage.device] = layout(chunks, tables, block_size, stage.window, stage.device, paged)
        h = stage._input(x)
        cos = stage.cos.index_select(0, lay.positions).unsqueeze(1)
        sin = stage.sin.index_select(0, lay.positions).unsqueeze(1)
        for n, layer in enumerate(stage.layers):

            def attend(q, k, v, n=n, lay=lay, pool=pool, w=stage.window):
                return _attend(lay, pool, n, q, k, v, block_size, w)

            h = layer.step(h, cos, sin, attend)
        if stage.is_last:
            h = h.index_select(0, lay.sample_rows)
        x = stage._output(h)
    return x
