"""Falcon, GPT-J and GPT-NeoX: configs, tensor layouts, fingerprints, and the engine's layers against
a plain float64 reference written from the published model definitions (Hugging Face's
``modeling_falcon.py``, ``modeling_gptj.py``, ``modeling_gpt_neox.py``): explicit loops over heads,
an explicit causal softmax, RoPE as rotations of coordinate pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iserve.checkpoint import arch_from_config, expected_tensors, layer_tensor_shapes, scan_checkpoint, weight_breakdown
from iserve.errors import CheckpointError, UnsupportedModel
from iserve.fingerprint import estimator as est
from iserve.fingerprint.generator import make_fingerprints
from iserve.gpu_agent.engine import Engine
from iserve.gpu_agent.profiling import variant_kwargs
from iserve.messages import Configuration, ProfileVariant
from iserve.modelmaker import make_checkpoint, preset_config

torch.set_num_threads(1)


def test_real_configs_parse_to_the_published_shapes():
    falcon = arch_from_config(preset_config("falcon-7b"))
    assert (falcon.family, falcon.num_layers, falcon.hidden_size, falcon.num_attention_heads, falcon.num_kv_heads) == (
        "falcon",
        32,
        4544,
        71,
        1,
    )
    assert (
        falcon.head_dim,
        falcon.intermediate_size,
        falcon.qkv_layout,
        falcon.tie_embeddings,
        falcon.layer_norms,
    ) == (64, 18176, "grouped", True, 1)
    gptj = arch_from_config(preset_config("gpt-j-6b"))
    assert (
        gptj.num_layers,
        gptj.hidden_size,
        gptj.head_dim,
        gptj.rotary_dim,
        gptj.rotary_interleaved,
        gptj.activation,
    ) == (28, 4096, 256, 64, True, "gelu_tanh")
    neox = arch_from_config(preset_config("gpt-neox-20b"))
    assert (
        neox.num_layers,
        neox.hidden_size,
        neox.head_dim,
        neox.rotary_dim,
        neox.qkv_layout,
        neox.parallel_residual,
    ) == (44, 6144, 96, 24, "per_head", True)
    # the parameter counts of the published models
    for preset, billions in (("falcon-7b", 6.92), ("gpt-j-6b", 6.05), ("gpt-neox-20b", 20.55), ("pythia-6.9b", 6.86)):
        arch = arch_from_config(preset_config(preset))
        params = sum(math.prod(s) for s in expected_tensors(arch).values())
        assert params / 1e9 == pytest.approx(billions, abs=0.02), preset
    # the original RefinedWeb config of Falcon-7B (n_head, n_layer keys)
    rw = {
        "model_type": "RefinedWebModel",
        "hidden_size": 4544,
        "n_head": 71,
        "n_layer": 32,
        "vocab_size": 65024,
        "multi_query": True,
        "parallel_attn": True,
        "bias": False,
        "alibi": False,
    }
    a = arch_from_config(rw)
    assert (a.family, a.num_layers, a.num_kv_heads) == ("falcon", 32, 1)


@pytest.mark.parametrize(
    "cfg, exc, words",
    [
        ({**preset_config("falcon-7b"), "alibi": True}, UnsupportedModel, "ALiBi"),
        ({**preset_config("gpt-j-6b"), "rotary_dim": 63}, CheckpointError, "rotary dimension"),
        ({**preset_config("gpt-neox-20b"), "num_attention_heads": 7}, CheckpointError, "divisible"),
        ({**preset_config("gpt-neox-20b"), "hidden_act": "relu6"}, UnsupportedModel, "activation"),
        (
            {"model_type": "bart", "architectures": ["BartForConditionalGeneration"], "is_encoder_decoder": True},
            UnsupportedModel,
            "decoder-only",
        ),
        ({"model_type": "bloom", "architectures": ["BloomForCausalLM"]}, UnsupportedModel, "not supported"),
    ],
)
def test_bad_configs_are_refused_with_a_reason(cfg, exc, words):
    with pytest.raises(exc, match=words):
        arch_from_config(cfg)


@pytest.fixture(scope="module", params=["tiny-falcon", "tiny-gptj", "tiny-neox", "tiny-falcon-mq", "tiny-neox-seq"])
def model(request, tmp_path_factory) -> Path:
    preset, overrides = request.param, {}
    if preset == "tiny-falcon-mq":  # Falcon-7B's layout: multi-query, one norm, old architecture
        preset, overrides = (
            "tiny-falcon",
            {"new_decoder_architecture": False, "multi_query": True, "num_kv_heads": None},
        )
    if preset == "tiny-neox-seq":  # NeoX without the parallel residual
        preset, overrides = "tiny-neox", {"use_parallel_residual": False}
    return make_checkpoint(
        tmp_path_factory.mktemp(request.param) / "m", preset, num_layers=3, seed=3, std=0.1, overrides=overrides
    )


def test_fingerprints_of_every_family(model, tmp_path):
    ck = scan_checkpoint(model)
    infos = make_fingerprints(ck, tmp_path)
    for info in infos:
        fp = scan_checkpoint(info.path)
        assert fp.arch.num_layers == info.num_layers and fp.arch.family == ck.arch.family
        assert set(fp.tensors) == set(expected_tensors(fp.arch))
        cfg = json.loads((Path(info.path) / "config.json").read_text())
        key = "n_layer" if ck.arch.family == "gptj" else "num_hidden_layers"
        assert cfg[key] == info.num_layers
        # weights the estimator subtracts = the fingerprint's tensors (fp16 stored and served)
        w = weight_breakdown(ck)
        assert est.fingerprint_weight_bytes(ck.arch, w, ProfileVariant(), info.num_layers) == info.bytes


def test_missing_tensor_is_a_checkpoint_error(tmp_path):
    d = make_checkpoint(tmp_path / "neox", "tiny-neox", num_layers=2)
    from safetensors.torch import save_file

    t = load_file(str(d / "model.safetensors"))
    del t["gpt_neox.layers.1.attention.dense.bias"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor"):
        scan_checkpoint(d)


# ---------------------------------------------------------------------------------------------------
# the reference


def _ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _act(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rotate(v, pos, r, theta, interleaved):
    """Rotate the first ``r`` coordinates of one head's vector ``v`` at position ``pos``."""
    out = v.clone()
    for i in range(r // 2):
        f = 1.0 / theta ** (2 * i / r)
        c, s = math.cos(pos * f), math.sin(pos * f)
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + r // 2)
        out[a] = v[a] * c - v[b] * s
        out[b] = v[b] * c + v[a] * s
    return out


def reference_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    cfg = json.loads((model_dir / "config.json").read_text())
    arch = arch_from_config(cfg)
    W = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    nh, d, eps = arch.num_attention_heads, arch.head_dim, arch.rms_norm_eps
    kvh = arch.num_kv_heads
    r = arch.rotary_dim or d
    T = len(ids)
    fam = arch.family
    if fam == "falcon":
        pre, emb, lnf, head = "transformer.h.{}.", "transformer.word_embeddings.weight", "transformer.ln_f", None
    elif fam == "gptj":
        pre, emb, lnf, head = "transformer.h.{}.", "transformer.wte.weight", "transformer.ln_f", "lm_head"
    else:
        pre, emb, lnf, head = (
            "gpt_neox.layers.{}.",
            "gpt_neox.embed_in.weight",
            "gpt_neox.final_layer_norm",
            "embed_out",
        )
    h = W[emb][ids]
    out_b: torch.Tensor | float
    up_b: torch.Tensor | float
    down_b: torch.Tensor | float
    for layer in range(arch.num_layers):
        p = pre.format(layer)
        g = lambda n: W[p + n]  # noqa: E731
        gb = lambda n: W.get(p + n, torch.zeros(1, dtype=torch.float64))  # noqa: E731
        if fam == "gptj":
            a_in = m_in = _ln(h, g("ln_1.weight"), g("ln_1.bias"), eps)
            q, k, v = (a_in @ g(f"attn.{n}_proj.weight").T for n in "qkv")
            q, k, v = (x.view(T, nh, d) for x in (q, k, v))
            out_w, out_b = g("attn.out_proj.weight"), 0.0
            up, up_b, down, down_b = (
                g("mlp.fc_in.weight"),
                g("mlp.fc_in.bias"),
                g("mlp.fc_out.weight"),
                g("mlp.fc_out.bias"),
            )
            parallel, second_norm = True, None
        elif fam == "gpt_neox":
            a_in = _ln(h, g("input_layernorm.weight"), g("input_layernorm.bias"), eps)
            qkv = (a_in @ g("attention.query_key_value.weight").T + gb("attention.query_key_value.bias")).view(
                T, nh, 3, d
            )
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            out_w, out_b = g("attention.dense.weight"), gb("attention.dense.bias")
            up, up_b = g("mlp.dense_h_to_4h.weight"), gb("mlp.dense_h_to_4h.bias")
            down, down_b = g("mlp.dense_4h_to_h.weight"), gb("mlp.dense_4h_to_h.bias")
            parallel, second_norm = arch.parallel_residual, "post_attention_layernorm"
            m_in = _ln(h, g(second_norm + ".weight"), g(second_norm + ".bias"), eps)
        else:  # falcon
            if arch.layer_norms == 2:
                a_in = _ln(h, g("ln_attn.weight"), g("ln_attn.bias"), eps)
                m_in = _ln(h, g("ln_mlp.weight"), g("ln_mlp.bias"), eps)
            else:
                a_in = m_in = _ln(h, g("input_layernorm.weight"), g("input_layernorm.bias"), eps)
            fused = a_in @ g("self_attention.query_key_value.weight").T
            grp = nh // kvh
            x = fused.view(T, kvh, grp + 2, d)
            q = x[:, :, :grp].reshape(T, nh, d)
            k, v = x[:, :, grp], x[:, :, grp + 1]
            out_w, out_b = g("self_attention.dense.weight"), 0.0
            up, up_b, down, down_b = g("mlp.dense_h_to_4h.weight"), 0.0, g("mlp.dense_4h_to_h.weight"), 0.0
            parallel, second_norm = True, None
        attn = torch.zeros(T, nh * d, dtype=torch.float64)
        for head_i in range(nh):
            kv_i = head_i // (nh // k.shape[1])
            qs = torch.stack([_rotate(q[t, head_i], t, r, arch.rope_theta, arch.rotary_interleaved) for t in range(T)])
            ks = torch.stack([_rotate(k[t, kv_i], t, r, arch.rope_theta, arch.rotary_interleaved) for t in range(T)])
            scores = qs @ ks.T / math.sqrt(d)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            attn[:, head_i * d : (head_i + 1) * d] = torch.softmax(scores, -1) @ v[:, kv_i]
        attn_out = attn @ out_w.T + out_b
        if parallel:
            h = h + attn_out + (_act(arch.activation, m_in @ up.T + up_b) @ down.T + down_b)
        else:
            h = h + attn_out
            assert second_norm is not None
            m_in = _ln(h, g(second_norm + ".weight"), g(second_norm + ".bias"), eps)
            h = h + _act(arch.activation, m_in @ up.T + up_b) @ down.T + down_b
    h = _ln(h, W[lnf + ".weight"], W[lnf + ".bias"], eps)
    if head is None:
        return h @ W[emb].T
    return h @ W[head + ".weight"].T + W.get(head + ".bias", torch.zeros(1, dtype=torch.float64))


def test_engine_matches_the_reference(model):
    ck = scan_checkpoint(model)
    engine = Engine.load(model, [("cpu", 0, ck.arch.num_layers)], 64)
    ids = [5, 77, 120, 3, 250, 18, 99, 42, 7, 201, 33]
    ref = reference_logits(model, ids)
    got = engine.prefill(ids, all_positions=True).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # decode through the KV cache gives the same logits as the full prefill
    engine.prefill(ids[:4])
    for pos in range(4, len(ids)):
        torch.testing.assert_close(engine.decode(ids[pos], pos).double(), ref[pos], rtol=1e-4, atol=1e-4)
    res = engine.generate(ids, max_tokens=4, ignore_eos=True)
    assert len(res.tokens) == 4 and res.tokens[0] == int(ref[-1].argmax())


@pytest.mark.parametrize(
    "variant",
    [
        ProfileVariant(weight_quant="int8"),
        ProfileVariant(weight_quant="int4"),
        ProfileVariant(kv_quant="int8"),
        ProfileVariant(pruning="2:4"),
        ProfileVariant(pruning="structured"),
    ],
    ids=lambda v: v.key(),
)
def test_every_variant_runs_and_stores_what_the_estimator_says(model, variant):
    ck = scan_checkpoint(model)
    w = weight_breakdown(ck)
    engine = Engine.load(model, [("cpu", 0, ck.arch.num_layers)], 64, **variant_kwargs(variant))
    assert len(engine.generate([5, 6, 7, 8], max_tokens=3, ignore_eos=True).tokens) == 3
    if variant.weight_quant == "int4" or variant.pruning == "2:4":
        return  # on the CPU these keep reference (unpacked / dense) layouts; CUDA stores the formula's bytes
    # fp32 on the CPU: the estimator's 16-bit bytes times 2, except int8 values (1 byte) and their scales
    lw = est.layer_weights(ck.arch, w, variant.weight_quant, variant.pruning)
    served = engine.weight_bytes()
    per_layer = (
        served
        - sum(
            t.numel() * 4
            for t in (engine.stages[0].embed, engine.stages[0].norm, engine.stages[0].norm_bias)
            if t is not None
        )
        - (0 if ck.arch.tie_embeddings else engine.stages[0].lm_head.numel() * 4)
        - (engine.stages[0].lm_head_bias.numel() * 4 if engine.stages[0].lm_head_bias is not None else 0)
    ) // ck.arch.num_layers
    if variant.weight_quant == "fp16":
        assert per_layer == (lw.linear_bytes + lw.other_bytes) * 2
    else:  # int8 values + fp32 row scales + fp32 norms and biases
        rows = sum(s[0] for s in layer_tensor_shapes(est.pruned_arch(ck.arch, variant.pruning)).values() if len(s) == 2)
        assert per_layer == lw.linear_bytes - rows * 2 + rows * 4 + lw.other_bytes * 2
    if variant.kv_quant == "int8":
        kv = est.kv_cache_bytes_per_layer(ck.arch, Configuration(kv_quant="int8"), 64)
        assert engine.kv_cache_bytes() == ck.arch.num_layers * (
            kv + kv // (ck.arch.head_dim + 2) * 2
        )  # fp32 scales on the CPU
