"""The torch engine on CPU: generation, pipeline stages, KV cache, sampling, errors, fingerprints."""

from __future__ import annotations

import pytest
import torch

from iserve.errors import BadRequest, CheckpointError, PromptTooLong, UnsupportedModel
from iserve.gpu_agent.engine.capabilities import CAPABILITIES
from iserve.gpu_agent.engine.runner import Engine
from iserve.gpu_agent.profiling import gpu_type_of, measure_fingerprint
from iserve.messages import FingerprintMeasurement, ProfileVariant
from iserve.modelmaker import make_checkpoint

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    """A 6-layer tiny Llama (GQA), weights with a larger spread so attention is far from uniform."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny6"), "tiny-llama", num_layers=6, std=0.08, seed=1)


@pytest.fixture(scope="module")
def engine6(tiny6):
    return Engine.load(tiny6, [("cpu", 0, 6)], context_tokens=96)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("mixtral"),
        "tiny-mixtral",
        num_layers=3,
        std=0.08,
        seed=2,
        overrides={"num_local_experts": 3},
    )


def test_properties(engine6):
    assert engine6.arch.num_layers == 6
    assert engine6.context_tokens == 96
    assert engine6.devices == ["cpu"]
    assert engine6.timer == "perf_counter"
    assert engine6.tokenizer.encode("a") == [1, ord("a") + 3]
    (mem,) = engine6.memory_bytes()
    # float32 on CPU: parameters (+ the fused copies replace the originals) and the KV cache.
    params = 2 * 259 * 128 + 128 + 6 * (2 * 128 + 128 * 128 * 2 + 2 * 64 * 128 + 3 * 128 * 344)
    assert engine6.weight_bytes() == 4 * params
    assert engine6.kv_cache_bytes() == 4 * 6 * 2 * 2 * 96 * 32
    assert mem > engine6.weight_bytes() + engine6.kv_cache_bytes()


def test_greedy_is_deterministic(tiny6, engine6):
    ids = engine6.tokenizer.encode(PROMPT)
    a = engine6.generate(ids, max_tokens=12, ignore_eos=True)
    b = engine6.generate(ids, max_tokens=12, ignore_eos=True)
    c = Engine.load(tiny6, [("cpu", 0, 6)], context_tokens=64).generate(ids, max_tokens=12, ignore_eos=True)
    assert a.tokens == b.tokens == c.tokens
    assert len(a.tokens) == 12 and a.finish_reason == "length"
    assert a.prompt_tokens == len(ids) and a.completion_tokens == 12
    assert len(a.step_ms) == 11 and a.ttft_ms > 0 and all(t > 0 for t in a.step_ms)
    assert a.tpot_ms == pytest.approx(sum(a.step_ms) / 11)
    # Generating with a shorter earlier request in between must not disturb the cache.
    engine6.generate(engine6.tokenizer.encode("zz"), max_tokens=3)
    assert engine6.generate(ids, max_tokens=12, ignore_eos=True).tokens == a.tokens


def test_uneven_stages_match_one_stage(tiny6, engine6):
    split = Engine.load(tiny6, [("cpu", 0, 3), ("cpu", 3, 2), ("cpu", 5, 1)], context_tokens=96)
    assert [(s.is_first, s.is_last, s.num_layers) for s in split.stages] == [
        (True, False, 3),
        (False, False, 2),
        (False, True, 1),
    ]
    assert split.stages[0].embed is not None and split.stages[0].lm_head is None
    assert split.stages[2].embed is None and split.stages[2].lm_head is not None
    ids = engine6.tokenizer.encode(PROMPT)
    assert torch.equal(split.prefill(ids), engine6.prefill(ids))
    assert (
        split.generate(ids, max_tokens=16, ignore_eos=True).tokens
        == engine6.generate(ids, max_tokens=16, ignore_eos=True).tokens
    )
    mem = split.memory_bytes()
    assert len(mem) == 3 and mem[0] > mem[1] > mem[2] > 0  # 3 layers + embedding > 2 layers > 1 layer + head
    assert split.kv_cache_bytes() == engine6.kv_cache_bytes()


def test_kv_cache_decode_matches_recompute(engine6):
    ids = engine6.tokenizer.encode(PROMPT + " jumps over")
    n = 5
    full = engine6.prefill(ids, all_positions=True)  # no cache involved: all positions at once
    engine6.prefill(ids[:n])
    for pos in range(n, len(ids)):
        step = engine6.decode(ids[pos], pos)
        torch.testing.assert_close(step, full[pos], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step, engine6.prefill(ids[: pos + 1]), rtol=1e-4, atol=1e-5)
        engine6.prefill(ids[: pos + 1])  # restore the cache that the check above rewrote (same values)


def test_prompt_too_long(engine6):
    ids = list(range(3, 93))
    with pytest.raises(PromptTooLong) as err:
        engine6.generate(ids, max_tokens=10)
    assert "90" in err.value.message and "10" in err.value.message and "96" in err.value.message
    assert err.value.code == "prompt_too_long"
    assert len(engine6.generate(ids, max_tokens=6, ignore_eos=True).tokens) == 6  # exactly fits


def test_bad_requests(engine6):
    with pytest.raises(BadRequest):
        engine6.generate([], max_tokens=4)
    with pytest.raises(BadRequest, match="vocabulary"):
        engine6.generate([1, 400], max_tokens=4)
    with pytest.raises(BadRequest):
        engine6.generate([1, 5], max_tokens=0)
    with pytest.raises(BadRequest):
        engine6.generate([1, 5], max_tokens=4, temperature=-1.0)
    with pytest.raises(BadRequest):
        engine6.generate([1, 5], max_tokens=4, top_p=0.0)


def test_sampling_repeats_with_a_seed(engine6):
    ids = engine6.tokenizer.encode(PROMPT)
    kw = dict(max_tokens=16, temperature=1.5, top_p=0.95, ignore_eos=True)
    a = engine6.generate(ids, seed=11, **kw).tokens
    assert engine6.generate(ids, seed=11, **kw).tokens == a
    assert engine6.generate(ids, seed=12, **kw).tokens != a
    # A top_p this small keeps only the most likely token: greedy.
    greedy = engine6.generate(ids, max_tokens=8, ignore_eos=True).tokens
    assert engine6.generate(ids, max_tokens=8, temperature=1.0, top_p=1e-9, seed=3, ignore_eos=True).tokens == greedy
    # Without a seed the engine's own generator advances: draws still come out, valid ids.
    drawn = engine6.generate(ids, temperature=1.0, **{k: v for k, v in kw.items() if k != "temperature"}).tokens
    assert len(drawn) == 16 and all(0 <= t < 259 for t in drawn)


def test_stop_cancel_and_streaming(engine6):
    ids = engine6.tokenizer.encode(PROMPT)
    first = engine6.generate(ids, max_tokens=1).tokens[0]
    seen = []
    tok = engine6.tokenizer
    saved = tok.eos_id
    try:
        tok.eos_id = first  # pretend the first greedy token is eos
        res = engine6.generate(ids, max_tokens=10, on_token=seen.append)
        assert res.tokens == [first] and res.finish_reason == "stop" and seen == [first]
        assert engine6.generate(ids, max_tokens=10, ignore_eos=True).finish_reason == "length"
    finally:
        tok.eos_id = saved
    seen.clear()
    res = engine6.generate(
        ids, max_tokens=50, ignore_eos=True, on_token=seen.append, should_stop=lambda: len(seen) >= 3
    )
    assert res.finish_reason == "cancelled" and res.tokens == seen and len(seen) == 3
    res = engine6.generate(ids, max_tokens=5, should_stop=lambda: True)
    assert res.finish_reason == "cancelled" and res.tokens == []


def test_bad_stages(tiny6):
    for stages in (
        [],
        [("cpu", 0, 3), ("cpu", 4, 2)],
        [("cpu", 0, 3), ("cpu", 2, 4)],
        [("cpu", 0, 5)],
        [("cpu", 0, 6), ("cpu", 6, 1)],
        [("cpu", 0, 0), ("cpu", 0, 6)],
        [("cpu", 1, 5)],
    ):
        with pytest.raises(BadRequest):
            Engine.load(tiny6, stages, context_tokens=32)
    with pytest.raises(BadRequest):
        Engine.load(tiny6, [("tpu:0", 0, 6)], context_tokens=32)
    with pytest.raises(BadRequest):
        Engine.load(tiny6, [("cpu", 0, 6)], context_tokens=4096)  # over max_position_embeddings
    if not torch.cuda.is_available():
        with pytest.raises(BadRequest, match="CUDA"):
            Engine.load(tiny6, [("cuda:0", 0, 6)], context_tokens=32)


def test_bad_checkpoint(tmp_path):
    path = make_checkpoint(tmp_path / "m", num_layers=2)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        Engine.load(path, [("cpu", 0, 2)], context_tokens=32)


def test_mixtral_runs(mixtral):
    one = Engine.load(mixtral, [("cpu", 0, 3)], context_tokens=64)
    two = Engine.load(mixtral, [("cpu", 0, 2), ("cpu", 2, 1)], context_tokens=64)
    ids = one.tokenizer.encode(PROMPT)
    a = one.generate(ids, max_tokens=10, ignore_eos=True)
    assert len(a.tokens) == 10 and two.generate(ids, max_tokens=10, ignore_eos=True).tokens == a.tokens
    full = one.prefill(ids, all_positions=True)
    one.prefill(ids[:4])
    for pos in range(4, len(ids)):
        torch.testing.assert_close(one.decode(ids[pos], pos), full[pos], rtol=1e-4, atol=1e-5)


def test_measure_fingerprint_cpu(tmp_path):
    fp1 = make_checkpoint(tmp_path / "fp1", num_layers=1)
    fp2 = make_checkpoint(tmp_path / "fp2", num_layers=2)
    kw = dict(prompt_lengths=[8, 32], output_lengths=[4, 6], repeats=2, warmup=1, context_tokens=64)
    m1 = measure_fingerprint(fp1, "cpu", num_layers=1, **kw)
    m2 = measure_fingerprint(fp2, "cpu", num_layers=2, **kw)
    assert isinstance(m1, FingerprintMeasurement) and m1.variant == ProfileVariant()
    for m, n in ((m1, 1), (m2, 2)):
        assert m.num_layers == n and m.timer == "perf_counter"
        assert [t.prompt_tokens for t in m.ttft] == [8, 32] and all(t.ttft_ms > 0 for t in m.ttft)
        assert m.tpot_ms > 0 and m.decode_steps == 2 * (3 + 5)
        assert m.kv_cache_bytes == 4 * n * 2 * 2 * 64 * 32
        assert m.peak_bytes > m.weight_bytes + m.kv_cache_bytes > 0
        assert m.nvml_peak_bytes == 0
    layer = m2.weight_bytes - m1.weight_bytes
    assert layer == 4 * (2 * 128 + 128 * 128 * 2 + 2 * 64 * 128 + 3 * 128 * 344)
    assert m2.peak_bytes > m1.peak_bytes
    with pytest.raises(CheckpointError, match="2-layer"):
        measure_fingerprint(fp1, "cpu", num_layers=2, **kw)
    with pytest.raises(UnsupportedModel):
        measure_fingerprint(fp1, "cpu", num_layers=1, variant=ProfileVariant(weight_quant="fp8"), **kw)
    with pytest.raises(BadRequest):
        measure_fingerprint(fp1, "cpu", num_layers=1, **{**kw, "context_tokens": 16})
    assert gpu_type_of("cpu") == "cpu"


def test_capabilities():
    assert CAPABILITIES == {
        "tp": [1, 2, 4, 8],
        "weight_quant": ["fp16", "int8", "int4"],
        "kv_quant": ["fp16", "int8"],
        "pruning": ["none", "2:4", "structured"],
        "families": ["llama", "mixtral", "falcon", "gptj", "gpt_neox"],
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny6, engine6):
    gpu = Engine.load(tiny6, [("cuda:0", 0, 6)], context_tokens=96)
    assert gpu.timer == "cuda_events" and gpu.stages[0].dtype == torch.float16
    ids = engine6.tokenizer.encode(PROMPT)
    torch.testing.assert_close(gpu.prefill(ids).cpu(), engine6.prefill(ids), rtol=0, atol=2e-2)
    res = gpu.generate(ids, max_tokens=8, ignore_eos=True)
    assert len(res.tokens) == 8 and res.ttft_ms > 0 and all(t > 0 for t in res.step_ms)
    s = gpu.generate(ids, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True).tokens
    assert gpu.generate(ids, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True).tokens == s
    (mem,) = gpu.memory_bytes()
    assert mem >= gpu.weight_bytes() + gpu.kv_cache_bytes()
    full = gpu.prefill(ids, all_positions=True)
    gpu.prefill(ids[:5])
    for pos in range(5, len(ids)):
        torch.testing.assert_close(gpu.decode(ids[pos], pos), full[pos], rtol=0, atol=2e-2)
    # Two stages on the same GPU, and a CPU + GPU pipeline.
    split = Engine.load(tiny6, [("cuda:0", 0, 4), ("cuda:0", 4, 2)], context_tokens=96)
    assert split.generate(ids, max_tokens=8, ignore_eos=True).tokens == res.tokens
    assert sum(split.memory_bytes()) == torch.cuda.memory_allocated(0) or len(split.memory_bytes()) == 2
    mixed = Engine.load(tiny6, [("cpu", 0, 3), ("cuda:0", 3, 3)], context_tokens=96)
    assert mixed.timer == "perf_counter" and len(mixed.generate(ids, max_tokens=4).tokens) >= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_fingerprint_cuda(tmp_path):
    fp = make_checkpoint(tmp_path / "fp1", num_layers=1)
    m = measure_fingerprint(
        fp,
        "cuda:0",
        num_layers=1,
        prompt_lengths=[16, 64],
        output_lengths=[4, 8],
        repeats=2,
        warmup=1,
        context_tokens=128,
    )
    assert "cuda_events" in m.timer and m.tpot_ms > 0 and all(t.ttft_ms > 0 for t in m.ttft)
    assert m.peak_bytes >= m.weight_bytes + m.kv_cache_bytes
    assert gpu_type_of("cuda:0") == torch.cuda.get_device_name(0)


def test_masked_decode_over_the_whole_cache_is_the_same(engine6):
    """The capture-friendly decode (fixed kv_len = context, mask from the position tensor) equals the
    eager one, even with stale rows from an earlier, longer request in the cache."""
    engine6.generate(list(range(3, 60)), max_tokens=2)
    ids = engine6.tokenizer.encode(PROMPT)
    engine6.prefill(ids[:5])
    stage = engine6.stages[0]
    token = torch.tensor([ids[5]])
    with torch.inference_mode():  # the engine's tensors are inference tensors
        stage.pos.fill_(5)
        eager = stage.decode(token, kv_len=6, masked=False)
        captured = stage.decode(token, kv_len=engine6.context_tokens, masked=True)
    assert stage.needs_mask(5, 6) is False and stage.needs_mask(5, 96) is True
    torch.testing.assert_close(captured, eager, rtol=1e-4, atol=1e-5)
