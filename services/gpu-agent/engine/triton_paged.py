"""Triton kernels of the batching engine's decode attention over the paged KV pool (``kv_pool``),
imported only where Triton can run (see ``kernels.paged_decode_attention``).

Split-K flash decoding, one program per (sequence, kv head, split): each reads its sequence's key
range through the block table, so no keys are gathered or padded; a second kernel merges the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    n = tl.load(lens_ptr + b)  # keys at positions 0..n-1
    lo = n * 0
    if WINDOW > 0:
        lo = tl.maximum(n - WINDOW, 0)
    per = ((n - lo + S - 1) // S + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per
    end = tl.minimum(start + per, n)
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
        sc = tl.dot(q, tl.trans(k.to(q.dtype)))
        if QUANT:
            sc = sc * tl.load(ks_ptr + row, mask=ok, other=0.0).to(tl.float32)[None, :]
            v = v.to(tl.float32) * tl.load(vs_ptr + row, mask=ok, other=0.0).to(tl.float32)[:, None]
        sc = tl.where(ok[None, :], sc * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    base = (b * KVH + kvh) * S + split
    tl.store(m_ptr + base * GP + g, m_i)
    tl.store(l_ptr + base * GP + g, l_i)
    tl.store(acc_ptr + (base * GP + g)[:, None] * D + d[None, :], acc)


@triton.jit
def paged_attn_reduce_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    S,
    KVH: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    SP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.program_id(2)
    s = tl.arange(0, SP)
    ok = s < S
    rows = ((b * KVH + kvh) * S + s) * GP + g
    m = tl.load(m_ptr + rows, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=ok, other=0.0)  # noqa: E741 - flash attention's (m, l)
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + ((b * KVH + kvh) * G + g) * D + d, out.to(out_ptr.dtype.element_ty))
