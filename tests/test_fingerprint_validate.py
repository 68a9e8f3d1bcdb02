"""``iserve validate`` and ``bench/bench_fingerprint.py`` on tiny CPU models: they run end to end,
print the comparison and write their JSON. (CPU timings on a shared machine are not the point.)"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from iserve.fingerprint import comparison, validate
from iserve.messages import (
    ConfigEstimate,
    Configuration,
    DecodeTiming,
    FingerprintMeasurement,
    ProfileVariant,
    PromptTiming,
)
from iserve.modelmaker import make_checkpoint

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def test_compare_and_summarize():
    e = ConfigEstimate(
        config=Configuration(),
        ttft_base_ms=10.0,
        ttft_per_token_ms=0.01,
        tpot_ms=5.0,
        tpot_per_position_ms=0.001,
        layer_bytes=100,
        first_stage_bytes=10,
        last_stage_bytes=10,
        gpu_overhead_bytes=80,
        total_bytes=500,
        num_layers=4,
    )
    m = FingerprintMeasurement(
        num_layers=4,
        variant=ProfileVariant(),
        tpot_ms=5.0,
        decode_steps=3,
        peak_bytes=490,
        nvml_peak_bytes=520,
        ttft=[PromptTiming(prompt_tokens=100, ttft_ms=11.0), PromptTiming(prompt_tokens=200, ttft_ms=13.0)],
        decode=[DecodeTiming(position=x, step_ms=5.0 + 0.001 * x) for x in (200, 201, 202)],
    )
    c = comparison.compare(e, m, [(200, 4)])
    by = {(p.what, p.at): p for p in c.points}
    assert by["ttft", "p=100"].error == pytest.approx(0.0) and by["ttft", "p=200"].error == pytest.approx(12 / 13 - 1)
    assert by["tpot", "p=200,o=4"].error == pytest.approx(0.0)
    assert by["memory", "per GPU"].measured == 520 and by["memory", "per GPU"].estimated == 500
    s = comparison.summarize([c])
    assert s["ttft"]["points"] == 2 and s["ttft"]["median"] == pytest.approx((1 - 12 / 13) / 2)
    assert s["memory"]["median"] == pytest.approx(20 / 520)
    assert math.isnan(comparison.summarize([])["tpot"]["median"])
    with pytest.raises(ValueError, match="no decode steps"):
        comparison.measured_tpot(m, 10, 4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("v") / "tiny", "tiny-llama", num_layers=4)


def test_validate_command_profiles_measures_and_prints(tiny, tmp_path, capsys):
    out = tmp_path / "v.json"
    keys = "tp1-pp1-wfp16-kvfp16-pnone,tp1-pp1-wint8-kvint8-pnone"
    rc = validate.main(
        [
            str(tiny),
            "--configs",
            keys,
            "--devices",
            "cpu",
            "--prompt-lengths",
            "8,16,32",
            "--output-lengths",
            "3,6",
            "--repeats",
            "2",
            "--context-tokens",
            "64",
            "--work-dir",
            str(tmp_path / "fp"),
            "--json-file",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr()
    text = printed.out  # the table folds a long key at 80 columns: its pieces are on consecutive lines
    assert "wint8-kvint8" in text and "ttft" in text and "|error| median" in text
    # progress went to standard error as plain lines (no terminal here), one per configuration
    assert "validate: [0/2] measuring tp1-pp1-wfp16-kvfp16-pnone" in printed.err
    assert "validate: [1/2] measuring tp1-pp1-wint8-kvint8-pnone" in printed.err
    doc = json.loads(out.read_text())
    assert [c["config"] for c in doc["comparisons"]] == keys.split(",")
    assert (
        doc["summary"]["ttft"]["points"] == 6
        and doc["summary"]["tpot"]["points"] == 4
        and doc["summary"]["memory"]["points"] == 2
    )
    # only the two variants asked for were profiled, and their measurements are in the JSON
    assert {(m["variant"]["weight_quant"], m["variant"]["kv_quant"]) for m in doc["profile"]["measurements"]} == {
        ("fp16", "fp16"),
        ("int8", "int8"),
    }
    assert sorted(p.name for p in (tmp_path / "fp").iterdir() if p.is_dir())  # fingerprints were written
    # --json: the same document on standard output, and nothing else there
    rc = validate.main(
        [str(tiny), "--configs", keys.split(",")[0], "--devices", "cpu", "--prompt-lengths", "8,16"]
        + ["--output-lengths", "3,4", "--repeats", "1", "--context-tokens", "32", "--work-dir", str(tmp_path / "fp3")]
        + ["--json"]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {r["config"] for r in doc["rows"]} == {keys.split(",")[0]}
    assert {r["what"] for r in doc["rows"]} == {"ttft", "tpot", "memory"} and doc["summary"]["ttft"]["points"] == 2
    # --batches: the batched decode steps of the full model against the estimate from the fingerprints' own
    rc = validate.main(
        [str(tiny), "--configs", keys.split(",")[0], "--devices", "cpu", "--prompt-lengths", "8,16"]
        + ["--output-lengths", "3,4", "--repeats", "1", "--context-tokens", "32", "--work-dir", str(tmp_path / "fp4")]
        + ["--batches", "4,1", "--json"]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    batch = [r for r in doc["rows"] if r["what"] == "batch"]
    assert [r["at"] for r in batch] == ["b=1,x=9", "b=1,x=17", "b=4,x=9", "b=4,x=17"], (
        batch
    )  # one warm-up step, one timed
    assert doc["summary"]["batch"]["points"] == 4 and all(r["estimated"] > 0 for r in batch)
    measured = doc["profile"]["measurements"]
    assert all([t[0] for t in m["batch_decode"]] == [1, 1, 4, 4] for m in measured if not m["replayed_from"])
    assert validate.main([str(tmp_path / "nope")]) == 2
    assert (
        validate.main(
            [
                str(tiny),
                "--configs",
                "tp9-pp1-wfp16-kvfp16-pnone",
                "--devices",
                "cpu",
                "--prompt-lengths",
                "8,16",
                "--output-lengths",
                "3,4",
                "--repeats",
                "1",
                "--context-tokens",
                "32",
                "--work-dir",
                str(tmp_path / "fp2"),
            ]
        )
        == 2
    )


def test_benchmark_script_runs_on_the_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_fingerprint", ROOT / "bench" / "bench_fingerprint.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(
        [
            "--tiny",
            "--models",
            "tiny-gptj:4",
            "--configs",
            "tp1-pp1-wfp16-kvfp16-pnone,tp1-pp1-wfp16-kvint8-pnone",
            "--out",
            str(tmp_path / "out"),
            "--work-dir",
            str(tmp_path / "work"),
            "--repeats",
            "2",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "iServe fingerprint benchmark" in text and "tiny-gptj@4L" in text and "ALL" in text
    doc = json.loads((tmp_path / "out" / "bench_fingerprint.json").read_text())
    [m] = doc["models"]
    assert m["family"] == "gptj" and m["configs"] == ["tp1-pp1-wfp16-kvfp16-pnone", "tp1-pp1-wfp16-kvint8-pnone"]
    assert (
        m["summary"]["memory"]["points"] == 2
        and m["gpu_seconds"]["fingerprints"] > 0
        and m["gpu_seconds"]["full_model"] > 0
    )
    assert m["summary_wall_only"]["ttft"]["points"] == 6
    assert (tmp_path / "out" / "bench_fingerprint_details.txt").read_text().count("tp1-pp1-wfp16-kvint8-pnone") >= 1
    assert not (tmp_path / "work" / "tiny-gptj@4L").exists()  # checkpoints are removed after each model

    # --merge: a later run's measurement of a configuration replaces the earlier one; a cut one does not.
    later = json.loads(json.dumps(doc))
    [lm] = later["models"]
    kv8 = next(c for c in lm["comparisons"] if c["config"] == "tp1-pp1-wfp16-kvint8-pnone")
    for point in kv8["points"]:
        point["measured"] = point["estimated"] * 2  # every |error| of this configuration becomes 50%
    lm["comparisons"] = [
        kv8,
        {"config": "tp1-pp1-wfp16-kvfp16-pnone", "points": [], "gpu_seconds": 0.0, "note": "skipped: out of time"},
    ]
    lm["naive"] = [c for c in lm["naive"] if c["config"] == kv8["config"]]
    lm["fingerprint_gpu_seconds"] = {kv8["config"]: 1000.0}
    (tmp_path / "later.json").write_text(json.dumps(later))
    capsys.readouterr()
    assert (
        bench.main(
            [
                "--merge",
                str(tmp_path / "out" / "bench_fingerprint.json"),
                str(tmp_path / "later.json"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert "merged 2 runs" in capsys.readouterr().out
    [mm] = json.loads((tmp_path / "merged" / "bench_fingerprint.json").read_text())["models"]
    assert (
        sorted(c["config"] for c in mm["comparisons"] if not c.get("note")) == m["configs"]
    )  # both measured, none cut
    assert mm["summary"]["memory"]["points"] == 2 and mm["summary"]["memory"]["max"] == pytest.approx(0.5)
    assert mm["gpu_seconds"]["fingerprints"] == pytest.approx(
        1000.0 + m["fingerprint_gpu_seconds"]["tp1-pp1-wfp16-kvfp16-pnone"]
    )
