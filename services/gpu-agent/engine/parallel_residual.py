"""Falcon, GPT-J and GPT-NeoX: the parallel-residual families, as ``ParallelResidualStage`` of the torch engine.

Their layers differ from Llama's (LayerNorm with biases, a GELU MLP, attention and MLP off the same
residual, fused q/k/v in the family's order, partial RoPE); everything else is ``stage.Stage``'s.
See docs/engine-internals.md#parallel-residual-families.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from iserve.checkpoint import Checkpoint
from iserve.errors import UnsupportedModel
from iserve.messages import ArchSpec

from .kv_cache import KVCache
from .layers import Attend, LayerFormat
from .pruning import pruned_counts
from .quant import Linear
from .stage import Stage
from .tp import TensorParallel

FAMILIES = ("falcon", "gptj", "gpt_neox")


# ---------------------------------------------------------------------------------------------------
# rotary embeddings on the leading dimensions of each head


def rotary_width(arch: ArchSpec) -> int:
    return arch.rotary_dim or arch.head_dim


def rope_tables(
    arch: ArchSpec, positions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and signed ``sin`` tables ``[positions, r]`` (``r`` = the rotary width) for ``apply_rope``.

    Half-split (NeoX, Falcon): pairs ``(i, i + r/2)``, tables ``(c, c)`` and ``(-s, s)``.
    Interleaved (GPT-J): pairs ``(2i, 2i+1)``, tables ``c0 c0 c1 c1 ...`` and ``-s0 s0 -s1 s1 ...``.
    """
    if arch.rope_scaling:
        raise UnsupportedModel(f"rope_scaling {arch.rope_scaling!r} is not supported for the {arch.family} family.")
    r = rotary_width(arch)
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    c, s = freqs.cos(), freqs.sin()
    if arch.rotary_interleaved:
        cos = torch.stack((c, c), dim=-1).reshape(positions, r)
        sin = torch.stack((-s, s), dim=-1).reshape(positions, r)
    else:
        cos = torch.cat((c, c), dim=-1)
        sin = torch.cat((-s, s), dim=-1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the leading ``r`` dimensions of ``x [T, heads, d]`` (``r`` = the tables' width)."""
    r = cos.shape[-1]
    rot = x[..., :r]
    if interleaved:
        swapped = rot.unflatten(-1, (r // 2, 2)).flip(-1).flatten(-2)
    else:
        swapped = torch.cat((rot[..., r // 2 :], rot[..., : r // 2]), dim=-1)
    rotated = torch.addcmul(rot * cos, swapped, sin)
    if r == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., r:]), dim=-1)


def layer_norm(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor], eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), norm[0], norm[1], eps)


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu
    raise UnsupportedModel(f"activation {name!r} is not supported by the torch engine.")


# ---------------------------------------------------------------------------------------------------
# one layer's tensors in a common form


def canonical_layer(arch: ArchSpec, t: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The layer's tensors as ``q, k, v [heads*d | kv*d, h]``, ``o [h, heads*d]``, ``up [f, h]``,
    ``down [h, f]``, their biases (``bq`` ...; None when absent) and norms ``ln1``, ``ln2``
    (``(weight, bias)``; ``ln2`` None when attention and MLP share ``ln1``)."""
    d, heads, kv = arch.head_dim, arch.num_attention_heads, arch.num_kv_heads
    h = arch.hidden_size

    def norm(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return t[name + ".weight"], t[name + ".bias"]

    def split_fused(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a fused q/k/v weight ``[rows, ...]`` (or bias ``[rows]``) into q, k, v rows."""
        tail = w.shape[1:]
        if arch.qkv_layout == "grouped":
            g = heads // kv
            x = w.reshape(kv, g + 2, d, *tail)
            return (
                x[:, :g].reshape(heads * d, *tail),
                x[:, g].reshape(kv * d, *tail),
                x[:, g + 1].reshape(kv * d, *tail),
            )
        x = w.reshape(heads, 3, d, *tail)  # per head
        return x[:, 0].reshape(heads * d, *tail), x[:, 1].reshape(heads * d, *tail), x[:, 2].reshape(heads * d, *tail)

    c: dict[str, Any] = {"bq": None, "bk": None, "bv": None, "bo": None, "b_up": None, "b_down": None, "ln2": None}
    if arch.family == "gptj":
        c["ln1"] = norm("ln_1")
        c["q"], c["k"], c["v"] = t["attn.q_proj.weight"], t["attn.k_proj.weight"], t["attn.v_proj.weight"]
        c["o"] = t["attn.out_proj.weight"]
        c["up"], c["b_up"] = t["mlp.fc_in.weight"], t.get("mlp.fc_in.bias")
        c["down"], c["b_down"] = t["mlp.fc_out.weight"], t.get("mlp.fc_out.bias")
        return c
    if arch.family == "falcon":
        prefix = "self_attention."
        if arch.layer_norms == 2 and arch.parallel_residual:
            c["ln1"], c["ln2"] = norm("ln_attn"), norm("ln_mlp")
        elif arch.layer_norms == 2:
            c["ln1"], c["ln2"] = norm("input_layernorm"), norm("post_attention_layernorm")
        else:
            c["ln1"] = norm("input_layernorm")
        qkv, dense = prefix + "query_key_value", prefix + "dense"
    elif arch.family == "gpt_neox":
        c["ln1"], c["ln2"] = norm("input_layernorm"), norm("post_attention_layernorm")
        qkv, dense = "attention.query_key_value", "attention.dense"
    else:
        raise UnsupportedModel(f"the parallel-residual layers do not implement the {arch.family} family.")
    c["q"], c["k"], c["v"] = split_fused(t[qkv + ".weight"])
    if qkv + ".bias" in t:
        c["bq"], c["bk"], c["bv"] = split_fused(t[qkv + ".bias"])
    c["o"], c["bo"] = t[dense + ".weight"], t.get(dense + ".bias")
    c["up"], c["b_up"] = t["mlp.dense_h_to_4h.weight"], t.get("mlp.dense_h_to_4h.bias")
    c["down"], c["b_down"] = t["mlp.dense_4h_to_h.weight"], t.get("mlp.dense_4h_to_h.bias")
    if c["q"].shape != (heads * d, h):
        raise UnsupportedModel(f"{arch.family} q/k/v split gave {tuple(c['q'].shape)}, expected {(heads * d, h)}.")
    return c


def _keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _sq(t: torch.Tensor, dim) -> torch.Tensor:
    return t.float().pow(2).sum(dim=dim)


def prune_structured(arch: ArchSpec, c: dict[str, Any]) -> dict[str, Any]:
    """Remove the weakest 25% of a canonical layer's attention heads and FFN channels (the rule of
    the estimator's ``pruned_arch``; scores are squared weight norms, as for the Llama layers)."""
    d, kv, heads = arch.head_dim, arch.num_kv_heads, arch.num_attention_heads
    group = heads // kv
    kept_heads, kept_kv, kept_f = pruned_counts(arch, "structured")
    q, o = c["q"].view(heads, d, -1), c["o"]
    q_score = _sq(q, (1, 2)) + _sq(o.view(o.shape[0], heads, d), (0, 2))
    kv_score = _sq(c["k"].view(kv, d, -1), (1, 2)) + _sq(c["v"].view(kv, d, -1), (1, 2))
    if kv >= 4:
        kv_idx = _keep_largest(kv_score + q_score.view(kv, group).sum(dim=1), kept_kv)
        q_idx = (kv_idx[:, None] * group + torch.arange(group, device=kv_idx.device)[None, :]).reshape(-1)
    else:
        kv_idx = torch.arange(kv, device=q.device)
        keep = kept_heads // kv
        q_idx = torch.cat([j * group + _keep_largest(q_score[j * group : (j + 1) * group], keep) for j in range(kv)])
    rows = lambda idx: (idx[:, None] * d + torch.arange(d, device=idx.device)[None, :]).reshape(-1)  # noqa: E731
    q_rows, kv_rows = rows(q_idx), rows(kv_idx)
    out = dict(c)
    out["q"], out["k"], out["v"], out["o"] = c["q"][q_rows], c["k"][kv_rows], c["v"][kv_rows], o[:, q_rows]
    for b, r in (("bq", q_rows), ("bk", kv_rows), ("bv", kv_rows)):
        if c[b] is not None:
            out[b] = c[b][r]
    f_idx = _keep_largest(_sq(c["up"], 1) + _sq(c["down"], 0), kept_f)
    out["up"], out["down"] = c["up"][f_idx], c["down"][:, f_idx]
    if c["b_up"] is not None:
        out["b_up"] = c["b_up"][f_idx]
    return out


# ---------------------------------------------------------------------------------------------------
# the layer


class ParallelResidualLayer:
    """One Falcon / GPT-J / GPT-NeoX block on one tensor-parallel rank.

    Parallel residual: ``x + attn(ln1(x)) + mlp(ln2(x) or ln1(x))``, one all-reduce for both halves;
    sequential: ``x + attn(ln1(x))``, then ``+ mlp(ln2(.))``. Row-parallel output biases are added by
    rank 0 only, before the all-reduce.
    """

    def __init__(self, arch: ArchSpec, c: dict[str, Any], fmt: LayerFormat, tp: TensorParallel):
        self.eps = arch.rms_norm_eps
        self.tp = tp
        self.parallel = arch.parallel_residual
        self.interleaved = arch.rotary_interleaved
        self.act = activation(arch.activation)
        d = arch.head_dim
        heads, kv_heads = c["q"].shape[0] // d, c["k"].shape[0] // d
        q0, self.heads = tp.split(heads, "the number of attention heads")
        k0, self.kv_heads = tp.split(kv_heads, "the number of KV heads")
        self.head_dim = d
        self.groups = self.heads // self.kv_heads
        self.q_size, self.kv_size = self.heads * d, self.kv_heads * d
        qs, ks = slice(q0 * d, (q0 + self.heads) * d), slice(k0 * d, (k0 + self.kv_heads) * d)
        f0, fn = tp.split(c["up"].shape[0], "the FFN size")
        fs = slice(f0, f0 + fn)
        self.ln1, self.ln2 = c["ln1"], c["ln2"]
        self.qkv = fmt.linear(torch.cat((c["q"][qs], c["k"][ks], c["v"][ks])))
        self.b_qkv = torch.cat((c["bq"][qs], c["bk"][ks], c["bv"][ks])) if c["bq"] is not None else None
        self.o = fmt.row_parallel(c["o"], qs, tp)
        self.up = fmt.linear(c["up"][fs])
        self.b_up = c["b_up"][fs] if c["b_up"] is not None else None
        self.down = fmt.row_parallel(c["down"], fs, tp)
        self.bo, self.b_down = c["bo"], c["b_down"]  # row-parallel output biases: added once (rank 0)

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o, self.up, self.down]

    def tensors(self) -> list[torch.Tensor]:
        own = list(self.ln1) + (list(self.ln2) if self.ln2 is not None else [])
        own += [b for b in (self.b_qkv, self.b_up, self.bo, self.b_down) if b is not None]
        return own + [x for lin in self.linears() for x in lin.tensors()]

    def _qkv(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = h.shape[0]
        qkv = self.qkv(h)
        if self.b_qkv is not None:
            qkv = qkv + self.b_qkv
        qk = apply_rope(
            qkv[:, : self.q_size + self.kv_size].view(T, self.heads + self.kv_heads, self.head_dim),
            cos,
            sin,
            self.interleaved,
        )
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.kv_heads, self.head_dim)
        return qk[:, : self.heads], qk[:, self.heads :], v

    def _mlp_hidden(self, h: torch.Tensor) -> torch.Tensor:
        y = self.up(h)
        if self.b_up is not None:
            y = y + self.b_up
        return self.act(y)

    def _base(self, x: torch.Tensor, *biases: torch.Tensor | None) -> torch.Tensor | None:
        """What rank 0 adds to its row-parallel products: the residual and the output biases
        (None on the other ranks)."""
        if self.tp.rank != 0:
            return None
        for b in biases:
            if b is not None:
                x = x + b
        return x

    def _row(self, lin: Linear, base: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        return lin(h) if base is None else lin.add_to(base, h)

    def _finish(self, x: torch.Tensor, h1: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            h2 = layer_norm(x, self.ln2, self.eps) if self.ln2 is not None else h1
            out = self._row(self.o, self._base(x, self.bo, self.b_down), attn)
            out = self.down.add_to(out, self._mlp_hidden(h2))
            return self.tp.all_reduce(out)
        x = self.tp.all_reduce(self._row(self.o, self._base(x, self.bo), attn))
        m = self._mlp_hidden(layer_norm(x, self.ln2, self.eps))
        return self.tp.all_reduce(self._row(self.down, self._base(x, self.b_down), m))

    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        """The batching engine's pass (``layers.DecoderLayer.step``)."""
        h1 = layer_norm(x, self.ln1, self.eps)
        q, k, v = self._qkv(h1, cos, sin)
        return self._finish(x, h1, attend(q, k, v))

    def prefill(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        T = x.shape[0]
        h1 = layer_norm(x, self.ln1, self.eps)
        q, k, v = self._qkv(h1, cos, sin)
        k, v = k.transpose(0, 1), v.transpose(0, 1)
        cache.write_prefix(layer, k, v)
        if self.groups > 1:
            k = k.repeat_interleave(self.groups, dim=0)
            v = v.repeat_interleave(self.groups, dim=0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask, is_causal=mask is None
        )
        return self._finish(x, h1, out[0].transpose(0, 1).reshape(T, self.q_size))

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
        h1 = layer_norm(x, self.ln1, self.eps)
        q, k, v = self._qkv(h1, cos, sin)
        cache.write_at(layer, pos, k.transpose(0, 1), v.transpose(0, 1))
        keys, values = cache.read(layer, kv_len)
        q = q.view(1, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask)
        return self._finish(x, h1, out.reshape(1, self.q_size))


# ---------------------------------------------------------------------------------------------------
# the stage


class ParallelResidualStage(Stage):
    """A ``stage.Stage`` of a Falcon, GPT-J or GPT-NeoX model: same constructor arguments, same
    passes; only the tensors, the layers, the final LayerNorm and the (biased) LM head differ."""

    def __init__(self, ck: Checkpoint, device: torch.device, first_layer: int, num_layers: int, **kwargs: Any):
        if ck.arch.family not in FAMILIES:
            raise UnsupportedModel(
                f"ParallelResidualStage runs the {', '.join(FAMILIES)} families, not {ck.arch.family}."
            )
        super().__init__(ck, device, first_layer, num_layers, **kwargs)

    def _build_layer(self, t: dict[str, torch.Tensor], fmt: LayerFormat, pruning: str) -> ParallelResidualLayer:
        c = canonical_layer(self.arch, t)
        del t
        if pruning == "structured":
            c = prune_structured(self.arch, c)
        return ParallelResidualLayer(self.arch, c, fmt, self.tp)

    def _rope_tables(
        self, positions: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.arch, positions, device, dtype)

    @property
    def can_fuse(self) -> bool:
        return False  # the engine's fused Triton decode kernels are written for the Llama layers

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            return x
        # The last stage holds the final LayerNorm and the head.
        assert self.norm is not None and self.norm_bias is not None and self.lm_head is not None
        logits = F.linear(
            layer_norm(x, (self.norm, self.norm_bias), self.arch.rms_norm_eps), self.lm_head, self.lm_head_bias
        )
        if self.tp.collectives:
            logits = self.tp.all_gather_columns(logits)[:, : self.arch.vocab_size]
        return logits.float()


__all__ = [
    "FAMILIES",
    "ParallelResidualLayer",
    "ParallelResidualStage",
    "apply_rope",
    "canonical_layer",
    "prune_structured",
    "rope_tables",
]
