"""The fingerprint controller's pure core: the Generator (fingerprint checkpoints from real tensors)
and the Estimator (configurations, exclusions, paper L2/M2 estimates)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import msgspec
import pytest

import iserve.checkpoint as checkpoint
from iserve.checkpoint import expected_tensors, layer_tensor_shapes, other_tensor_shapes, scan_checkpoint
from iserve.errors import UnsupportedModel
from iserve.fingerprint import estimator as est
from iserve.fingerprint.generator import fingerprint_tensor_names, make_fingerprints, write_fingerprint
from iserve.messages import (
    ArchSpec,
    Configuration,
    FingerprintMeasurement,
    ProfileVariant,
    ProfilingCost,
    PromptTiming,
    WeightBreakdown,
)
from iserve.modelmaker import make_checkpoint

ENGINE_CAPS = {"tp": [1], "weight_quant": ["fp16"], "kv_quant": ["fp16"], "pruning": ["none"], "families": ["llama"]}


# ---------------------------------------------------------------------------------------------------
# generator


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = make_checkpoint(tmp_path_factory.mktemp("tiny") / "model", "tiny-llama", shards=3, seed=7)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "tokenizer_config.json").write_text("{}")
    return d


def _raw(entry: checkpoint.TensorEntry) -> bytes:
    with open(entry.file, "rb") as f:
        f.seek(entry.begin)
        return f.read(entry.nbytes)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_fingerprint_has_exactly_the_tensors_of_a_small_model_byte_identical(tiny, tmp_path, num_layers):
    ck = scan_checkpoint(tiny)
    assert len(ck.files) == 3
    info = write_fingerprint(ck, tmp_path / "fp", num_layers)

    fp = scan_checkpoint(info.path)  # validates: every tensor a num_layers-layer model needs, right shapes
    assert fp.arch.num_layers == num_layers
    assert set(fp.tensors) == set(expected_tensors(fp.arch))
    assert set(fp.tensors) == set(fingerprint_tensor_names(ck, num_layers))
    for name, entry in fp.tensors.items():
        src = ck.tensors[name]
        assert (entry.dtype, entry.shape) == (src.dtype, src.shape)
        assert _raw(entry) == _raw(src), name

    want_cfg = dict(ck.config, num_hidden_layers=num_layers)
    assert json.loads((Path(info.path) / "config.json").read_text()) == want_cfg
    assert (Path(info.path) / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (Path(info.path) / "tokenizer_config.json").is_file()

    assert info.num_layers == num_layers and not info.reused
    assert info.bytes == fp.data_bytes
    assert info.fraction == pytest.approx(fp.data_bytes / ck.data_bytes)
    assert 0 < info.fraction < 1


def test_generator_reads_only_the_fingerprint_tensors(tiny, tmp_path, monkeypatch):
    ck = scan_checkpoint(tiny)
    asked: list[str] = []
    real = checkpoint.load_tensors

    def recording(ck_, names, device="cpu"):
        asked.extend(names)
        return real(ck_, names, device)

    monkeypatch.setattr(checkpoint, "load_tensors", recording)
    write_fingerprint(ck, tmp_path / "fp", 1)
    assert sorted(asked) == sorted(fingerprint_tensor_names(ck, 1))
    assert not any(n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3.")) for n in asked)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(asked)


def test_fingerprint_write_is_idempotent_and_atomic(tiny, tmp_path, monkeypatch):
    ck = scan_checkpoint(tiny)
    out = tmp_path / "fp"
    first = write_fingerprint(ck, out, 2)
    st = (out / "model.safetensors").stat()

    again = write_fingerprint(ck, out, 2)
    assert again.reused and again.bytes == first.bytes and again.path == first.path
    assert (out / "model.safetensors").stat().st_ino == st.st_ino  # not rewritten

    # A failure half-way leaves no fingerprint and no temporary folder behind.
    calls = 0
    real = checkpoint.load_tensors

    def failing(ck_, names, device="cpu"):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk unplugged")
        return real(ck_, names, device)

    monkeypatch.setattr(checkpoint, "load_tensors", failing)
    with pytest.raises(OSError):
        write_fingerprint(ck, tmp_path / "other", 1)
    assert not (tmp_path / "other").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["fp"]
    monkeypatch.setattr(checkpoint, "load_tensors", real)

    # Something else at the target (another checkpoint's fingerprint, junk) is replaced whole.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "stray.txt").write_text("x")
    info = write_fingerprint(ck, junk, 1)
    assert not info.reused and not (junk / "stray.txt").exists()
    assert scan_checkpoint(junk).arch.num_layers == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp", "junk"]


def test_identical_checkpoints_at_two_paths_share_one_published_fingerprint(tiny, tmp_path):
    """Two registrations of the same checkpoint from different folders write the same fingerprint
    folder (named by the digest) concurrently: the second to publish keeps the first's folder (a
    profile may be reading it) instead of moving it aside. Seen as 'changed while it was being
    written' in the services tests, which register two copies of one model at once."""
    from iserve.fingerprint import generator

    ck = scan_checkpoint(tiny)
    out = tmp_path / "fp"
    write_fingerprint(ck, out, 1)
    inode = (out / "model.safetensors").stat().st_ino
    # The other writer's finished folder: the same fingerprint, read from another path.
    tmp = tmp_path / ".fp.tmp-other"
    write_fingerprint(ck, tmp, 1)
    marker = json.loads((tmp / generator.MARKER).read_text())
    marker["source_path"] = str(tmp_path / "model-b")
    (tmp / generator.MARKER).write_text(json.dumps(marker))
    generator._publish(tmp, out)
    assert (out / "model.safetensors").stat().st_ino == inode and not tmp.exists()
    assert json.loads((out / generator.MARKER).read_text())["source_path"] == ck.path
    # A different fingerprint at the target is still replaced.
    write_fingerprint(ck, tmp, 2)
    generator._publish(tmp, out)
    assert scan_checkpoint(out).arch.num_layers == 2


