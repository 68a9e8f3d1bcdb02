"""Triton kernels of the batching engine's decode attention over the paged KV pool (``kv_pool``),
imported only where Triton can run (see ``kernels.paged_decode_attention``).

Split-K flash decoding, one program per (sequence, kv head, split): each reads its sequence's key
range through the block table, so no keys are gathered or padded. The block update, the slice
bounds and the merge of the slices (``attn_reduce_kernel``) are the batch-1 kernels' own.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_kernels import attend_block, split_range, store_partial


@triton.jit
def paged_attn_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    table_ptr,
    lens_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    sm_scale,
    stride_table,
    WINDOW,
    S,
    KVH: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    start, end = split_range(tl.load(lens_ptr + b), WINDOW, S, split, BLOCK_N)  # keys at positions 0..n-1
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q_row = (b * KVH + kvh) * G + g
    q = tl.load(q_ptr + q_row[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for blk in range(start, end, BLOCK_N):
        offs = blk + tl.arange(0, BLOCK_N)
        ok = offs < end
        page = tl.load(table_ptr + b * stride_table + offs // BS, mask=ok, other=0)
        slot = page.to(tl.int64) * BS + offs % BS
        row = slot * KVH + kvh  # the pool is [slots, kv_heads, D]
        k = tl.load(k_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0)
        v = tl.load(v_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0)
        m_i, l_i, acc = attend_block(q, k, v, ks_ptr + row, vs_ptr + row, ok, m_i, l_i, acc, sm_scale, QUANT)
    store_partial(m_ptr, l_ptr, acc_ptr, (b * KVH + kvh) * S + split, m_i, l_i, acc, GP, D)
