"""Reading checkpoint tensors onto a device, from the files or from a ``TensorCache``."""

from __future__ import annotations

import pytest
import torch

from iserve import checkpoint, errors
from iserve.gpu_agent.engine.tensors import TensorCache, load_tensors


def test_load_tensors_reads_only_requested(tiny_model):
    ck = checkpoint.scan_checkpoint(tiny_model)
    got = load_tensors(ck, ["model.norm.weight"])
    assert list(got) == ["model.norm.weight"] and got["model.norm.weight"].shape == (ck.arch.hidden_size,)
    with pytest.raises(errors.CheckpointError):
        load_tensors(ck, ["nope"])


def test_a_tensor_cache_serves_copies_without_reading_the_files(tiny_model, monkeypatch):
    ck = checkpoint.scan_checkpoint(tiny_model)
    cache = TensorCache("cpu")
    cache.add(ck)
    assert cache.nbytes == ck.data_bytes
    names = ["model.norm.weight", "model.embed_tokens.weight"]
    reads = []
    real = checkpoint.load_tensors
    monkeypatch.setattr(checkpoint, "load_tensors", lambda c, ns, d="cpu": reads.append(list(ns)) or real(c, ns, d))
    got = load_tensors(ck, names, cache=cache)
    again = load_tensors(ck, names, cache=cache)
    assert reads == []  # both calls served from the cache
    assert list(got) == names
    plain = load_tensors(ck, names)  # no cache: read
    assert reads[-1] == names
    for n in names:
        assert torch.equal(got[n], plain[n])
        assert got[n].data_ptr() != again[n].data_ptr()  # each call gets its own copy
    assert cache.get(ck, "model.norm.weight", "cuda:0") is None  # another device than the cache's: read from the files
    with pytest.raises(errors.CheckpointError, match="nope"):
        load_tensors(ck, ["nope"], cache=cache)
    cache.clear()
    assert cache.nbytes == 0


def test_engine_load_takes_its_tensors_from_the_cache_passed(tiny_model, monkeypatch):
    from iserve.gpu_agent.engine import Engine

    ck = checkpoint.scan_checkpoint(tiny_model)
    cache = TensorCache("cpu")
    cache.add(ck)
    reads = []
    real = checkpoint.load_tensors
    monkeypatch.setattr(checkpoint, "load_tensors", lambda c, ns, d="cpu": reads.append(list(ns)) or real(c, ns, d))
    stages = [("cpu", 0, ck.arch.num_layers)]
    cached = Engine.load(tiny_model, stages, context_tokens=32, tensors=cache)
    assert reads == []
    plain = Engine.load(tiny_model, stages, context_tokens=32)
    assert reads
    ids = [1, 2, 3]
    torch.testing.assert_close(cached.prefill(ids), plain.prefill(ids), rtol=0, atol=0)
