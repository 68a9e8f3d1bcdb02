"""Wrappers of the Triton kernels (``triton_kernels.py``) for the CUDA engine's decode step.

``gemv`` (int8 or 16-bit weights, with RMSNorm, SwiGLU and residual fused), ``rms_norm``,
``silu_mul``, ``rope_store`` and split-K ``decode_attention``; ``available()`` says whether Triton
can run here. Triton is imported lazily.

See docs/engine-internals.md#triton-decode-kernels.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton():
    import triton
    import triton.language as tl

    return triton, tl


def available() -> bool:
    """Whether the Triton kernels can run: ``triton`` imports, and a CUDA device (or the interpreter)."""
    return _importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@functools.cache
def _importable() -> bool:
    """Whether ``triton`` imports (asked once: a failed import is not cached by Python and costs a
    search of the path every time)."""
    try:
        _triton()
    except Exception:
        return False
    return True


@functools.cache
def _kernels():
    from . import triton_kernels as tk

    triton, _ = _triton()
    tuned = triton.autotune(configs=tk.GEMV_CONFIGS, key=["N", "K", "HAS_SCALE", "NORM", "SWIGLU"])(tk.gemv_kernel)
    return tk.gemv_kernel, tuned, triton


@functools.cache
def _decode_kernels():
    from . import triton_kernels as tk

    return tk.rms_norm_kernel, tk.silu_mul_kernel, tk.rope_store_kernel, tk.attn_partial_kernel, tk.attn_reduce_kernel


def attention_runs(device: torch.device, head_dim: int) -> bool:
    """Whether the split-K decode attention kernels (batch-1 and paged) run here: a CUDA device,
    Triton, and a power-of-two head size of at least 16."""
    return device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0 and available()


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x [M, H]`` (float32 statistics), times ``w``."""
    kernel = _decode_kernels()[0]
    x = x.contiguous()
    M, H = x.shape
    y = torch.empty_like(x)
    kernel[(M,)](x, w, y, H, eps, x.stride(0), y.stride(0), BLOCK=_pow2(H), num_warps=8 if H > 2048 else 4)
    return y


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` of shape ``[M, 2F]``; returns ``[M, F]``."""
    kernel = _decode_kernels()[1]
    x = x.contiguous()
    M, F2 = x.shape
    F = F2 // 2
    y = torch.empty(M, F, dtype=x.dtype, device=x.device)
    block = 1024
    kernel[(M, -(-F // block))](x, y, F, x.stride(0), y.stride(0), BLOCK=block)
    return y


def rope_store(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    """One token: rotate q and k of ``qkv [1, (heads + 2 kv_heads) * d]`` at position ``pos [1]`` (tables
    ``[context, d]``), store k and v at that row of ``k_cache, v_cache [kv_heads, context, d]`` (int8
    with per-row scales ``[kv_heads, context]`` when given); returns q ``[heads * d]``."""
    kernel = _decode_kernels()[2]
    qkv = qkv.contiguous()
    q = torch.empty(heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    quant = k_scale is not None
    ks = k_scale if k_scale is not None else k_cache
    vs = v_scale if quant else v_cache
    kernel[(heads + 2 * kv_heads,)](
        qkv,
        cos,
        sin,
        pos,
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        heads,
        kv_heads,
        k_cache.stride(0),
        ks.stride(0) if quant else 0,
        D=head_dim,
        QUANT=quant,
    )
    return q


def attention_splits(kv_heads: int, context: int, block_n: int = 64) -> int:
    """How many key slices decode attention uses: enough programs to fill the GPU."""
    return max(1, min(64, -(-256 // kv_heads), -(-context // block_n)))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    pos: torch.Tensor,
    window: int,
    splits: int,
) -> torch.Tensor:
    """Attention of one token's ``q [heads * d]`` over cache rows ``[0, pos]`` (the last ``window`` of
    them when ``window > 0``) of ``k_cache, v_cache [kv_heads, context, d]``; returns ``[1, heads * d]``."""
    partial = _decode_kernels()[3]
    kv_heads, _, d = k_cache.shape
    groups = q.numel() // (kv_heads * d)
    gp, m, norm, acc = _split_k_buffers(kv_heads, splits, groups, d, q.device)
    quant, ks, vs = _scales(k_cache, v_cache, k_scale, v_scale)
    partial[(kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        pos,
        m,
        norm,
        acc,
        d**-0.5,
        k_cache.stride(0),
        ks.stride(0) if quant else 0,
        window,
        splits,
        G=groups,
        GP=gp,
        D=d,
        BLOCK_N=64,
        QUANT=quant,
        num_warps=4,
    )
    return _merge_splits(m, norm, acc, groups, q.dtype).view(1, -1)


def _split_k_buffers(
    rows: int, splits: int, groups: int, d: int, device: torch.device
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The query rows a program takes (``groups`` padded to 16 or a power of two) and, for ``rows``
    kv-head groups, each key slice's running max and normaliser ``[rows, splits, gp]`` and
    accumulator ``[rows, splits, gp, d]`` (float32): what the partial kernels write."""
    gp = max(16, _pow2(groups))
    m = torch.empty(rows, splits, gp, dtype=torch.float32, device=device)
    norm = torch.empty_like(m)  # flash attention's (m, l): running max, normaliser
    acc = torch.empty(rows, splits, gp, d, dtype=torch.float32, device=device)
    return gp, m, norm, acc


def _scales(
    k: torch.Tensor, v: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Whether the cache is int8, and the scale tensors to pass (the cache itself as an unread
    placeholder when it is not)."""
    if k_scale is None or v_scale is None:
        return False, k, v
    return True, k_scale, v_scale


def _merge_splits(
    m: torch.Tensor, norm: torch.Tensor, acc: torch.Tensor, groups: int, dtype: torch.dtype
) -> torch.Tensor:
    """``attn_reduce_kernel`` over the partial kernels' slices: ``[rows, groups * d]`` in ``dtype``."""
    reduce = _decode_kernels()[4]
    rows, splits, gp, d = acc.shape
    out = torch.empty(rows, groups * d, dtype=dtype, device=acc.device)
    reduce[(rows, groups)](m, norm, acc, out, splits, G=groups, GP=gp, D=d, SP=_pow2(splits))
    return out


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    norm: tuple[torch.Tensor, float] | None = None,
    swiglu: bool = False,
    tune: bool = True,
) -> torch.Tensor:
    """``f(x) @ w[N, K].T`` (``* scale[N]``) (``+ residual [M, N]``), in ``x``'s dtype.

    ``f``: with ``norm = (weight, eps)`` RMSNorm of each row of ``x [M, K]``; with ``swiglu``
    ``silu(gate) * up`` of ``x = [gate | up]`` of shape ``[M, 2K]``; else the identity. ``w`` is int8
    (with ``scale``) or the same 16/32-bit dtype as ``x``. ``tune=False`` (always under the
    interpreter, which cannot time kernels) uses one fixed block shape.
    """
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    M = x.shape[0]
    N, K = w.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel, tuned, triton = _kernels()
    s = scale if scale is not None else w
    r = residual if residual is not None else y
    nw, eps = norm if norm is not None else (w, 0.0)
    args = (x, w, s, r, y, nw, N, K, eps, x.stride(0), w.stride(0), r.stride(0), y.stride(0))
    flags = dict(HAS_SCALE=scale is not None, HAS_RES=residual is not None, NORM=norm is not None, SWIGLU=swiglu)
    if tune and os.environ.get("TRITON_INTERPRET") != "1":
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M)](*args, **flags)
    else:
        kernel[(triton.cdiv(N, 16), M)](*args, **flags, BLOCK_N=16, BLOCK_K=64)
    return y


@functools.cache
def _int8_gemm_kernels():
    from . import triton_kernels as tk

    triton, _ = _triton()
    tuned = triton.autotune(configs=tk.INT8_GEMM_CONFIGS, key=["N", "K", "M_KEY", "HAS_RES"])(tk.int8_gemm_kernel)
    return tk.int8_gemm_kernel, tuned, triton


def int8_gemm(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor | None = None, *, tune: bool = True
) -> torch.Tensor:
    """``x @ (w * scale[:, None]).T (+ residual)`` for int8 ``w [N, K]`` and ``x [M, K]``, in ``x``'s
    dtype: the batched steps' int8 projections (a few to a few hundred rows), which read each weight
    tile once for a block of rows instead of once per row (``gemv``) or through a dequantized copy.
    ``tune=False`` (always under the interpreter) uses one fixed tile shape."""
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    kernel, tuned, triton = _int8_gemm_kernels()
    r = residual if residual is not None else y
    args = (x, w, scale, r, y, M, N, K, _pow2(M), x.stride(0), w.stride(0), r.stride(0), y.stride(0))
    if tune and os.environ.get("TRITON_INTERPRET") != "1":
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](
            *args, HAS_RES=residual is not None
        )
    else:
        kernel[(triton.cdiv(N, 64), triton.cdiv(M, 16))](
            *args, HAS_RES=residual is not None, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64
        )
    return y


@functools.cache
def _paged_kernel():
    from . import triton_paged

    return triton_paged.paged_attn_partial_kernel


def paged_splits(batch: int, kv_heads: int, context: int, block_n: int = 64) -> int:
    """How many key slices each sequence's decode attention uses: enough programs to fill the GPU."""
    return max(1, min(32, -(-512 // (batch * kv_heads)), -(-context // block_n)))


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    tables: torch.Tensor,
    lens: torch.Tensor,
    block_size: int,
    window: int,
    splits: int,
) -> torch.Tensor:
    """Attention of ``q [B, heads, d]`` (one token per sequence) over the first ``lens[b]`` positions
    of each sequence (the last ``window`` of them when ``window > 0``), read through its block table
    ``tables [B, blocks]`` from one layer's pool ``k_pool, v_pool [slots, kv_heads, d]`` (int8 with
    scales ``[slots, kv_heads]`` when given); returns ``[B, heads * d]``. Shapes are fixed by ``B``,
    so the call can be captured in a CUDA graph."""
    partial = _paged_kernel()
    B, heads, d = q.shape
    kv_heads = k_pool.shape[1]
    groups = heads // kv_heads
    gp, m, norm, acc = _split_k_buffers(B * kv_heads, splits, groups, d, q.device)
    quant, ks, vs = _scales(k_pool, v_pool, k_scale, v_scale)
    q = q.contiguous()
    partial[(B, kv_heads, splits)](
        q,
        k_pool,
        v_pool,
        ks,
        vs,
        tables,
        lens,
        m,
        norm,
        acc,
        d**-0.5,
        tables.stride(0),
        window,
        splits,
        KVH=kv_heads,
        G=groups,
        GP=gp,
        D=d,
        BS=block_size,
        BLOCK_N=64,
        QUANT=quant,
        num_warps=4,
    )
    # A (sequence, kv head) pair is one row of slices, as a kv head is for the batch-1 kernel.
    return _merge_splits(m, norm, acc, groups, q.dtype).view(B, heads * d)