def test_make_fingerprints_layout_and_limits(tiny, tmp_path):
    ck = scan_checkpoint(tiny)
    infos = make_fingerprints(ck, tmp_path)
    assert [i.num_layers for i in infos] == [1, 2]
    assert [Path(i.path) for i in infos] == [tmp_path / ck.digest[:16] / "L1", tmp_path / ck.digest[:16] / "L2"]
    assert infos[0].bytes < infos[1].bytes
    # one layer's bytes is the difference of the two fingerprints
    layer = sum(ck.tensors[n].nbytes for n in ck.tensors if n.startswith("model.layers.0."))
    assert infos[1].bytes - infos[0].bytes == layer
    assert all(i.reused for i in make_fingerprints(ck, tmp_path))

    one = scan_checkpoint(make_checkpoint(tmp_path / "one", "tiny-llama", num_layers=1))
    with pytest.raises(UnsupportedModel):
        make_fingerprints(one, tmp_path / "w")


def test_fingerprint_of_tied_and_moe_models(tmp_path):
    tied = scan_checkpoint(make_checkpoint(tmp_path / "tied", "tiny-llama", overrides={"tie_word_embeddings": True}))
    fp = scan_checkpoint(write_fingerprint(tied, tmp_path / "tied-fp", 1).path)
    assert "lm_head.weight" not in fp.tensors and fp.arch.tie_embeddings

    moe = scan_checkpoint(make_checkpoint(tmp_path / "moe", "tiny-mixtral", dtype="bfloat16"))
    fp = scan_checkpoint(write_fingerprint(moe, tmp_path / "moe-fp", 2).path)
    assert fp.arch.num_experts == 4 and set(fp.tensors) == set(expected_tensors(fp.arch))
    assert all(_raw(e) == _raw(moe.tensors[n]) for n, e in fp.tensors.items())


# ---------------------------------------------------------------------------------------------------
# configurations and exclusions


def _arch(heads=32, kv=8, layers=32, hidden=4096, ffn=14336, vocab=128256, **kw) -> ArchSpec:
    return ArchSpec(
        family=kw.pop("family", "llama"),
        model_type=kw.pop("model_type", "llama"),
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position=8192,
        **kw,
    )


