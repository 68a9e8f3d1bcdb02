"""Structured pruning of a Llama-family layer: the weakest 25% of FFN channels and attention heads.

The rule is the fingerprint estimator's ``pruned_arch``, so estimated and served shapes agree; see
docs/engine-internals.md#variants. (2:4 sparsity is a weight format: ``quant.make_linear``.)
"""

from __future__ import annotations

import torch

from iserve.messages import ArchSpec


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


def _sq(t: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    return t.float().pow(2).sum(dim=dim)


def prune_structured(arch: ArchSpec, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the weakest 25% of one layer's FFN channels and attention heads (see docs/engine-internals.md#variants).

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
        q_idx = torch.cat([j * group + _keep_largest(q_score[j * group : (j + 1) * group], keep) for j in range(kv)])
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
        mlps = [
            (
                f"block_sparse_moe.experts.{e}.w1.weight",
                f"block_sparse_moe.experts.{e}.w3.weight",
                f"block_sparse_moe.experts.{e}.w2.weight",
            )
            for e in range(arch.num_experts)
        ]
    else:
        mlps = [("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]
    for gate, up, down in mlps:
        score = _sq(t[gate], 1) + _sq(t[up], 1) + _sq(t[down], 0)
        idx = _keep_largest(score, kept_f)
        out[gate], out[up], out[down] = t[gate][idx], t[up][idx], t[down][:, idx]
    return out
