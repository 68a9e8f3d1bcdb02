"""The Triton kernels behind ``kernels.py`` (imported only where Triton can run; see that module)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gemv_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    r_ptr,
    y_ptr,
    nw_ptr,
    N,
    K,
    eps,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    HAS_SCALE: tl.constexpr,
    HAS_RES: tl.constexpr,
    NORM: tl.constexpr,
    SWIGLU: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y[m] = f(x[m]) @ w.T (* s) (+ r[m])``; ``f`` is RMSNorm with weight ``nw`` (NORM), or
    ``silu(x[:K]) * x[K:]`` of a ``[gate | up]`` row of width 2K (SWIGLU), or the identity."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    rstd = 1.0
    if NORM:
        sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            xv = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
            sq += xv * xv
        rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            x = x * rstd * tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        if SWIGLU:
            up = tl.load(x_ptr + m * stride_xm + K + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = x / (1.0 + tl.exp(-x)) * up
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_SCALE:
        out = out * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_RES:
        out = out + tl.load(r_ptr + m * stride_rm + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rn, out.to(y_ptr.dtype.element_ty), mask=n_ok)


# Block shapes the GEMV is auto-tuned over (per weight shape, on first use).
GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw)
    for bn, bk, nw in ((8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (16, 1024, 8), (32, 512, 8))
]


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, H, eps, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (x * r * w).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def silu_mul_kernel(x_ptr, y_ptr, F, stride_x, stride_y, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < F
    g = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + F + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, (g / (1.0 + tl.exp(-g)) * u).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def store_row(dst_ptr, sdst_ptr, x, QUANT: tl.constexpr):
    """Store one head's row ``x [D]`` (float32), as int8 with its scale when ``QUANT``."""
    if QUANT:
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-8)
        qv = tl.minimum(tl.maximum(tl.floor(x / scale + 0.5), -127.0), 127.0)
        tl.store(dst_ptr, qv.to(tl.int8))
        tl.store(sdst_ptr, scale.to(sdst_ptr.dtype.element_ty))
    else:
        tl.store(dst_ptr, x.to(dst_ptr.dtype.element_ty))


@triton.jit
def rope_store_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    H,
    KV,
    stride_kh,
    stride_sh,
    D: tl.constexpr,
    QUANT: tl.constexpr,
):
    i = tl.program_id(0)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, D)
    x = tl.load(qkv_ptr + i * D + d).to(tl.float32)
    if i < H + KV:  # q or k head: rotate (Hugging Face rotate_half; the sin table is signed)
        swapped = tl.load(qkv_ptr + i * D + (d + D // 2) % D).to(tl.float32)
        c = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        s = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        x = x * c + swapped * s
    if i < H:
        tl.store(q_ptr + i * D + d, x.to(q_ptr.dtype.element_ty))
    elif i < H + KV:
        head = i - H
        store_row(k_ptr + head * stride_kh + pos * D + d, ks_ptr + head * stride_sh + pos, x, QUANT)
    else:
        head = i - H - KV
        store_row(v_ptr + head * stride_kh + pos * D + d, vs_ptr + head * stride_sh + pos, x, QUANT)


@triton.jit
def split_range(n, WINDOW, S, split, BLOCK_N: tl.constexpr):
    """Key positions ``[start, end)`` of key slice ``split`` of ``S`` over the ``n`` keys (the last
    ``WINDOW`` of them when ``WINDOW > 0``), slices a multiple of ``BLOCK_N`` long."""
    lo = n * 0
    if WINDOW > 0:
        lo = tl.maximum(n - WINDOW, 0)
    per = ((n - lo + S - 1) // S + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per
    return start, tl.minimum(start + per, n)


@triton.jit
def attend_block(q, k, v, k_scales, v_scales, ok, m_i, l_i, acc, sm_scale, QUANT: tl.constexpr):
    """One block of keys ``k, v [BLOCK_N, D]`` (rows ``ok`` valid) into flash decoding's running max
    ``m_i``, normaliser ``l_i`` and accumulator ``acc`` of the ``q [GP, D]`` rows; ``k_scales`` and
    ``v_scales`` point at the block's int8 scales (read only with ``QUANT``)."""
    sc = tl.dot(q, tl.trans(k.to(q.dtype)))
    if QUANT:
        sc = sc * tl.load(k_scales, mask=ok, other=0.0).to(tl.float32)[None, :]
        v = v.to(tl.float32) * tl.load(v_scales, mask=ok, other=0.0).to(tl.float32)[:, None]
    sc = tl.where(ok[None, :], sc * sm_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    p = tl.exp(sc - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def store_partial(m_ptr, l_ptr, acc_ptr, base, m_i, l_i, acc, GP: tl.constexpr, D: tl.constexpr):
    """Key slice ``base``'s running max, normaliser and accumulator, for ``attn_reduce_kernel``."""
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    tl.store(m_ptr + base * GP + g, m_i)
    tl.store(l_ptr + base * GP + g, l_i)
    tl.store(acc_ptr + (base * GP + g)[:, None] * D + d[None, :], acc)


@triton.jit
def attn_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    ks_ptr,
    vs_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    sm_scale,
    stride_kh,
    stride_sh,
    WINDOW,
    S,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    start, end = split_range(tl.load(pos_ptr) + 1, WINDOW, S, split, BLOCK_N)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (kvh * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for b in range(start, end, BLOCK_N):
        offs = b + tl.arange(0, BLOCK_N)
        ok = offs < end
        k = tl.load(k_ptr + kvh * stride_kh + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0)
        v = tl.load(v_ptr + kvh * stride_kh + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0)
        scales = kvh * stride_sh + offs
        m_i, l_i, acc = attend_block(q, k, v, ks_ptr + scales, vs_ptr + scales, ok, m_i, l_i, acc, sm_scale, QUANT)
    store_partial(m_ptr, l_ptr, acc_ptr, kvh * S + split, m_i, l_i, acc, GP, D)


@triton.jit
def attn_reduce_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, S, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr
):
    """Merge the ``S`` key slices of each (query head group ``program_id(0)``, group row
    ``program_id(1)``); the paged kernel's (sequence, kv head) pairs are such groups too."""
    kvh = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.arange(0, SP)
    ok = s < S
    rows = (kvh * S + s) * GP + g
    m = tl.load(m_ptr + rows, mask=ok, other=float("-inf"))
    l = tl.load(l_ptr + rows, mask=ok, other=0.0)  # noqa: E741 - flash attention's (m, l)
    top = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - top))
    d = tl.arange(0, D)
    acc = tl.load(acc_ptr + rows[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + (kvh * G + g) * D + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def int8_gemm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    r_ptr,
    y_ptr,
    M,
    N,
    K,
    M_KEY,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``y = x @ (w * s[:, None]).T (+ r)`` for int8 ``w [N, K]``, 16-bit ``x [M, K]``: each tile of
    ``w`` is read once for ``BLOCK_M`` rows and widened in registers (no dequantized copy in memory).
    ``M_KEY`` (M rounded up to a power of two) only keys the autotuner."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    out = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if HAS_RES:
        out += tl.load(r_ptr + rm[:, None] * stride_rm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty), mask=ok)


# Tile shapes the int8 GEMM is auto-tuned over (per weight shape and power-of-two row count).
INT8_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=nw, num_stages=ns)
    for bm, bn, bk, nw, ns in (
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 64, 128, 4, 3),
        (64, 128, 64, 8, 3),
        (128, 128, 64, 8, 3),
    )
]