def _weights(arch: ArchSpec) -> WeightBreakdown:
    layer = layer_tensor_shapes(arch)
    others = other_tensor_shapes(arch)
    return WeightBreakdown(
        embed_params=math.prod(others["model.embed_tokens.weight"]),
        head_params=math.prod(others["lm_head.weight"]) if "lm_head.weight" in others else 0,
        final_norm_params=arch.hidden_size,
        layer_linear_params=sum(math.prod(s) for s in layer.values() if len(s) == 2),
        layer_other_params=sum(math.prod(s) for s in layer.values() if len(s) != 2),
        checkpoint_bytes=0,
    )


def test_enumerate_configurations_counts_and_tp_divisibility():
    knobs = 3 * 2 * 3
    configs = est.enumerate_configurations(_arch(32, 8), 8)
    # TP 1: PP 1..8, TP 2: PP 1..4, TP 4: PP 1..2, TP 8: PP 1
    assert len(configs) == (8 + 4 + 2 + 1) * knobs
    assert len(set(configs)) == len(configs)
    assert all(c.gpus <= 8 for c in configs)

    qwen = est.enumerate_configurations(_arch(28, 4, layers=28, hidden=3584), 8)
    assert {c.tp for c in qwen} == {1, 2, 4}  # 8 divides neither 28 heads nor 4 KV heads
    assert len(qwen) == (8 + 4 + 2) * knobs

    shallow = est.enumerate_configurations(_arch(32, 8, layers=2), 8)
    assert max(c.pp for c in shallow) == 2
    assert len(shallow) == (2 + 2 + 2 + 1) * knobs
    assert len(est.enumerate_configurations(_arch(), 1)) == knobs

    variants = est.measurement_variants(configs)
    assert len(variants) == 4 * knobs  # one per TP degree and knob setting, none per PP
    assert variants[0] == ProfileVariant()


def test_split_supported_gives_every_exclusion_a_reason():
    arch = _arch(32, 8, layers=32)
    configs = est.enumerate_configurations(arch, 8)
    supported, excluded = est.split_supported(configs, ENGINE_CAPS, arch=arch)
    assert len(supported) + len(excluded) == len(configs)
    assert sorted(c.pp for c in supported) == list(range(1, 9))  # every PP of TP1 fp16, no pruning
    assert all((c.tp, c.weight_quant, c.kv_quant, c.pruning) == (1, "fp16", "fp16", "none") for c in supported)
    reasons = {e.config: e.reason for e in excluded}
    assert all(reasons.values())
    assert (
        reasons[Configuration(weight_quant="int8")]
        == "the torch engine does not implement int8 weight quantization yet"
    )
    assert reasons[Configuration(tp=2, kv_quant="int8")] == (
        "the torch engine does not implement tensor parallelism of degree 2 or int8 KV-cache quantization yet"
    )
    assert "2:4 sparsity pruning" in reasons[Configuration(pruning="2:4")]

    # With the engine able to do everything, the architecture still rules out some: 8 KV heads
    # pruned to 6 cannot be split over 4 ranks.
    everything = {"engine": "trt"}
    supported, excluded = est.split_supported(configs, everything, arch=arch)
    assert excluded and all(e.config.pruning == "structured" and e.config.tp in (4, 8) for e in excluded)
    assert "structured pruning" in excluded[0].reason and "6 KV heads" in excluded[0].reason

    moe = _arch(family="mixtral", model_type="mixtral", num_experts=8, experts_per_token=2)
    _, excluded = est.split_supported([Configuration()], ENGINE_CAPS, arch=moe)
    assert excluded[0].reason == "the torch engine does not implement the mixtral architecture family yet"


# ---------------------------------------------------------------------------------------------------
# exact weights and KV cache


