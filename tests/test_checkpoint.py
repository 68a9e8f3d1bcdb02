"""Checkpoint validation: every bad checkpoint gets a clear CheckpointError/UnsupportedModel."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from iserve import checkpoint, errors
from iserve.modelmaker import make_checkpoint


@pytest.fixture
def model(tmp_path, tiny_model) -> Path:
    d = tmp_path / "m"
    shutil.copytree(tiny_model, d)
    return d


def shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def test_valid_checkpoint_scans(model):
    ck = checkpoint.scan_checkpoint(model)
    assert ck.arch.family == "llama" and ck.arch.num_layers == 4 and ck.arch.num_kv_heads < ck.arch.num_attention_heads
    assert len(ck.files) == 2
    wb = checkpoint.weight_breakdown(ck)
    per_layer = wb.layer_linear_params + wb.layer_other_params
    total = wb.embed_params + wb.head_params + wb.final_norm_params + 4 * per_layer
    assert total * wb.dtype_bytes == ck.data_bytes


def test_digest_is_structural_and_stable(model, tmp_path):
    """The digest hashes config.json and the shard headers (not the tensor data, which would cost a
    full read of the model): stable for a checkpoint, different for another structure."""
    a = checkpoint.scan_checkpoint(model).digest
    assert checkpoint.scan_checkpoint(model).digest == a
    assert checkpoint.scan_checkpoint(make_checkpoint(tmp_path / "six", "tiny-llama", num_layers=6)).digest != a


def test_missing_config(model):
    (model / "config.json").unlink()
    with pytest.raises(errors.CheckpointError, match="no config.json"):
        checkpoint.scan_checkpoint(model)


def test_not_a_directory(tmp_path):
    with pytest.raises(errors.CheckpointError, match="not a directory"):
        checkpoint.scan_checkpoint(tmp_path / "nope")


def test_config_not_json(model):
    (model / "config.json").write_text("{ not json")
    with pytest.raises(errors.CheckpointError, match="not valid JSON"):
        checkpoint.scan_checkpoint(model)


def test_truncated_shard(model):
    f = shards(model)[-1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(errors.CheckpointError, match="truncated"):
        checkpoint.scan_checkpoint(model)


def test_corrupt_header_length(model):
    f = shards(model)[0]
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    with pytest.raises(errors.CheckpointError, match="corrupt safetensors header"):
        checkpoint.scan_checkpoint(model)


def test_corrupt_header_json(model):
    f = shards(model)[0]
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe\x00!"
    f.write_bytes(bytes(data))
    with pytest.raises(errors.CheckpointError, match="corrupt safetensors header"):
        checkpoint.scan_checkpoint(model)


def test_tiny_file(model):
    shards(model)[0].write_bytes(b"abc")
    with pytest.raises(errors.CheckpointError, match="too short"):
        checkpoint.scan_checkpoint(model)


def test_no_safetensors(model):
    for f in shards(model):
        f.unlink()
    (model / "model.safetensors.index.json").unlink()
    with pytest.raises(errors.CheckpointError, match="no \\*.safetensors"):
        checkpoint.scan_checkpoint(model)


def test_missing_shard_named_in_index(model):
    shards(model)[-1].unlink()
    with pytest.raises(errors.CheckpointError, match="missing"):
        checkpoint.scan_checkpoint(model)


def test_missing_tensor(model):
    for f in shards(model):
        t = load_file(f)
        if "model.layers.3.mlp.up_proj.weight" in t:
            del t["model.layers.3.mlp.up_proj.weight"]
            save_file(t, f)
    with pytest.raises(errors.CheckpointError, match="lacks 1 tensor"):
        checkpoint.scan_checkpoint(model)


def test_shape_mismatch(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.CheckpointError, match="config.json implies"):
        checkpoint.scan_checkpoint(model)


def test_inconsistent_heads(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.CheckpointError, match="multiple of num_key_value_heads"):
        checkpoint.scan_checkpoint(model)


@pytest.mark.parametrize(
    "model_type, archs, match",
    [("t5", ["T5ForConditionalGeneration"], "not a decoder-only"), ("bert", ["BertModel"], "not supported")],
)
def test_unsupported_architecture(model, model_type, archs, match):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["architectures"] = archs
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.UnsupportedModel, match=match):
        checkpoint.scan_checkpoint(model)


def test_duplicate_tensor_across_shards(model):
    f0, f1 = shards(model)
    t0 = load_file(f0)
    name, tensor = next(iter(t0.items()))
    t1 = load_file(f1)
    t1[name] = tensor
    save_file(t1, f1)
    with pytest.raises(errors.CheckpointError, match="appears in two shards"):
        checkpoint.scan_checkpoint(model)


def test_integer_weights_are_unsupported(model):
    for f in shards(model):
        t = load_file(f)
        if "model.norm.weight" in t:
            t["model.norm.weight"] = t["model.norm.weight"].to(torch.int8)
            save_file(t, f)
    with pytest.raises(errors.UnsupportedModel, match="not supported"):
        checkpoint.scan_checkpoint(model)


def test_a_fifo_named_like_a_shard_is_refused_not_read(model):
    import os

    os.mkfifo(model / "extra.safetensors")  # opening it for reading would block forever
    with pytest.raises(errors.CheckpointError, match="not a regular file"):
        checkpoint.scan_checkpoint(model)


def test_a_config_claiming_a_million_layers_is_refused_before_any_work(model):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] = 1_000_000
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(errors.CheckpointError, match="1000000 layers but the checkpoint holds only"):
        checkpoint.scan_checkpoint(model)
