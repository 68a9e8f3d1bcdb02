"""The decoder itself: Llama-family and Mixtral layers, split into pipeline stages and tensor-parallel ranks.

Families (``ArchSpec.family``):

* ``llama``: Llama 1/2/3, Mistral, Qwen2. RMSNorm, rotary position embeddings (RoPE, with
  ``rope_theta`` and the ``linear`` and ``llama3`` ``rope_scaling`` types), grouped-query attention
  (GQA), optional q/k/v biases (Qwen2), SwiGLU MLP. Mistral's sliding-window attention is honoured.
* ``mixtral``: the same attention, with a sparse mixture-of-experts MLP: a router picks the top-k
  experts per token (softmax, then the k weights renormalized to sum to 1), each a SwiGLU MLP.

Weights follow the Hugging Face layout and math (``rotate_half`` RoPE, RMSNorm statistics in float32),
so a real checkpoint gives the same logits as ``transformers`` (up to rounding in half precision).
For fewer kernel launches per token, q/k/v and gate/up projections are fused into one matrix each, q
and k are rotated together, and the residual additions ride on the output projections.

A ``Stage`` holds a contiguous block of layers ``[first, first + n)`` on one torch device, plus the
token embedding when it is the first stage and the final norm and LM head when it is the last. It
reads only its own tensors from the safetensors shards, straight onto its device, and owns a static
``KVCache`` for ``context_tokens`` positions. The engine (``runner.py``) chains the stages, moving the
hidden state from one device to the next, and captures each stage's decode step in CUDA graphs.

Variants, applied while loading (each layer is loaded, transformed, then its 16-bit copy dropped):

* Structured pruning (``pruning="structured"``, ``prune_structured``): 25% of the FFN channels
  (``f // 4``, per expert for Mixtral) and 25% of the attention heads by whole KV groups
  (``kv // 4`` KV heads with their query heads; with fewer than 4 KV heads, ``g // 4`` of the ``g``
  query heads of every group instead) are removed, the ones with the smallest weight norm
  (squared L2 norm of every row/column that belongs to the channel or head). The rule is the
  fingerprint estimator's ``pruned_arch``, so estimated and served shapes agree.
* Tensor parallelism (``TensorParallel``, Megatron style): q/k/v and gate/up are column-parallel
  (each rank holds ``heads / tp`` query heads, ``kv_heads / tp`` KV heads and ``f / tp`` FFN
  channels), the attention output and down projections are row-parallel, followed by one all-reduce
  per block half (rank 0 adds the residual before it). The embedding is vocab-parallel (each rank
  holds ``ceil(vocab / tp)`` rows, zero-padded; lookups outside a rank's rows give zeros and one
  all-reduce sums them) and so is the LM head (each rank computes its slice of the logits, one
  all-gather joins them). Norms are replicated. Mixtral's router is replicated, its experts split
  like the dense MLP.
* Weight formats (``quant.make_linear``): fp16, int8, int4, 2:4 sparse, for every projection of
  every layer; embeddings, norms and the LM head stay 16-bit.
* KV cache (``KVCache``): 16-bit, or int8 with one scale per (layer, k/v, head, position):
  ``q = round(x / s)``, ``s = max|x| / 127`` over the head dimension. Decode dequantizes the rows
  it attends over; prefill attends over its own 16-bit keys and values and stores them quantized.

Two passes, batch size 1:

* ``Stage.prefill``: the whole prompt at once (positions ``0..T-1``), causal
  ``scaled_dot_product_attention`` (flash attention on CUDA); writes the prompt's keys and values
  into the cache.
* ``Stage.decode``: one token at the position held in the stage's ``pos`` buffer; writes its key and
  value with ``index_copy_`` and attends over cache rows ``[0, kv_len)``, under a mask computed on the
  device from ``pos``. All tensors it touches are preallocated and the position is a device tensor,
  so for a fixed ``kv_len`` the dense decode step is a pure function of the (token, position)
  buffers: ``runner.py`` captures it in one CUDA graph per ``kv_len`` bucket. (Mixtral's decode
  reads its expert choice back to the host, so Mixtral stages run eagerly.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from iserve.checkpoint import Checkpoint, embed_name, final_norm_names, head_names, layer_prefix, layer_tensor_shapes, load_tensors
from iserve.errors import BadRequest, UnsupportedModel
from iserve.messages import ArchSpec

from . import kernels
from .quant import Linear, int8_row_scales, make_linear

# ---------------------------------------------------------------------------------------------------
# rotary position embeddings


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


def rope_tables(arch: ArchSpec, positions: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
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


def sliding_window_of(config: dict[str, Any]) -> int | None:
    """The attention window in tokens, or None for full causal attention."""
    model_type = config.get("model_type")
    if model_type == "qwen2":
        if config.get("use_sliding_window"):
            raise UnsupportedModel(
                "Qwen2 checkpoints with use_sliding_window=true are not supported by the torch engine; "
                "set use_sliding_window to false in config.json (the released Qwen2 models do)."
            )
        return None
    window = config.get("sliding_window")
    if model_type in ("mistral", "mixtral") and window:
        return int(window)
    return None


# ---------------------------------------------------------------------------------------------------
# tensor parallelism


class TensorParallel:
    """One stage's tensor-parallel group: this process is rank ``rank`` of ``size``.

    ``group`` is a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU) whose ranks are
    the ``size`` processes of the deployment; with ``size == 1`` nothing is communicated.
    """

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None):
        self.rank = rank
        self.size = size
        self.group = group
        self.collectives = size > 1

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's ``(start, count)`` of ``n`` items split evenly; ``n`` must divide by the size."""
        if n % self.size:
            raise BadRequest(f"tensor parallelism of degree {self.size} needs {what} ({n}) to be divisible by {self.size}.")
        count = n // self.size
        return self.rank * count, count

    @contextmanager
    def local(self):
        """Within: no collectives; each rank computes its own partial sums. For checks that compare two
        computations on this rank alone (the fused decode check): a collective inside a check can
        hang the ranks when one of them leaves the check early (an exception) and the other does not
        (two H200s, Llama-2-7B 2:4 at TP=2: one rank waited in a layer's all-reduce, the other in the
        agreement after the check)."""
        was = self.collectives
        self.collectives = False
        try:
            yield self
        finally:
            self.collectives = was

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place when ``t`` is contiguous (use the returned tensor). A 2:4
        sparse product comes out transposed (not contiguous), and NCCL refuses such a tensor: on
        the ranks that add no residual (all but rank 0) the row-parallel output is that product."""
        if self.collectives:
            import torch.distributed as dist

            t = t.contiguous()
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_columns(self, t: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` on each rank -> ``[T, size * n]``, rank r's columns at ``[r * n, (r + 1) * n)``."""
        if not self.collectives:
            return t
        import torch.distributed as dist

        T, n = t.shape
        out = torch.empty(self.size * T, n, dtype=t.dtype, device=t.device)
        # torch 2.13 renamed all_gather_into_tensor (the name torch 2.11 has) to all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous(), group=self.group)
        return out.view(self.size, T, n).permute(1, 0, 2).reshape(T, self.size * n)