def test_quantized_and_pruned_weight_bytes():
    r, c = 4096, 11008
    assert est.linear_weight_bytes(r, c, "fp16") == r * c * 2
    assert est.linear_weight_bytes(r, c, "int8") == r * c + r * 2
    assert est.linear_weight_bytes(r, c, "int4") == r * c // 2 + r * math.ceil(c / 128) * 4
    assert est.linear_weight_bytes(r, c, "fp16", "2:4") == r * c + r * c // 8
    # the engine quantizes the pruned dense matrix (no quantized 2:4 kernel): zeros are stored
    assert est.linear_weight_bytes(r, c, "int8", "2:4") == est.linear_weight_bytes(r, c, "int8")
    assert est.linear_weight_bytes(r, c, "int4", "2:4") == est.linear_weight_bytes(r, c, "int4")
    # int4 rows are padded to whole groups of 128 columns (Falcon-7B's 4544 = 35.5 groups)
    assert est.linear_weight_bytes(4672, 4544, "int4") == 4672 * 36 * 64 + 4672 * 36 * 4

    arch = _arch(32, 32, hidden=4096, ffn=11008, vocab=32000)  # Llama-2-7B shapes
    w = _weights(arch)
    fp16 = est.layer_weights(arch, w, "fp16", "none")
    assert fp16.linear_bytes == w.layer_linear_params * 2 and fp16.other_bytes == w.layer_other_params * 2
    assert w.layer_linear_params == 4 * 4096 * 4096 + 3 * 4096 * 11008
    int8 = est.layer_weights(arch, w, "int8", "none")
    assert int8.linear_bytes == w.layer_linear_params + 2 * (4 * 4096 + 2 * 11008 + 4096)
    # quantization never touches embedding, norms or head
    assert est.first_stage_weight_bytes(w, 1) == 32000 * 4096 * 2
    assert est.last_stage_weight_bytes(arch, w, 1, 1) == (32000 * 4096 + 4096) * 2
    # structured pruning: 32 -> 24 heads (and KV heads), 11008 -> 8256 FFN channels
    pruned = est.layer_weights(arch, w, "fp16", "structured")
    assert pruned.linear_bytes == 2 * (4 * 4096 * 24 * 128 + 3 * 4096 * 8256)
    assert pruned.other_bytes == fp16.other_bytes
    gqa = est.pruned_arch(_arch(32, 8), "structured")
    assert (gqa.num_attention_heads, gqa.num_kv_heads, gqa.intermediate_size) == (24, 6, 10752)
    mqa = est.pruned_arch(_arch(32, 2), "structured")
    assert (mqa.num_attention_heads, mqa.num_kv_heads) == (24, 2)

    with pytest.raises(ValueError, match="does not match"):
        est.layer_weights(arch, msgspec.structs.replace(w, layer_linear_params=1), "fp16", "none")


def test_kv_cache_scales_with_context_and_int8_halves_it():
    arch = _arch(32, 8)
    kv = est.kv_cache_bytes_per_layer(arch, Configuration(), 4096)
    assert kv == 2 * 8 * 128 * 4096 * 2
    assert est.kv_cache_bytes_per_layer(arch, Configuration(), 8192) == 2 * kv
    # int8: one byte per element plus a 16-bit scale per head and position (the engine's KVCache)
    assert est.kv_cache_bytes_per_layer(arch, Configuration(kv_quant="int8"), 4096) == 2 * 8 * 4096 * (128 + 2)
    assert est.kv_cache_bytes_per_layer(arch, Configuration(tp=2), 4096) * 2 == kv
    assert est.kv_cache_bytes_per_layer(arch, Configuration(pruning="structured"), 4096) == kv * 6 // 8


# ---------------------------------------------------------------------------------------------------
# L2 / M2 estimates from synthetic measurements of a known linear ground truth

TTFT_LAYER = (0.9, 0.011, 2.0e-6)  # ms, ms/token, ms/token^2 of one hidden layer
TTFT_OTHER = (3.5, 0.004, 1.0e-7)
TPOT_LAYER, TPOT_OTHER = 0.14, 0.9
ACT_LAYER, OVERHEAD = 6 * 2**20, 700 * 2**20
PROFILE_CONTEXT = 512


def _truth_ttft(n: int, p: int, layer=TTFT_LAYER, other=TTFT_OTHER) -> float:
    return n * (layer[0] + layer[1] * p + layer[2] * p * p) + other[0] + other[1] * p + other[2] * p * p


