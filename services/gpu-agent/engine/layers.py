"""Llama-family and Mixtral layers: RoPE, RMSNorm, the weight format, dense and MoE MLPs, the decoder block.

Hugging Face's layout and math, with q/k/v and gate/up fused; see docs/engine-internals.md#layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from iserve.errors import UnsupportedModel
from iserve.messages import ArchSpec

from . import kernels
from .kv_cache import KVCache
from .quant import Linear, int8_row_scales, make_linear
from .tp import TensorParallel

# q [N, heads, d], k and v [N, kv_heads, d] -> attention [N, heads * d]; see DecoderLayer.step.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------------
# rotary position embeddings and norms


def rope_inv_freq(arch: ArchSpec) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float32, CPU), after the config's ``rope_scaling``."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        # Position interpolation: position p behaves like p / factor.
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend smoothly in between.
        factor = float(scaling["factor"])
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_len / low_ff
        high_freq_wavelen = old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModel(
        f"rope_scaling type {kind!r} is not supported by the torch engine (supported: default, linear, llama3); "
        "use a checkpoint without it or another engine."
    )


def rope_tables(
    arch: ArchSpec, positions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and signed ``sin`` tables ``[positions, head_dim]`` for ``apply_rope``.

    Hugging Face's ``rotate_half`` form is ``x * cos + cat(-x2, x1) * sin`` with ``x = (x1, x2)``; the
    sign is folded into the table (``sin`` is ``(-s, s)``) so that applying it is one ``cat`` and
    two arithmetic kernels.
    """
    inv_freq = rope_inv_freq(arch)
    t = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by the tables of ``rope_tables``, sliced to ``[T, 1, head_dim]``."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (one fused op; statistics in float32 for half inputs)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# ---------------------------------------------------------------------------------------------------
# layers


class LayerFormat:
    """How a layer's projections are stored: weight quantization, 2:4 sparsity, dtype."""

    def __init__(self, weight_quant: str, sparse_24: bool, dtype: torch.dtype):
        self.weight_quant = weight_quant
        self.sparse_24 = sparse_24
        self.dtype = dtype

    def linear(self, w: torch.Tensor) -> Linear:
        return make_linear(w, self.weight_quant, self.sparse_24, self.dtype)

    def row_parallel(self, w: torch.Tensor, cols: slice, tp: TensorParallel) -> Linear:
        """This rank's columns ``cols`` of ``w``; int8 keeps the whole rows' scales, so that the stored
        values do not depend on the TP degree (int4 groups and 2:4 groups do not cross shard
        boundaries that are multiples of 128 and 4)."""
        scale = int8_row_scales(w, self.sparse_24) if self.weight_quant == "int8" and tp.size > 1 else None
        return make_linear(w[:, cols], self.weight_quant, self.sparse_24, self.dtype, scale)


class DenseMLP:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, with gate and up fused into one matrix."""

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        cols: slice,
        fmt: LayerFormat,
        tp: TensorParallel,
    ):
        """``gate``, ``up`` and ``down`` are whole; this rank keeps FFN channels ``cols``."""
        self.gate_up = fmt.linear(torch.cat((gate[cols], up[cols])))
        self.down = fmt.row_parallel(down, cols, tp)

    def linears(self) -> list[Linear]:
        return [self.gate_up, self.down]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)``, the input of the down projection."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return F.silu(gate) * up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.hidden(x))


class MoEMLP:
    """Mixtral's sparse MLP: each token goes to its top-k experts, outputs weighted by the router."""

    def __init__(
        self,
        arch: ArchSpec,
        router: torch.Tensor,
        experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        cols: slice,
        fmt: LayerFormat,
        tp: TensorParallel,
    ):
        self.top_k = arch.experts_per_token
        self.w_router = router
        self.experts = [DenseMLP(w1, w3, w2, cols, fmt, tp) for w1, w3, w2 in experts]  # w1 = gate, w3 = up

    def linears(self) -> list[Linear]:
        return [lin for e in self.experts for lin in e.linears()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.w_router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if x.shape[0] == 1:
            # Decode: one token, k experts; reading the k ids back is cheaper than any masking.
            out: torch.Tensor | None = None
            for j, e in enumerate(chosen[0].tolist()):
                y = self.experts[e](x) * weights[0, j]
                out = y if out is None else out + y
            assert out is not None  # top_k >= 1
            return out
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot].unsqueeze(-1))
        return out


