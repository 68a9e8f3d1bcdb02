"""The engine's logits against an independent, deliberately plain reference implementation.

The reference below is written from the published model definitions, not from the engine's code:
float64, no KV cache, explicit loops over heads and over each token's experts, an explicit causal
(and sliding-window) mask, RoPE as rotations of (i, i + d/2) pairs, and Llama 3.1's frequency
scaling written per frequency as in Meta's reference code. When ``transformers`` is installed, a
second test compares with it as well.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iserve.gpu_agent.engine import Engine
from iserve.modelmaker import make_checkpoint


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(str(f)).items()})
    return out


def _inv_freq(cfg: dict, head_dim: int) -> list[float]:
    theta = cfg.get("rope_theta", 10000.0)
    freqs = [1.0 / theta ** (2 * i / head_dim) for i in range(head_dim // 2)]
    rs = cfg.get("rope_scaling")
    if not rs:
        return freqs
    assert rs["rope_type"] == "llama3"
    factor, lo, hi, old = (
        rs["factor"],
        rs["low_freq_factor"],
        rs["high_freq_factor"],
        rs["original_max_position_embeddings"],
    )
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(f)
        elif wavelen > old / lo:
            out.append(f / factor)
        else:
            s = (old / wavelen - lo) / (hi - lo)
            out.append((1 - s) * f / factor + s * f)
    return out


def _rope(x: torch.Tensor, pos: int, inv_freq: list[float]) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + d/2]) of one head's vector by angle pos * inv_freq[i]."""
    half = len(inv_freq)
    out = x.clone()
    for i, f in enumerate(inv_freq):
        c, s = math.cos(pos * f), math.sin(pos * f)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def _swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate.T
    return (g * torch.sigmoid(g) * (x @ w_up.T)) @ w_down.T


def reference_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Logits ``[len(ids), vocab]`` in float64."""
    cfg = json.loads((model_dir / "config.json").read_text())
    W = _weights(model_dir)
    H, KV = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg["hidden_size"] // H
    eps = cfg["rms_norm_eps"]
    bias = cfg.get("attention_bias", cfg["model_type"] == "qwen2")
    window = cfg.get("sliding_window") if cfg["model_type"] in ("mistral", "mixtral") else None
    inv_freq = _inv_freq(cfg, d)
    T = len(ids)
    x = W["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        q, k, v = (h @ W[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        if bias:
            q, k, v = (t + W[p + f"self_attn.{n}_proj.bias"] for t, n in zip((q, k, v), "qkv"))
        q, k, v = q.view(T, H, d), k.view(T, KV, d), v.view(T, KV, d)
        q = torch.stack([torch.stack([_rope(q[t, hh], t, inv_freq) for hh in range(H)]) for t in range(T)])
        k = torch.stack([torch.stack([_rope(k[t, hh], t, inv_freq) for hh in range(KV)]) for t in range(T)])
        attn = torch.zeros(T, H, d, dtype=torch.float64)
        for hh in range(H):
            kv_head = hh // (H // KV)
            scores = q[:, hh] @ k[:, kv_head].T / math.sqrt(d)
            for i in range(T):
                for j in range(T):
                    if j > i or (window and i - j >= window):
                        scores[i, j] = -math.inf
            attn[:, hh] = torch.softmax(scores, dim=-1) @ v[:, kv_head]
        x = x + attn.reshape(T, H * d) @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if cfg["model_type"] == "mixtral":
            out = torch.zeros_like(h)
            for t in range(T):
                probs = torch.softmax(h[t] @ W[p + "block_sparse_moe.gate.weight"].T, dim=-1)
                top = torch.topk(probs, cfg["num_experts_per_tok"])
                for weight, e in zip(top.values / top.values.sum(), top.indices.tolist()):
                    ep = p + f"block_sparse_moe.experts.{e}."
                    out[t] += weight * _swiglu(h[t], W[ep + "w1.weight"], W[ep + "w3.weight"], W[ep + "w2.weight"])
            x = x + out
        else:
            x = x + _swiglu(
                h, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"], W[p + "mlp.down_proj.weight"]
            )
    x = _rms(x, W["model.norm.weight"], eps)
    head = W["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else W["lm_head.weight"]
    return x @ head.T


SMALL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
CASES = {
    "llama-gqa": ("tiny-llama", {**SMALL}),
    "llama-mha-tied": ("tiny-llama", {**SMALL, "num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-bias": (
        "tiny-llama",
        {**SMALL, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6},
    ),
    "llama3-rope": (
        "tiny-llama",
        {
            **SMALL,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral-window": (
        "tiny-llama",
        {**SMALL, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 5},
    ),
    "mixtral": ("tiny-mixtral", {**SMALL, "num_local_experts": 4}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    preset, overrides = CASES[request.param]
    path = make_checkpoint(
        tmp_path_factory.mktemp(request.param), preset, num_layers=2, overrides=overrides, std=0.1, seed=4
    )
    ids = [1] + [3 + (7 * i * i + 11 * i) % 256 for i in range(11)]
    return request.param, path, ids


def test_prefill_and_decode_match_reference(case):
    name, path, ids = case
    ref = reference_logits(path, ids).float()
    # Two uneven stages, so the hand-over between stages is covered too.
    engine = Engine.load(path, [("cpu", 0, 1), ("cpu", 1, 1)], context_tokens=32)
    torch.testing.assert_close(engine.prefill(ids, all_positions=True), ref, rtol=1e-4, atol=1e-4)
    engine.prefill(ids[:3])
    for pos in range(3, len(ids)):
        torch.testing.assert_close(engine.decode(ids[pos], pos), ref[pos], rtol=1e-4, atol=1e-4)


def test_reference_tells_the_variants_apart(tmp_path):
    """The cases above would pass trivially if the features they cover did not change the logits."""
    ids = [1] + [3 + (7 * i * i + 11 * i) % 256 for i in range(11)]
    base = make_checkpoint(tmp_path / "base", "tiny-llama", num_layers=2, overrides=SMALL, std=0.1, seed=4)
    ref = reference_logits(base, ids)
    for name in ("llama3-rope", "mistral-window"):
        path = make_checkpoint(tmp_path / name, "tiny-llama", num_layers=2, overrides=CASES[name][1], std=0.1, seed=4)
        assert (reference_logits(path, ids) - ref).abs().max() > 1e-3, name


def test_matches_transformers(tmp_path):
    """Only where ``transformers`` is installed (the GPU image has it)."""
    transformers = pytest.importorskip("transformers")
    for name in ("llama-gqa", "qwen2-bias", "llama3-rope", "mistral-window", "mixtral"):
        preset, overrides = CASES[name]
        path = make_checkpoint(
            tmp_path / name, preset, num_layers=2, overrides=overrides, std=0.1, seed=4, dtype="float32"
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path), torch_dtype=torch.float32, attn_implementation="eager"
        )
        ids = [1] + [3 + (7 * i * i + 11 * i) % 256 for i in range(11)]
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
        engine = Engine.load(path, [("cpu", 0, 2)], context_tokens=32)
        torch.testing.assert_close(engine.prefill(ids, all_positions=True), want, rtol=1e-4, atol=1e-4, msg=name)
