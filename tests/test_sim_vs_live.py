"""``bench/sim_vs_live.py --tiny`` end to end on the CPU (the live stack with a simulated GPU, a tiny
model, a short trace slice, the simulator on the same requests), and the import shim the bench
scripts use on a machine where iserve is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shim_makes_iserve_importable_for_child_processes(tmp_path):
    shim = _load("_importable").make_shim(tmp_path / "shim")
    env = {**os.environ, "PYTHONPATH": str(shim)}
    code = "import iserve, iserve.loadgen.simulator, iserve.gpu_agent.engine, iserve.stack; print(iserve.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(shim))  # the shim, not an installed copy
    out = subprocess.run(
        [sys.executable, "-m", "iserve.scheduler", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "scheduler" in out.stdout


def test_sim_vs_live_tiny_runs_both_ways_on_the_same_requests(tmp_path, capsys):
    bench = _load("sim_vs_live")
    out = tmp_path / "out"
    rc = bench.main(
        ["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work"), "--budget-s", "100", "--duration-s", "5"]
    )
    text = capsys.readouterr().out
    doc = json.loads((out / "sim_vs_live.json").read_text())
    assert rc == 0, doc.get("error") or text
    assert "e2e latency" in text and "target: e2e latency" in text and (out / "sim_vs_live.txt").is_file()
    c = doc["comparison"]
    assert c["requests_compared"] >= 10 and c["requests_compared"] == c["requests_live"] - c["live_failed"]
    assert c["iserve_decision_agrees"] and c["length_mismatches"] == 0
    assert c["live_configs"] == {"tiny-llama": "tp1-pp1-wfp16-kvfp16-pnone"}
    rows = {r["metric"]: r for r in c["rows"]}
    assert set(rows) == {"TTFT", "TPOT", "e2e latency", "queueing delay", "service (worker)"}
    assert rows["e2e latency"]["live_p50_ms"] > 0 and rows["e2e latency"]["sim_p50_ms"] > 0
    # the simulated requests are the live ones: same lengths, arrivals and models
    for r in c["requests"]:
        assert r["live"]["e2e_ms"] > 0 and r["sim"]["e2e_ms"] > 0
    assert doc["slice"]["requests"] >= 10 and doc["slice"]["duration_s"] <= 5
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "live/deployments.jsonl",
        "live/gpus.jsonl",
        "live/meta.json",
        "live/requests.jsonl",
        "maps/tiny-llama.json",
        "sim_vs_live.json",
        "sim_vs_live.txt",
    ]
    assert not (tmp_path / "work").exists()