class DecoderLayer:
    """One transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``, on one TP rank.

    q, k and v projections are fused into one matrix (and bias) so that each attention costs two
    matrix products. ``t`` holds the layer's (pruned) tensors by Hugging Face name; this rank keeps
    its slice of them. Masks (causal, sliding window) are built by the ``Stage`` once for all layers.
    """

    def __init__(self, arch: ArchSpec, t: dict[str, torch.Tensor], fmt: LayerFormat, tp: TensorParallel):
        self.eps = arch.rms_norm_eps
        self.tp = tp
        d = arch.head_dim
        heads = t["self_attn.q_proj.weight"].shape[0] // d
        kv_heads = t["self_attn.k_proj.weight"].shape[0] // d
        q0, self.heads = tp.split(heads, "the number of attention heads")
        k0, self.kv_heads = tp.split(kv_heads, "the number of KV heads")
        self.head_dim = d
        self.groups = self.heads // self.kv_heads
        self.q_size = self.heads * d
        self.kv_size = self.kv_heads * d
        qs, ks = slice(q0 * d, (q0 + self.heads) * d), slice(k0 * d, (k0 + self.kv_heads) * d)
        self.ln_attn = t["input_layernorm.weight"]
        self.ln_mlp = t["post_attention_layernorm.weight"]
        self.qkv = fmt.linear(
            torch.cat(
                (t["self_attn.q_proj.weight"][qs], t["self_attn.k_proj.weight"][ks], t["self_attn.v_proj.weight"][ks])
            )
        )
        self.b_qkv = (
            torch.cat((t["self_attn.q_proj.bias"][qs], t["self_attn.k_proj.bias"][ks], t["self_attn.v_proj.bias"][ks]))
            if arch.attention_bias
            else None
        )
        self.o = fmt.row_parallel(t["self_attn.o_proj.weight"], qs, tp)
        if arch.family == "mixtral":
            p = "block_sparse_moe.experts."
            f0, fn = tp.split(t[p + "0.w1.weight"].shape[0], "the FFN size")
            experts = [
                (t[f"{p}{e}.w1.weight"], t[f"{p}{e}.w3.weight"], t[f"{p}{e}.w2.weight"])
                for e in range(arch.num_experts)
            ]
            self.mlp: DenseMLP | MoEMLP = MoEMLP(
                arch, t["block_sparse_moe.gate.weight"], experts, slice(f0, f0 + fn), fmt, tp
            )
        else:
            f0, fn = tp.split(t["mlp.gate_proj.weight"].shape[0], "the FFN size")
            self.mlp = DenseMLP(
                t["mlp.gate_proj.weight"],
                t["mlp.up_proj.weight"],
                t["mlp.down_proj.weight"],
                slice(f0, f0 + fn),
                fmt,
                tp,
            )

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o] + self.mlp.linears()

    def tensors(self) -> list[torch.Tensor]:
        own = [self.ln_attn, self.ln_mlp] + ([self.b_qkv] if self.b_qkv is not None else [])
        if isinstance(self.mlp, MoEMLP):
            own.append(self.mlp.w_router)
        return own + [x for lin in self.linears() for x in lin.tensors()]

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, fused: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate: q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``; ``fused``: the
        projection through ``_project`` (the Triton GEMV with the RMSNorm fused, where it runs).

        q and k are adjacent in the fused projection, so one RoPE application rotates both.
        """
        T = x.shape[0]
        if fused:
            qkv = self._project(self.qkv, x, norm=self.ln_attn)
        else:
            qkv = self.qkv(rms_norm(x, self.ln_attn, self.eps))
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        qk = apply_rope(
            qkv[:, : self.q_size + self.kv_size].view(T, self.heads + self.kv_heads, self.head_dim), cos, sin
        )
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.kv_heads, self.head_dim)
        return qk[:, : self.heads], qk[:, self.heads :], v

    def _residual(self, x: torch.Tensor, lin: Linear, h: torch.Tensor) -> torch.Tensor:
        """``x + lin(h)`` summed over the TP ranks (row-parallel ``lin``: rank 0 adds the residual)."""
        out = lin.add_to(x, h) if self.tp.rank == 0 else lin(h)
        return self.tp.all_reduce(out)

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and MLP, each added to the residual stream."""
        x = self._residual(x, self.o, attn)
        h = rms_norm(x, self.ln_mlp, self.eps)
        if isinstance(self.mlp, DenseMLP):
            return self._residual(x, self.mlp.down, self.mlp.hidden(h))
        y = self.mlp(h)
        return self.tp.all_reduce(x + y if self.tp.rank == 0 else y)

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The batching engine's pass over ``x [N, hidden]`` (tokens of several sequences, each at its
        own position; ``cos``/``sin`` ``[N, 1, d]``): ``attend(q, k, v)`` stores k, v in the pool and
        returns attention ``[N, heads * d]`` (``batch.BatchEngine``)."""
        q, k, v = self._qkv(x, cos, sin)
        return self._finish(x, attend(q, k, v))

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [T, hidden]`` at positions ``0..T-1``; fills cache rows ``0..T-1`` of ``layer``.

        ``mask`` is None for plain causal attention, or a boolean ``[T, T]`` (sliding window).
        """
        T = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k = k.transpose(0, 1)  # [kv_heads, T, d]
        v = v.transpose(0, 1)
        cache.write_prefix(layer, k, v)
        if self.groups > 1:
            # GQA: kv head j serves query heads j*groups .. j*groups + groups-1 (Hugging Face's repeat_kv).
            k = k.repeat_interleave(self.groups, dim=0)
            v = v.repeat_interleave(self.groups, dim=0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
        )  # [1, heads, T, d]
        return self._finish(x, out[0].transpose(0, 1).reshape(T, self.q_size))

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        pos: torch.Tensor,
        kv_len: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [1, hidden]`` at position ``pos`` (device tensor ``[1]``); attends over cache rows ``[0, kv_len)``
        under ``mask`` (boolean, broadcast over heads; None: all ``kv_len`` rows).

        GQA without copying the cache: the ``groups`` query heads that share a kv head are laid out
        as that head's query rows, ``q [1, kv_heads, groups, d]`` against ``k [1, kv_heads, kv_len, d]``.
        """
        q, k, v = self._qkv(x, cos, sin)
        cache.write_at(layer, pos, k.transpose(0, 1), v.transpose(0, 1))
        keys, values = cache.read(layer, kv_len)
        q = q.view(1, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask)
        return self._finish(x, out.reshape(1, self.q_size))

    def decode_fused(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        pos: torch.Tensor,
        window: int,
        splits: int,
    ) -> torch.Tensor:
        """``decode`` with the Triton kernels of ``kernels.py`` (CUDA, dense MLP): each projection
        whose format the Triton GEMV runs (fp16/bf16, int8) applies its RMSNorm or SwiGLU to its input
        and adds the residual itself; RoPE with the cache write and the split-K attention over rows
        ``[0, pos]`` are one kernel each. Other formats (int4, 2:4) run their own kernels with a
        separate RMSNorm / SwiGLU kernel. ``cos``/``sin`` are the whole tables ``[context, d]``;
        ``window`` 0 means no sliding window."""
        qkv = self._project(self.qkv, x, norm=self.ln_attn)
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        k_cache, v_cache, k_scale, v_scale = cache.planes(layer)
        q = kernels.rope_store(
            qkv, cos, sin, pos, self.heads, self.kv_heads, self.head_dim, k_cache, v_cache, k_scale, v_scale
        )
        attn = kernels.decode_attention(q, k_cache, v_cache, k_scale, v_scale, pos, window, splits)
        return self._finish_fused(x, attn)

    def step_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """``step`` with ``decode_fused``'s projections (the Triton GEMV with RMSNorm, SwiGLU and the
        residual fused, where the format runs it): the batching engine's captured decode steps of a
        few rows (``batch_graphs.FUSED_ROWS``), where the GEMV reads a weight once per row."""
        q, k, v = self._qkv(x, cos, sin, fused=True)
        return self._finish_fused(x, attend(q, k, v))

    def _finish_fused(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``_finish`` through ``_project``: output projection and MLP added to the residual stream."""
        x = self.tp.all_reduce(self._project(self.o, attn, residual=x if self.tp.rank == 0 else None))
        mlp = self.mlp
        assert isinstance(mlp, DenseMLP)  # the fused kernels run dense MLPs only (Stage.can_fuse)
        gate_up = self._project(mlp.gate_up, x, norm=self.ln_mlp)
        return self.tp.all_reduce(
            self._project(mlp.down, gate_up, residual=x if self.tp.rank == 0 else None, swiglu=True)
        )

    def _project(
        self,
        lin: Linear,
        x: torch.Tensor,
        *,
        norm: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        swiglu: bool = False,
    ) -> torch.Tensor:
        """``lin(f(x)) (+ residual)`` with ``f`` the RMSNorm of weight ``norm``, SwiGLU, or nothing."""
        operands = lin.gemv_operands()
        if operands is not None:
            w, scale = operands
            return kernels.gemv(
                x, w, scale, residual, norm=(norm, self.eps) if norm is not None else None, swiglu=swiglu
            )
        if norm is not None:
            x = kernels.rms_norm(x, norm, self.eps)
        if swiglu:
            x = kernels.silu_mul(x)
        return lin(x) if residual is None else lin.add_to(residual, x)