# ---------------------------------------------------------------------------------------------------
# structured pruning


def pruned_counts(arch: ArchSpec, pruning: str) -> tuple[int, int, int]:
    """``(query heads, KV heads, FFN channels)`` of a layer after ``pruning`` (the estimator's rule)."""
    kv, heads, f = arch.num_kv_heads, arch.num_attention_heads, arch.intermediate_size
    if pruning != "structured":
        return heads, kv, f
    group = heads // kv
    if kv >= 4:
        kept_kv, kept_group = kv - kv // 4, group
    else:
        kept_kv, kept_group = kv, group - group // 4
    return kept_kv * kept_group, kept_kv, f - f // 4


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` largest scores; ties go to the earlier index."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _sq(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.float().pow(2).sum(dim=dim)


def prune_structured(arch: ArchSpec, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the weakest 25% of one layer's FFN channels and attention heads (see the module docstring).

    ``t`` holds the layer's tensors by Hugging Face name (relative to the layer); returns new ones.
    """
    d, kv, heads = arch.head_dim, arch.num_kv_heads, arch.num_attention_heads
    group = heads // kv
    out = dict(t)
    # -- attention: score every query head and every KV head
    q = t["self_attn.q_proj.weight"].view(heads, d, -1)
    k = t["self_attn.k_proj.weight"].view(kv, d, -1)
    v = t["self_attn.v_proj.weight"].view(kv, d, -1)
    o = t["self_attn.o_proj.weight"]  # [hidden, heads * d]
    q_score = _sq(q, (1, 2)) + _sq(o.view(o.shape[0], heads, d), (0, 2))  # [heads]
    kv_score = _sq(k, (1, 2)) + _sq(v, (1, 2))
    kept_heads, kept_kv, kept_f = pruned_counts(arch, "structured")
    if kv >= 4:
        kv_idx = _keep_largest(kv_score + q_score.view(kv, group).sum(dim=1), kept_kv)
        q_idx = (kv_idx[:, None] * group + torch.arange(group, device=kv_idx.device)[None, :]).reshape(-1)
    else:
        kv_idx = torch.arange(kv, device=q.device)
        keep = kept_heads // kv
        q_idx = torch.cat([j * group + _keep_largest(q_score[j * group:(j + 1) * group], keep) for j in range(kv)])
    q_rows = (q_idx[:, None] * d + torch.arange(d, device=q_idx.device)[None, :]).reshape(-1)
    kv_rows = (kv_idx[:, None] * d + torch.arange(d, device=kv_idx.device)[None, :]).reshape(-1)
    out["self_attn.q_proj.weight"] = t["self_attn.q_proj.weight"][q_rows]
    out["self_attn.k_proj.weight"] = t["self_attn.k_proj.weight"][kv_rows]
    out["self_attn.v_proj.weight"] = t["self_attn.v_proj.weight"][kv_rows]
    out["self_attn.o_proj.weight"] = o[:, q_rows]
    if arch.attention_bias:
        out["self_attn.q_proj.bias"] = t["self_attn.q_proj.bias"][q_rows]
        out["self_attn.k_proj.bias"] = t["self_attn.k_proj.bias"][kv_rows]
        out["self_attn.v_proj.bias"] = t["self_attn.v_proj.bias"][kv_rows]
    # -- FFN channels: gate row, up row and down column of each channel
    if arch.family == "mixtral":
        mlps = [(f"block_sparse_moe.experts.{e}.w1.weight", f"block_sparse_moe.experts.{e}.w3.weight",
                 f"block_sparse_moe.experts.{e}.w2.weight") for e in range(arch.num_experts)]
    else:
        mlps = [("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    for gate, up, down in mlps:
        score = _sq(t[gate], 1) + _sq(t[up], 1) + _sq(t[down], 0)
        idx = _keep_largest(score, kept_f)
        out[gate], out[up], out[down] = t[gate][idx], t[up][idx], t[down][:, idx]
    return out


# ---------------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Keys and values of ``layers`` layers for ``context`` positions: ``data [layers, 2, kv_heads,
    context, head_dim]`` in the computation dtype, or int8 with ``scale [layers, 2, kv_heads, context]``."""

    def __init__(self, layers: int, kv_heads: int, context: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, quant: str):
        self.quant = quant
        self.dtype = dtype
        store = torch.int8 if quant == "int8" else dtype
        self.data = torch.zeros(layers, 2, kv_heads, context, head_dim, dtype=store, device=device)
        self.scale = torch.ones(layers, 2, kv_heads, context, dtype=dtype, device=device) if quant == "int8" else None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., d]`` -> int8 values and one scale per vector ``[...]``."""
        s = (x.abs().amax(dim=-1).float() / 127.0).clamp(min=1e-8)
        return torch.round(x.float() / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), s

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows ``0..T-1`` from ``k, v [kv_heads, T, d]``."""
        T = k.shape[1]
        if self.scale is None:
            self.data[layer, 0, :, :T].copy_(k)
            self.data[layer, 1, :, :T].copy_(v)
            return
        for i, x in enumerate((k, v)):
            q, s = self._quantize(x)
            self.data[layer, i, :, :T].copy_(q)
            self.scale[layer, i, :, :T].copy_(s)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The row at device position ``pos [1]`` from ``k, v [kv_heads, 1, d]``."""
        if self.scale is None:
            self.data[layer, 0].index_copy_(1, pos, k)
            self.data[layer, 1].index_copy_(1, pos, v)
            return
        for i, x in enumerate((k, v)):
            q, s = self._quantize(x)
            self.data[layer, i].index_copy_(1, pos, q)
            self.scale[layer, i].index_copy_(1, pos, s.to(self.dtype))

    def planes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keys, values ``[kv_heads, context, d]`` and (int8) their scales ``[kv_heads, context]`` of ``layer``."""
        if self.scale is None:
            return self.data[layer, 0], self.data[layer, 1], None, None
        return self.data[layer, 0], self.data[layer, 1], self.scale[layer, 0], self.scale[layer, 1]

    def read(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``[0, kv_len)``, ``[kv_heads, kv_len, d]`` in the computation dtype."""
        if self.scale is None:
            return self.data[layer, 0, :, :kv_len], self.data[layer, 1, :, :kv_len]
        kv = self.data[layer, :, :, :kv_len].to(self.dtype) * self.scale[layer, :, :, :kv_len].unsqueeze(-1)
        return kv[0], kv[1]


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

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, cols: slice, fmt: LayerFormat,
                 tp: TensorParallel):
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

    def __init__(self, arch: ArchSpec, router: torch.Tensor, experts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 cols: slice, fmt: LayerFormat, tp: TensorParallel):
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
            out = None
            for j, e in enumerate(chosen[0].tolist()):
                y = self.experts[e](x) * weights[0, j]
                out = y if out is None else out + y
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
        self.qkv = fmt.linear(torch.cat((t["self_attn.q_proj.weight"][qs], t["self_attn.k_proj.weight"][ks],
                                         t["self_attn.v_proj.weight"][ks])))
        self.b_qkv = (
            torch.cat((t["self_attn.q_proj.bias"][qs], t["self_attn.k_proj.bias"][ks], t["self_attn.v_proj.bias"][ks]))
            if arch.attention_bias
            else None
        )
        self.o = fmt.row_parallel(t["self_attn.o_proj.weight"], qs, tp)
        if arch.family == "mixtral":
            p = "block_sparse_moe.experts."
            f0, fn = tp.split(t[p + "0.w1.weight"].shape[0], "the FFN size")
            experts = [(t[f"{p}{e}.w1.weight"], t[f"{p}{e}.w3.weight"], t[f"{p}{e}.w2.weight"]) for e in range(arch.num_experts)]
            self.mlp: DenseMLP | MoEMLP = MoEMLP(arch, t["block_sparse_moe.gate.weight"], experts, slice(f0, f0 + fn), fmt, tp)
        else:
            f0, fn = tp.split(t["mlp.gate_proj.weight"].shape[0], "the FFN size")
            self.mlp = DenseMLP(t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"],
                                slice(f0, f0 + fn), fmt, tp)

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o] + self.mlp.linears()

    def tensors(self) -> list[torch.Tensor]:
        own = [self.ln_attn, self.ln_mlp] + ([self.b_qkv] if self.b_qkv is not None else [])
        if isinstance(self.mlp, MoEMLP):
            own.append(self.mlp.w_router)
        return own + [x for lin in self.linears() for x in lin.tensors()]

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate: q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``.

        q and k are adjacent in the fused projection, so one RoPE application rotates both.
        """
        T = x.shape[0]
        qkv = self.qkv(rms_norm(x, self.ln_attn, self.eps))
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(T, self.heads + self.kv_heads, self.head_dim), cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.kv_heads, self.head_dim)
        return qk[:, : self.heads], qk[:, self.heads:], v

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

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                mask: torch.Tensor | None) -> torch.Tensor:
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
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=mask, is_causal=mask is None,
        )  # [1, heads, T, d]
        return self._finish(x, out[0].transpose(0, 1).reshape(T, self.q_size))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
               pos: torch.Tensor, kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
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

    def decode_fused(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, layer: int,
                     pos: torch.Tensor, window: int, splits: int) -> torch.Tensor:
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
        q = kernels.rope_store(qkv, cos, sin, pos, self.heads, self.kv_heads, self.head_dim, k_cache, v_cache, k_scale, v_scale)
        attn = kernels.decode_attention(q, k_cache, v_cache, k_scale, v_scale, pos, window, splits)
        x = self.tp.all_reduce(self._project(self.o, attn, residual=x if self.tp.rank == 0 else None))
        gate_up = self._project(self.mlp.gate_up, x, norm=self.ln_mlp)
        return self.tp.all_reduce(self._project(self.mlp.down, gate_up, residual=x if self.tp.rank == 0 else None,
                                                swiglu=True))

    def _project(self, lin: Linear, x: torch.Tensor, *, norm: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
        """``lin(f(x)) (+ residual)`` with ``f`` the RMSNorm of weight ``norm``, SwiGLU, or nothing."""
        operands = lin.gemv_operands()
        if operands is not None:
            w, scale = operands
            return kernels.gemv(x, w, scale, residual, norm=(norm, self.eps) if norm is not None else None, swiglu=swiglu)
        if norm is not None:
            x = kernels.rms_norm(x, norm, self.eps)
        if swiglu:
            x = kernels.silu_mul(x)
        return lin(x) if residual is None else lin.add_to(residual, x)


# ---------------------------------------------------------------------------------------------------
# pipeline stage



def release_cached(device: torch.device) -> None:
    """Hand the allocator's cached free blocks back to the driver (CUDA only).

    Called after each layer is built: the layer's 16-bit source tensors and conversion scratch are
    free by then, and a converted tensor of the next layer placed inside one of their cached
    segments would pin the whole segment. Measured on an H100 (docs/fingerprint.md), a Llama-2-7B
    with structured pruning reserved 2.2 GiB more than it allocated when built without this; the
    fingerprint estimator also needs memory that grows linearly with the layer count.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()


_ENGINE_PACKAGE = __name__.rpartition(".")[0]


def build_compact(device: torch.device, build: Callable[[], Any], *, compact: bool = True) -> Any:
    """Run ``build`` (loading and converting one layer) with its allocations in a private memory
    pool, then copy the tensors the result keeps into the device's default pool, back to back,
    and release the private pool whole.

    Converting a layer (fusing q/k/v, quantizing, pruning) makes 16-bit temporaries larger than
    what is kept; kept tensors carved out of the temporaries' cached blocks pin half-empty
    segments, a waste that grows with the layer count (1.1-1.6 GiB on a Llama-2-13B in int8/int4,
    measured on an H100; docs/fingerprint.md) and that 1- and 2-layer fingerprints do not show.
    Copied out this way, the kept tensors sit next to each other and the temporaries' memory goes
    back to the driver. The copy costs one device-to-device pass over the layer's final bytes.
    A tensor subclass that says what it holds (``__tensor_flatten__``: the 2:4 semi-structured
    weights, packed values and metadata) is rebuilt around copies of its inner tensors. Not on CPU,
    without ``torch.cuda.MemPool``, or with ``compact=False``: then it only empties the allocator's
    cache after ``build``.
    """
    if not compact or device.type != "cuda" or not hasattr(torch.cuda, "MemPool") or not hasattr(torch.cuda, "use_mem_pool"):
        out = build()
        release_cached(device)
        return out
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool, device):
        out = build()
    if not _relocatable(out):
        raise RuntimeError("build_compact: the layer holds a tensor subclass without __tensor_flatten__; build it with compact=False")
    _relocate(out, {})
    del pool  # the build's tensors were freed as their references went (no cycles hold them)
    release_cached(device)
    return out


def _children(obj: Any) -> list[tuple[Any, Any]]:
    """(key, value) pairs of an engine object's attributes, a list's or a dict's items."""
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    if type(obj).__module__.startswith(_ENGINE_PACKAGE) and hasattr(obj, "__dict__"):
        return list(vars(obj).items())
    return []


def _every_tensor(obj: Any, ok: Callable[[torch.Tensor], bool], seen: set[int] | None = None) -> bool:
    """Whether ``ok`` holds for every tensor ``obj`` holds (through engine objects, lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        return ok(obj)
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return True
    seen.add(id(obj))
    return all(_every_tensor(v, ok, seen) for _, v in _children(obj))


def _is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor


def _flattened(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any] | None:
    """A wrapper subclass's inner tensors by name and its metadata (``__tensor_flatten__``), or None
    for a plain tensor or a subclass that does not say what it holds."""
    if _is_plain(t) or not hasattr(type(t), "__tensor_flatten__"):
        return None
    names, meta = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}, meta


def _relocatable_tensor(t: torch.Tensor) -> bool:
    """Plain, or a subclass whose inner tensors are plain (one level, as the 2:4 format is)."""
    if _is_plain(t):
        return True
    flat = _flattened(t)
    return flat is not None and all(_is_plain(x) for x in flat[0].values())


def _relocatable(obj: Any) -> bool:
    """Whether ``_relocate`` can copy every tensor ``obj`` holds."""
    return _every_tensor(obj, _relocatable_tensor)


def _copy_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_cuda else t


def _copy_tensor(t: torch.Tensor, copy: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``copy(t)`` for a plain tensor; a wrapper subclass rebuilt around copies of its inner tensors."""
    flat = _flattened(t)
    if flat is None:
        return copy(t)
    inner, meta = flat
    return type(t).__tensor_unflatten__({n: copy(x) for n, x in inner.items()}, meta, t.size(), t.stride())


def _relocate(obj: Any, memo: dict[int, Any], copy: Callable[[torch.Tensor], torch.Tensor] = _copy_cuda) -> Any:
    """``obj`` with every tensor it holds (through engine objects, lists, tuples, dicts) replaced by
    ``copy(tensor)``; a tensor held twice stays shared. Lists, dicts and engine objects are updated
    in place, tuples rebuilt."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        memo[id(obj)] = _copy_tensor(obj, copy)
    elif isinstance(obj, tuple):
        memo[id(obj)] = tuple(_relocate(v, memo, copy) for v in obj) if type(obj) is tuple else obj
    else:
        memo[id(obj)] = obj
        if isinstance(obj, list):
            obj[:] = [_relocate(v, memo, copy) for v in obj]
        elif isinstance(obj, dict):
            for k in list(obj):
                obj[k] = _relocate(obj[k], memo, copy)
        else:
            for k, v in _children(obj):
                setattr(obj, k, _relocate(v, memo, copy))
    return memo[id(obj)]


class Stage:
    """Layers ``[first_layer, first_layer + num_layers)`` of a model on one device, with their KV cache.

    The first stage (``first_layer == 0``) takes token ids and holds the embedding; the last one
    (ending at the model's last layer) holds the final norm and the LM head and returns float32 logits.
    Any other stage takes and returns hidden states ``[T, hidden]``. With tensor parallelism this is
    one rank's share of the stage (``tp``); every rank returns the same full result.
    """

    def __init__(self, ck: Checkpoint, device: torch.device, first_layer: int, num_layers: int, *,
                 context_tokens: int, dtype: torch.dtype, weight_quant: str = "fp16", kv_quant: str = "fp16",
                 pruning: str = "none", tp: TensorParallel | None = None):
        arch = ck.arch
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.tp = tp or TensorParallel()
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.is_first = first_layer == 0
        self.is_last = first_layer + num_layers == arch.num_layers
        self.context_tokens = context_tokens
        self.window = sliding_window_of(ck.config)
        self.is_moe = arch.family == "mixtral"
        load_device = str(device)

        def load(names: list[str], strip: str = "") -> dict[str, torch.Tensor]:
            raw = load_tensors(ck, names, device=load_device)
            return {n[len(strip):]: t.to(dtype) for n, t in raw.items()}

        # Vocab-parallel embedding / LM head: this rank's rows [vocab_start, vocab_start + vocab_rows).
        self.vocab_rows = -(-arch.vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.vocab_rows

        def vocab_shard(w: torch.Tensor) -> torch.Tensor:  # a [vocab, hidden] weight or a [vocab] bias
            if self.tp.size == 1:
                return w
            part = w[self.vocab_start:self.vocab_start + self.vocab_rows]
            pad = (0, 0, 0, self.vocab_rows - part.shape[0]) if part.dim() == 2 else (0, self.vocab_rows - part.shape[0])
            return F.pad(part, pad).contiguous()

        emb = embed_name(arch)
        self.embed = vocab_shard(load([emb])[emb]) if self.is_first else None
        fmt = LayerFormat(weight_quant, pruning == "2:4", dtype)
        self.layers: list = []
        names = list(layer_tensor_shapes(arch))
        for i in range(first_layer, first_layer + num_layers):
            # One layer at a time, so that fusing and converting never hold more than one layer twice.
            p = layer_prefix(i, arch)
            self.layers.append(build_compact(device, lambda p=p: self._build_layer(load([p + n for n in names], strip=p), fmt, pruning)))
        # The final norm (LayerNorm families: weight and bias) and the LM head (some with a bias).
        self.norm = self.norm_bias = self.lm_head = self.lm_head_bias = None
        if self.is_last:
            norm_names = final_norm_names(arch)
            t = load(norm_names)
            self.norm = t[norm_names[0]]
            self.norm_bias = t[norm_names[1]] if len(norm_names) > 1 else None
            if arch.tie_embeddings:
                self.lm_head = self.embed if self.embed is not None else vocab_shard(load([emb])[emb])
            else:
                heads = head_names(arch)
                t = load(heads)
                self.lm_head = vocab_shard(t[heads[0]])
                if len(heads) > 1:
                    self.lm_head_bias = vocab_shard(t[heads[1]])

        # Static state: KV cache, RoPE tables, and the decode position buffer.
        _, kv_heads, _ = pruned_counts(arch, pruning)
        _, local_kv = self.tp.split(kv_heads, "the number of KV heads")
        self._kv_shape = (local_kv, context_tokens, arch.head_dim, dtype, device, kv_quant)
        self.cache = KVCache(num_layers, *self._kv_shape)
        self.cos, self.sin = self._rope_tables(context_tokens, device, dtype)
        self.positions = torch.arange(context_tokens, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.replayed_from = 0  # > 0: ``replay`` runs these loaded layers cyclically
        self.replay_copies = 0
        # Decode through the fused Triton kernels (the engine turns this on after checking them).
        self.fused = False
        self.splits = kernels.attention_splits(local_kv, context_tokens)

    def replay(self, depth: int, *, distinct: bool = False) -> None:
        """Profiling only: run this stage's layers cyclically as ``depth`` layers (layer ``i`` is
        loaded layer ``i mod n``), each with KV cache rows of its own.

        A 1- or 2-layer fingerprint's passes are short: the host's launching and the device's work
        overlap differently than over the 32-80 layers of the model (host jitter, launch queue,
        clocks), and a line through two short passes multiplies any such difference by the layer
        count. Replayed to the model's depth, the fingerprint's weights (and memory) stay those of
        its layers while a pass has the model's length. Weights are read once per replayed layer as
        in the model; a layer smaller than the GPU's L2 cache could stay cached between its replays
        and time faster than distinct layers would (not the case for the 7B-70B shapes measured).

        With ``distinct`` every replayed layer past the loaded ones is a copy with tensors of its
        own (a copy on the device), so that a pass also reads a model's worth of distinct weights,
        as the model does (what depends on the memory footprint, such as address translation, is
        then measured too). Layers holding a tensor subclass (2:4), and a GPU without room for the
        copies and the cache, keep the shared layers; ``replay_copies`` says how many were made."""
        if depth < 1:
            raise BadRequest(f"replay depth must be at least 1, not {depth}.")
        real = self.unique_layers()
        extra = max(0, depth - len(real))
        copies = distinct and extra > 0 and all(_every_tensor(x, _is_plain) for x in real) and self._room_for(real, extra, depth)
        layers = []
        for i in range(depth):
            layer = real[i % len(real)]
            if copies and i >= len(real):
                with torch.inference_mode():
                    layer = copy.deepcopy(layer, {id(self.tp): self.tp})  # the TP group stays shared
            layers.append(layer)
        self.layers = layers
        self.replayed_from = len(real)
        self.replay_copies = extra if copies else 0
        self.cache = KVCache(depth, *self._kv_shape)

    def _room_for(self, real: list, extra: int, depth: int) -> bool:
        """Whether ``extra`` copies of the layers (cycling through ``real``) and a ``depth``-layer KV
        cache fit this device's free memory, with a GiB to spare; always on the CPU."""
        if self.device.type != "cuda":
            return True
        per_layer = [sum(t.numel() * t.element_size() for t in x.tensors()) for x in real]
        need = sum(per_layer[i % len(real)] for i in range(len(real), len(real) + extra))
        need += self.cache.nbytes // max(1, self.cache.data.shape[0]) * depth + (1 << 30)  # the new cache, and a GiB
        free, _ = torch.cuda.mem_get_info(self.device)
        return need <= free

    def _build_layer(self, t: dict[str, torch.Tensor], fmt: LayerFormat, pruning: str):
        """One hidden layer from its checkpoint tensors (names relative to the layer), in ``fmt``."""
        if pruning == "structured":
            t = prune_structured(self.arch, t)
        return DecoderLayer(self.arch, t, fmt, self.tp)

    def _rope_tables(self, positions: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.arch, positions, device, dtype)

    @property
    def can_fuse(self) -> bool:
        """Whether the fused decode kernels apply: CUDA, Triton, dense MLP, a power-of-two head size >= 16."""
        d = self.arch.head_dim
        return (self.device.type == "cuda" and not self.is_moe and d >= 16 and d & (d - 1) == 0
                and kernels.available())

    # -- accounting ------------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.norm, self.norm_bias, self.lm_head_bias) if t is not None]
        if self.lm_head is not None and self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.unique_layers():
            out += layer.tensors()
        return out

    def unique_layers(self) -> list:
        """The layers, each once (a replayed stage runs some several times; distinct copies count)."""
        seen: set[int] = set()
        return [layer for layer in self.layers if not (id(layer) in seen or seen.add(id(layer)))]

    def kernels(self) -> dict[str, int]:
        """How many of this stage's projections run on each kernel."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for lin in layer.linears():
                out[lin.kernel] = out.get(lin.kernel, 0) + 1
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def buffer_bytes(self) -> int:
        """RoPE tables and position buffers."""
        return sum(t.numel() * t.element_size() for t in (self.cos, self.sin, self.positions, self.pos))

    @property
    def accounted_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.buffer_bytes

    # -- passes ----------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_first:
            return x.to(device=self.device, dtype=self.dtype)
        ids = x.to(self.device)
        if self.tp.size == 1:
            return F.embedding(ids, self.embed)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        h = F.embedding(local.clamp(0, self.vocab_rows - 1), self.embed).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(h)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            return x
        logits = F.linear(rms_norm(x, self.norm, self.arch.rms_norm_eps), self.lm_head)
        if self.tp.collectives:
            logits = self.tp.all_gather_columns(logits)[:, : self.arch.vocab_size]
        return logits.float()

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, *, all_positions: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """Run positions ``0..T-1``: ``x`` is token ids ``[T]`` (first stage) or hidden ``[T, hidden]``.

        Returns hidden ``[T, hidden]``, or on the last stage float32 logits: ``[T, vocab]`` with
        ``all_positions``, else ``[1, vocab]`` for the last position only, or for position ``last``
        (a device tensor ``[1]``) when given: a prompt padded at its end to a captured graph's length
        (the padding comes after every real token, so causal attention keeps it out of their results;
        its cache rows are overwritten by the decode steps that reach them).
        """
        h = self._input(x)
        T = h.shape[0]
        cos, sin = self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1)
        mask = None
        if self.window is not None and T > self.window:
            i = self.positions[:T].unsqueeze(1)
            j = self.positions[:T].unsqueeze(0)
            mask = (j <= i) & (i - j < self.window)
        for n, layer in enumerate(self.layers):
            h = layer.prefill(h, cos, sin, self.cache, n, mask)
        if self.is_last and not all_positions:
            h = h[-1:] if last is None else h.index_select(0, last)
        return self._output(h)

    def needs_mask(self, pos: int, kv_len: int) -> bool:
        """Whether attention over cache rows ``[0, kv_len)`` at position ``pos`` must mask rows out."""
        return kv_len > pos + 1 or (self.window is not None and pos + 1 > self.window)

    @torch.inference_mode()
    def decode(self, x: torch.Tensor, kv_len: int, masked: bool = True) -> torch.Tensor:
        """One token at position ``self.pos``: ``x`` is the token id ``[1]`` or hidden ``[1, hidden]``.

        ``kv_len`` (> position) is how many cache rows attention reads. With ``masked``, rows past the
        position (and outside a sliding window) are masked out on the device, so any ``kv_len`` up to
        ``context_tokens`` gives the same result (what a captured graph needs); the eager caller
        passes ``kv_len = position + 1`` and ``masked = needs_mask(...)``, skipping the mask when all
        rows count. With ``fused`` set, the Triton kernels run instead and ``kv_len`` is not used.
        """
        h = self._input(x)
        if self.fused:  # attention reads rows [0, pos] itself: kv_len and the mask do not apply
            for n, layer in enumerate(self.layers):
                h = layer.decode_fused(h, self.cos, self.sin, self.cache, n, self.pos, self.window or 0, self.splits)
            return self._output(h)
        cos = self.cos.index_select(0, self.pos).unsqueeze(1)
        sin = self.sin.index_select(0, self.pos).unsqueeze(1)
        mask = None
        if masked:
            keys = self.positions[:kv_len]
            valid = keys <= self.pos
            if self.window is not None:
                valid &= keys > self.pos - self.window
            mask = valid.view(1, 1, 1, kv_len)
        for n, layer in enumerate(self.layers):
            h = layer.decode(h, cos, sin, self.cache, n, self.pos, kv_len, mask)
        return self._output(h)
