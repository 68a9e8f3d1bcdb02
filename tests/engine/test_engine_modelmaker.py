"""iserve.modelmaker: random-weight checkpoints that validate and look like Hugging Face's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from iserve.checkpoint import arch_from_config, expected_tensors, scan_checkpoint
from iserve.gpu_agent.engine.tensors import load_tensors
from iserve.modelmaker import main, make_checkpoint
from iserve.presets import PRESETS

# Parameter counts of the published models, to check that the presets have their real shapes.
PUBLISHED_PARAMS = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_have_the_published_shapes(name):
    arch = arch_from_config(PRESETS[name])
    assert sum(math.prod(s) for s in expected_tensors(arch).values()) == PUBLISHED_PARAMS[name]


def test_preset_details():
    tiny = arch_from_config(PRESETS["tiny-llama"])
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.num_kv_heads) == (4, 128, 4, 2)
    assert (tiny.intermediate_size, tiny.vocab_size, tiny.max_position) == (344, 259, 2048)
    assert (tiny.bos_token_id, tiny.eos_token_id, tiny.tie_embeddings) == (1, 2, False)
    l3 = arch_from_config(PRESETS["llama-3-8b"])
    assert l3.rope_theta == 500000.0 and l3.rope_scaling["rope_type"] == "llama3"
    assert arch_from_config(PRESETS["qwen2-7b"]).attention_bias
    mx = arch_from_config(PRESETS["mixtral-8x7b"])
    assert (mx.family, mx.num_experts, mx.experts_per_token) == ("mixtral", 8, 2)


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_validates(tmp_path, shards):
    path = make_checkpoint(tmp_path / "m", shards=shards)
    ck = scan_checkpoint(path)  # validates names, shapes and byte ranges
    assert ck.arch.num_layers == 4
    assert set(ck.tensors) == set(expected_tensors(ck.arch))
    assert {t.dtype for t in ck.tensors.values()} == {"F16"}
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == "float16"
    if shards == 1:
        assert [p.name for p in path.glob("*.safetensors")] == ["model.safetensors"]
        assert not (path / "model.safetensors.index.json").exists()
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
        assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ck.tensors)
        assert set(index["weight_map"].values()) == set(names)
        assert index["metadata"]["total_size"] == ck.data_bytes
        for name, fname in index["weight_map"].items():
            assert ck.tensors[name].file.endswith("/" + fname)
    with safe_open(str(path / ("model.safetensors" if shards == 1 else "model-00001-of-00003.safetensors")), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_values_are_reproducible_and_independent_of_layout(tmp_path):
    one = scan_checkpoint(make_checkpoint(tmp_path / "a", num_layers=1, seed=7))
    four = scan_checkpoint(make_checkpoint(tmp_path / "b", num_layers=4, seed=7, shards=2))
    other = scan_checkpoint(make_checkpoint(tmp_path / "c", num_layers=1, seed=8))
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"]
    a, b, c = (load_tensors(ck, names) for ck in (one, four, other))
    for n in names:
        assert torch.equal(a[n], b[n])
    assert not torch.equal(a[names[1]], c[names[1]])
    assert torch.all(a[names[2]] == 1.0)
    w = a[names[1]].float()
    assert abs(w.mean().item()) < 2e-3 and abs(w.std().item() - 0.02) < 2e-3


def test_dtype_overrides_and_mixtral(tmp_path):
    path = make_checkpoint(
        tmp_path / "mx",
        "mixtral-8x7b",
        dtype="bfloat16",
        overrides={
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 3,
            "vocab_size": 300,
        },
        num_layers=2,
    )
    ck = scan_checkpoint(path)
    got = (ck.arch.family, ck.arch.num_experts, ck.arch.num_layers, ck.arch.torch_dtype)
    assert got == ("mixtral", 3, 2, "bfloat16")
    assert {t.dtype for t in ck.tensors.values()} == {"BF16"}


def test_rewrite_removes_stale_shards(tmp_path):
    make_checkpoint(tmp_path / "m", shards=3)
    make_checkpoint(tmp_path / "m", shards=1)
    assert [p.name for p in (tmp_path / "m").glob("*.safetensors")] == ["model.safetensors"]
    scan_checkpoint(tmp_path / "m")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        make_checkpoint(tmp_path / "x", "gpt-5")
    with pytest.raises(ValueError, match="shards"):
        make_checkpoint(tmp_path / "x", shards=10_000)


def test_cli(tmp_path, capsys):
    rc = main(
        [
            str(tmp_path / "cli"),
            "--preset",
            "tiny-mixtral",
            "--layers",
            "1",
            "--seed",
            "3",
            "--shards",
            "2",
            "--set",
            "num_local_experts=2",
        ]
    )
    assert rc == 0
    assert "wrote tiny-mixtral" in capsys.readouterr().out
    ck = scan_checkpoint(tmp_path / "cli")
    assert (ck.arch.num_layers, ck.arch.num_experts) == (1, 2)