def _measure(arch, w, variant: ProfileVariant, n: int, prompts, *, slope=1.0, nvml=0) -> FingerprintMeasurement:
    cfg = Configuration(
        tp=variant.tp, weight_quant=variant.weight_quant, kv_quant=variant.kv_quant, pruning=variant.pruning
    )
    kv = n * est.kv_cache_bytes_per_layer(arch, cfg, PROFILE_CONTEXT)
    weights = est.fingerprint_weight_bytes(arch, w, variant, n)
    return FingerprintMeasurement(
        num_layers=n,
        variant=variant,
        ttft=[PromptTiming(prompt_tokens=p, ttft_ms=slope * _truth_ttft(n, p)) for p in prompts],
        tpot_ms=slope * (n * TPOT_LAYER + TPOT_OTHER),
        decode_steps=24,
        peak_bytes=weights + kv + n * ACT_LAYER + OVERHEAD,
        nvml_peak_bytes=nvml,
        weight_bytes=weights,
        kv_cache_bytes=kv,
    )


def test_fit_estimates_recovers_a_linear_ground_truth_exactly():
    arch = _arch(32, 8, layers=32)  # Llama-3-8B shapes
    w = _weights(arch)
    v = ProfileVariant()
    prompts = [32, 128, 512, 1024]
    ms = [_measure(arch, w, v, n, prompts) for n in (1, 2)]
    # the fingerprint weights the estimator subtracts are the plain fp16 bytes
    assert (
        ms[0].weight_bytes
        == (w.embed_params + w.head_params + w.final_norm_params + w.layer_linear_params + w.layer_other_params) * 2
    )

    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=4096, gpu_memory_bytes=80 * 2**30)
    L = 32
    assert e.num_layers == L and e.method == "fingerprint"
    assert e.ttft_base_ms == pytest.approx(L * TTFT_LAYER[0] + TTFT_OTHER[0], rel=1e-9)
    assert e.ttft_per_token_ms == pytest.approx(L * TTFT_LAYER[1] + TTFT_OTHER[1], rel=1e-9)
    assert e.ttft_per_token2_ms == pytest.approx(L * TTFT_LAYER[2] + TTFT_OTHER[2], rel=1e-7)
    for p in (1, 700, 4000):
        assert e.ttft_ms(p) == pytest.approx(_truth_ttft(L, p), rel=1e-9)
    assert e.tpot_ms == pytest.approx(L * TPOT_LAYER + TPOT_OTHER, rel=1e-12)
    assert e.latency_ms(512, 128) == pytest.approx(_truth_ttft(L, 512) + 127 * (L * TPOT_LAYER + TPOT_OTHER), rel=1e-9)

    layer_w = (w.layer_linear_params + w.layer_other_params) * 2
    kv_4096 = 2 * 8 * 128 * 4096 * 2
    assert e.layer_bytes == layer_w + kv_4096 + ACT_LAYER
    assert e.first_stage_bytes == w.embed_params * 2
    assert e.last_stage_bytes == (w.head_params + w.final_norm_params) * 2
    assert e.gpu_overhead_bytes == OVERHEAD
    full_model_peak = (
        OVERHEAD + L * (layer_w + kv_4096 + ACT_LAYER) + (w.embed_params + w.head_params + w.final_norm_params) * 2
    )
    assert e.stage_bytes(L, first=True, last=True) == full_model_peak == e.total_bytes

    # two prompt lengths: a line in p, still exact where the truth is a line
    lin = dict(layer=(TTFT_LAYER[0], TTFT_LAYER[1], 0.0), other=(TTFT_OTHER[0], TTFT_OTHER[1], 0.0))
    ms2 = [_measure(arch, w, v, n, [64, 256]) for n in (1, 2)]
    for m in ms2:
        m.ttft = [
            PromptTiming(prompt_tokens=t.prompt_tokens, ttft_ms=_truth_ttft(m.num_layers, t.prompt_tokens, **lin))
            for t in m.ttft
        ]
    [e2] = est.fit_estimates(arch, w, ms2, [Configuration()], context_tokens=4096)
    assert e2.ttft_per_token2_ms == 0.0
    assert e2.ttft_ms(3000) == pytest.approx(_truth_ttft(L, 3000, **lin), rel=1e-9)


