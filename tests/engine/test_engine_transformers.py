"""Checkpoints saved by ``transformers`` itself run exactly as ``transformers`` runs them.

For each family the engine serves, a tiny random model is made with ``transformers``' own config
class and saved with ``save_pretrained`` (so config.json is written as current ``transformers``
writes it: ``rope_parameters``, ``dtype``, ``generation_config.json``); the engine's prompt logits
must match ``transformers``' in float32 on the CPU, and its greedy tokens (alone and batched) must
equal a greedy loop over ``transformers``' forward pass.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from iserve.checkpoint import scan_checkpoint  # noqa: E402
from iserve.gpu_agent.engine import Engine  # noqa: E402
from iserve.gpu_agent.engine.batch import BatchEngine  # noqa: E402

SMALL = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
LLAMA = dict(SMALL, intermediate_size=96, num_key_value_heads=2, initializer_range=0.1)
CASES = {
    "llama3-rope-tied": (
        "LlamaConfig",
        dict(
            LLAMA,
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "llama-linear-rope": ("LlamaConfig", dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral-window": ("MistralConfig", dict(LLAMA, sliding_window=8)),
    "qwen2-bias": ("Qwen2Config", dict(LLAMA, rope_theta=1000000.0)),
    "mixtral-moe": ("MixtralConfig", dict(LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    "falcon-new-arch": (
        "FalconConfig",
        dict(SMALL, new_decoder_architecture=True, num_kv_heads=2, initializer_range=0.1, rope_theta=30000.0),
    ),
    "falcon-7b-style": ("FalconConfig", dict(SMALL, multi_query=True, parallel_attn=True, initializer_range=0.1)),
    "gptj-partial-rotary": (
        "GPTJConfig",
        dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, initializer_range=0.1),
    ),
    "neox-partial-rotary": (
        "GPTNeoXConfig",
        dict(SMALL, intermediate_size=128, rotary_pct=0.25, rotary_emb_base=20000, initializer_range=0.1),
    ),
    "neox-sequential": (
        "GPTNeoXConfig",
        dict(SMALL, intermediate_size=128, use_parallel_residual=False, initializer_range=0.1),
    ),
}
IDS = [1] + [3 + (7 * i * i + 11 * i) % 280 for i in range(13)]


def _saved(tmp_path, name: str):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, cls)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _greedy(model, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids) :]


@pytest.mark.parametrize("name", list(CASES))
def test_a_transformers_checkpoint_runs_as_transformers_runs_it(tmp_path, name):
    model, path = _saved(tmp_path, name)
    layers = scan_checkpoint(path).arch.num_layers
    engine = Engine.load(path, [("cpu", 0, layers)], context_tokens=64)
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0]
    torch.testing.assert_close(engine.prefill(IDS, all_positions=True), want, rtol=1e-4, atol=1e-4, msg=name)
    tokens = _greedy(model, IDS, 8)
    assert engine.generate(IDS, max_tokens=8, ignore_eos=True).tokens == tokens, name
    batch = BatchEngine(engine, max_batch=2)
    batch.submit("a", IDS, max_tokens=8, ignore_eos=True)
    batch.submit("b", IDS[:5], max_tokens=3, ignore_eos=True)
    got = {e.seq_id: e.result.tokens for e in batch.run_until_idle() if e.result is not None}
    assert got["a"] == tokens, name


def test_rope_settings_are_read_where_transformers_5_writes_them(tmp_path):
    _, path = _saved(tmp_path, "mixtral-moe")
    arch = scan_checkpoint(path).arch
    assert arch.rope_theta == 1_000_000.0  # in rope_parameters only: the old reader took 10000
    _, path = _saved(tmp_path, "llama-linear-rope")
    assert scan_checkpoint(path).arch.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_generation_stops_at_any_eos_of_generation_config(tmp_path):
    import json

    model, path = _saved(tmp_path, "llama-linear-rope")
    tokens = _greedy(model, IDS, 8)
    stop = tokens[3]
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [299, stop]  # as Llama 3 lists several
    (path / "generation_config.json").write_text(json.dumps(gen))
    arch = scan_checkpoint(path).arch
    assert stop in arch.eos_token_ids and 299 in arch.eos_token_ids
    engine = Engine.load(path, [("cpu", 0, arch.num_layers)], context_tokens=64)
    result = engine.generate(IDS, max_tokens=8)
    end = next(i for i, t in enumerate(tokens) if t in engine.eos_ids)  # at step 4 at the latest
    assert result.tokens == tokens[: end + 1] and result.finish_reason == "stop"
    batch = BatchEngine(engine, max_batch=2)
    batch.submit("a", IDS, max_tokens=8)
    (done,) = [e.result for e in batch.run_until_idle() if e.result is not None]
    assert done.tokens == result.tokens and done.finish_reason == "stop"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_a_transformers_checkpoint_runs_in_fp16_on_a_gpu_within_rounding(tmp_path, name):
    """fp16 on CUDA against ``transformers``' float32 forward: the logit gap stays within fp16 rounding
    of the same model run by ``transformers`` in fp16, and the top-1 tokens agree where the
    reference's top two are apart by more than that rounding."""
    model, path = _saved(tmp_path, name)
    layers = scan_checkpoint(path).arch.num_layers
    engine = Engine.load(path, [("cuda:0", 0, layers)], context_tokens=64, dtype="float16")
    with torch.no_grad():
        want = model(torch.tensor([IDS])).logits[0]
        ref16 = model.to("cuda:0", torch.float16)(torch.tensor([IDS], device="cuda:0")).logits[0].float().cpu()
    got = engine.prefill(IDS, all_positions=True).float().cpu()
    gap, ref_gap = (got - want).abs().max().item(), (ref16 - want).abs().max().item()
    print(f"{name}: engine fp16 max |logit gap| {gap:.2e}, transformers fp16 {ref_gap:.2e}")
    assert gap <= max(4 * ref_gap, 1e-2), f"{name}: engine fp16 gap {gap:.2e} vs transformers fp16 {ref_gap:.2e}"
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * max(gap, ref_gap)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear]), name
