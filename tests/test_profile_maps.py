"""Sparse checkpoints (modelmaker ``dense_layers``) and ``bench/profile_maps.py --tiny`` end to end on
the CPU: the maps it writes load in the simulator and run a short trace."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from iserve import checkpoint
from iserve.fingerprint import generator
from iserve.modelmaker import dense_tensor_names, disk_bytes, make_checkpoint

ROOT = Path(__file__).resolve().parent.parent
WIDE = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 2}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sparse_checkpoint_gives_the_dense_fingerprints_and_takes_little_disk(tmp_path):
    dense = make_checkpoint(tmp_path / "dense", "tiny-llama", num_layers=12, overrides=WIDE, seed=3)
    sparse = make_checkpoint(
        tmp_path / "sparse", "tiny-llama", num_layers=12, overrides=WIDE, seed=3, dense_layers=2, shards=2
    )
    ck_d, ck_s = (
        checkpoint.scan_checkpoint(dense),
        checkpoint.scan_checkpoint(sparse),
    )  # a valid checkpoint: every tensor listed
    assert set(ck_s.tensors) == set(ck_d.tensors) and ck_s.data_bytes == ck_d.data_bytes
    apparent, on_disk = disk_bytes(sparse)
    layer_bytes = sum(e.nbytes for n, e in ck_d.tensors.items() if n.startswith("model.layers.5."))
    assert apparent >= ck_d.data_bytes and on_disk < apparent - 8 * layer_bytes  # ten layers are holes
    # what the generator reads is exactly what was written, so the fingerprints are the dense ones, byte for byte
    read = {n for k in generator.FINGERPRINT_LAYERS for n in generator.fingerprint_tensor_names(ck_s, k)}
    assert read <= set(dense_tensor_names(ck_s.arch, 2))
    fp_d = generator.make_fingerprints(ck_d, tmp_path / "fp-dense")
    fp_s = generator.make_fingerprints(ck_s, tmp_path / "fp-sparse")
    for a, b in zip(fp_d, fp_s):
        assert (Path(a.path) / "model.safetensors").read_bytes() == (Path(b.path) / "model.safetensors").read_bytes()
    # the holes read back as zeros; the written layers do not
    t = checkpoint.load_tensors(ck_s, ["model.layers.5.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"])
    assert not t["model.layers.5.mlp.up_proj.weight"].any() and t["model.layers.1.mlp.up_proj.weight"].any()


def test_profile_maps_tiny_writes_maps_the_simulator_reads(tmp_path, capsys):
    bench = _load("profile_maps")
    out = tmp_path / "out"
    rc = bench.main(
        ["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--max-variants", "2", "--budget-s", "120"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "iServe configuration maps" in text and "tiny-llama" in text and "tiny-falcon" in text
    doc = json.loads((out / "profile_maps.json").read_text())
    by = {r["model"]: r for r in doc["models"]}
    for name in ("tiny-llama", "tiny-falcon"):
        r = by[name]
        assert r.get("map") and r["variants_profiled"] == 2 and r["variants_total"] >= 6 and r["estimates"] > 0, r
        assert r["checkpoint_disk_bytes"] <= r["checkpoint_bytes"]
        assert [v["variant"] for v in r["variants"]] == ["tp1-wfp16-kvfp16-pnone", "tp1-wint8-kvfp16-pnone"]
    assert not (tmp_path / "work" / "tiny-llama").exists()  # checkpoints are deleted per model

    from iserve.loadgen import simulator as sim
    from iserve.loadgen.simspec import SimSpec
    from iserve.loadgen.traces import TraceRequest
    from iserve.messages import Intent

    maps = sim.load_maps(out / "maps")
    assert set(maps) == {"tiny-llama", "tiny-falcon"}
    cm = maps["tiny-llama"]
    assert cm.max_gpus == 8 and cm.context_tokens == 128
    assert {e.config.weight_quant for e in cm.estimates} == {"fp16", "int8"}
    assert any(
        "not profiled" in x.reason for x in cm.excluded
    )  # variants beyond --max-variants are excluded with a reason
    trace = [TraceRequest(arrival_s=0.1 * i, context_tokens=40, generated_tokens=8, index=i) for i in range(20)]
    spec = SimSpec(
        models=[("tiny-llama", maps["tiny-llama"]), ("tiny-falcon", maps["tiny-falcon"])],
        trace=trace,
        gpus=2,
        gpu_memory_bytes=cm.gpu_memory_bytes,
        deploy_every_s=0.0,
        deploy_batch=2,
        intent=Intent(kind="min-latency", prompt_tokens=40, output_tokens=8),
    )
    res = sim.simulate(spec)
    assert len(res.requests) == 20 and all(r.status == "ok" for r in res.requests)