def test_estimates_follow_variant_quantization_context_and_tp():
    arch = _arch(32, 8, layers=32)
    w = _weights(arch)
    variants = [
        ProfileVariant(),
        ProfileVariant(kv_quant="int8"),
        ProfileVariant(weight_quant="int4"),
        ProfileVariant(tp=2),
    ]
    ms = [_measure(arch, w, v, n, [32, 128, 512], slope=1 + i) for i, v in enumerate(variants) for n in (1, 2)]
    configs = [Configuration(), Configuration(kv_quant="int8"), Configuration(weight_quant="int4"), Configuration(tp=2)]
    base, kv8, w4, tp2 = est.fit_estimates(arch, w, ms, configs, context_tokens=4096)

    # each config uses its own variant's timings
    assert kv8.tpot_ms == pytest.approx(2 * base.tpot_ms) and tp2.tpot_ms == pytest.approx(4 * base.tpot_ms)
    # int8 KV halves the KV cache (plus its 16-bit scales) and nothing else
    kv_fp16 = 2 * 8 * 128 * 4096 * 2
    assert base.layer_bytes - kv8.layer_bytes == kv_fp16 - 2 * 8 * 4096 * (128 + 2)
    # int4 weights: exact formula, everything outside the layers unchanged
    lw4 = est.layer_weights(arch, w, "int4", "none")
    assert w4.layer_bytes == lw4.linear_bytes + lw4.other_bytes + kv_fp16 + ACT_LAYER
    assert lw4.linear_bytes < w.layer_linear_params * 2 // 3
    assert (w4.first_stage_bytes, w4.last_stage_bytes) == (base.first_stage_bytes, base.last_stage_bytes)
    # TP=2: linear weights, KV, embedding and head split; norms and activations per rank
    assert tp2.first_stage_bytes * 2 == base.first_stage_bytes
    assert tp2.layer_bytes == w.layer_linear_params + w.layer_other_params * 2 + kv_fp16 // 2 + ACT_LAYER
    assert tp2.total_bytes == 2 * tp2.stage_bytes(32, first=True, last=True)

    # the KV cache follows the requested context exactly
    [long] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=16384)
    assert long.layer_bytes - base.layer_bytes == 3 * kv_fp16

    with pytest.raises(ValueError, match="not profiled"):
        est.fit_estimates(arch, w, ms, [Configuration(weight_quant="int8")], context_tokens=4096)
    with pytest.raises(ValueError, match="exceeds the GPU"):
        est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=4096, gpu_memory_bytes=2**30)


def test_pipeline_stages_add_memory_but_not_latency():
    arch = _arch(32, 8, layers=32)
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n, [32, 512]) for n in (1, 2)]
    configs = [Configuration(pp=pp) for pp in (1, 2, 4, 8)]
    ests = est.fit_estimates(arch, w, ms, configs, context_tokens=2048)
    totals = [e.total_bytes for e in ests]
    assert totals == sorted(totals) and len(set(totals)) == 4
    assert [t - totals[0] for t in totals] == [(pp - 1) * OVERHEAD for pp in (1, 2, 4, 8)]
    assert len({(e.ttft_base_ms, e.ttft_per_token_ms, e.tpot_ms) for e in ests}) == 1
    # the first of 8 stages (4 layers) holds its layers, the embedding and one GPU's overhead
    pp8 = ests[-1]
    assert pp8.stage_bytes(4, first=True, last=False) == OVERHEAD + 4 * pp8.layer_bytes + pp8.first_stage_bytes
    assert pp8.stage_bytes(4, first=True, last=False) < ests[0].total_bytes / 4

    # a tied head is free at PP=1 but the last stage needs its own copy at PP>1
    tied = _arch(32, 8, layers=32, tie_embeddings=True)
    wt = _weights(tied)
    assert wt.head_params == 0
    mt = [_measure(tied, wt, ProfileVariant(), n, [32, 512]) for n in (1, 2)]
    one, two = est.fit_estimates(tied, wt, mt, [Configuration(), Configuration(pp=2)], context_tokens=2048)
    assert one.last_stage_bytes == wt.final_norm_params * 2
    assert two.last_stage_bytes == (wt.final_norm_params + wt.embed_params) * 2
    assert two.total_bytes - one.total_bytes == OVERHEAD + wt.embed_params * 2


def test_memory_source_and_fit_errors():
    arch = _arch(32, 8, layers=32)
    w = _weights(arch)
    extra = 512 * 2**20  # CUDA context seen by NVML only
    ms = [_measure(arch, w, ProfileVariant(), n, [32, 512]) for n in (1, 2)]
    for m in ms:
        m.nvml_peak_bytes = m.peak_bytes + extra
    [mx] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=512)
    [alloc] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=512, memory_source="allocator")
    assert mx.gpu_overhead_bytes - alloc.gpu_overhead_bytes == extra
    assert mx.layer_bytes == alloc.layer_bytes

    with pytest.raises(ValueError, match="two depths"):
        est.fit_variant(arch, w, ms[:1])
    one_length = [_measure(arch, w, ProfileVariant(), n, [128]) for n in (1, 2)]
    with pytest.raises(ValueError, match="two prompt lengths"):
        est.fit_variant(arch, w, one_length)


def test_build_configuration_map_excludes_with_reasons():
    arch = _arch(32, 8, layers=32)
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n, [32, 128, 512]) for n in (1, 2)]
    caps = dict(ENGINE_CAPS, kv_quant=["fp16", "int8"])  # int8 KV supported but never measured
    cost = ProfilingCost(gpu_seconds=12.5, fingerprint_bytes=[1, 2], fingerprint_fraction=[0.01, 0.02])
    cmap = est.build_configuration_map(
        model="llama-3-8b",
        gpu_type="H100",
        arch=arch,
        weights=w,
        measurements=ms,
        capabilities=caps,
        gpu_memory_bytes=80 * 2**30,
        max_gpus=8,
        context_tokens=4096,
        cost=cost,
        device="cpu",
    )
    all_configs = est.enumerate_configurations(arch, 8)
    assert len(cmap.estimates) + len(cmap.excluded) == len(all_configs)
    assert sorted(e.config.pp for e in cmap.estimates) == list(range(1, 9))
    not_measured = [
        x
        for x in cmap.excluded
        if x.config.kv_quant == "int8"
        and x.config.tp == 1
        and x.config.weight_quant == "fp16"
        and x.config.pruning == "none"
    ]
    assert len(not_measured) == 8 and all("not profiled" in x.reason for x in not_measured)
    assert all(x.reason for x in cmap.excluded)
    assert cmap.cost.gpu_seconds == 12.5 and cmap.context_tokens == 4096 and cmap.gpu_type == "H100"
    assert msgspec.json.decode(msgspec.json.encode(cmap), type=type(cmap)) == cmap


def test_fingerprint_measurements_of_a_real_tiny_model_feed_the_estimator(tiny, tmp_path):
    """The weights the estimator subtracts for a fingerprint equal the fingerprint's real tensor
    bytes (fp16 checkpoint, fp16 serving)."""
    ck = scan_checkpoint(tiny)
    w = checkpoint.weight_breakdown(ck)
    for info in make_fingerprints(ck, tmp_path):
        assert est.fingerprint_weight_bytes(ck.arch, w, ProfileVariant(), info.num_layers) == info.bytes
    assert os.listdir(tmp_path) == [ck.digest[:16]]


def test_a_short_context_model_is_profiled_at_lengths_that_fit_it():
    from iserve.fingerprint.estimator import profiling_lengths

    defaults = ([128, 512, 1024], [16, 64])
    assert profiling_lengths(*defaults, 2048) == ([128, 512, 1024], [16, 64])  # unchanged where they fit
    for context in (512, 1024, 300):
        prompts, outputs = profiling_lengths(*defaults, context)
        assert len(prompts) == 3 and max(prompts) + max(outputs) <= context, (context, prompts, outputs)
    assert profiling_lengths(*defaults, 128) == ([14, 56, 112], [16])
