"""Pure tests of the load generator: trace parsing, compression, assignment, lengths, prompts, SLOs
and the run format (no NATS, no services)."""

from __future__ import annotations

import filecmp
import json
import math
import statistics
from pathlib import Path

import msgspec
import pytest

from iserve import slo
from iserve.loadgen import traces
from iserve.loadgen.config import parse
from iserve.loadgen.records import (
    DeploymentEvent,
    GpuSample,
    RequestRecord,
    RunMeta,
    RunWriter,
    load_run,
    summarize,
)
from iserve.loadgen.traces import TraceRequest
from iserve.messages import ConfigEstimate, Configuration, Intent, QualityPolicy

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def code():
    return traces.load_trace("code")


@pytest.fixture(scope="module")
def conv():
    return traces.load_trace("conv")


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_seven_digit_fractions_and_no_trailing_newline():
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:17:03.9799600,4808,10\n"
        "2023-11-16 18:17:04.0319600,3180,8\n"
        "2023-11-16 18:18:00.0000001,7,1"  # last line: no newline
    )
    t = traces.parse_trace(text)
    assert [r.index for r in t] == [0, 1, 2]
    assert t[0].arrival_s == 0.0
    assert t[1].arrival_s == pytest.approx(0.052, abs=1e-9)
    assert t[2].arrival_s == pytest.approx(56.0200401, abs=1e-9)  # the 7th digit is kept
    assert (t[2].context_tokens, t[2].generated_tokens) == (7, 1)
    # CRLF and blank lines are fine too
    assert traces.parse_trace(text.replace("\n", "\r\n") + "\r\n\r\n") == t


def test_parse_rejects_bad_input_naming_the_line():
    with pytest.raises(ValueError, match="header"):
        traces.parse_trace("when,in,out\n2023-11-16 18:17:03.1,1,1")
    with pytest.raises(ValueError, match="line 3"):
        traces.parse_trace(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,1,1\n2023-11-16 18:17:04.x,1,1"
        )
    with pytest.raises(ValueError, match="line 2"):
        traces.parse_trace("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.1,1")
    with pytest.raises(FileNotFoundError):
        traces.load_trace("no-such-trace")


def test_shipped_traces_are_byte_identical_copies_and_parse(code, conv):
    for name in ("code", "conv"):
        shipped = traces.TRACES[name]
        assert not shipped.read_bytes().endswith(b"\n")  # as published: the last line has no newline
        if SHARED_DATA.is_dir():
            assert filecmp.cmp(shipped, SHARED_DATA / shipped.name, shallow=False)
    readme = (traces.DATA_DIR / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "Splitwise" in readme and "ISCA 2024" in readme
    assert len(code) == 8819 and len(conv) == 19366
    s_code, s_conv = traces.stats(code), traces.stats(conv)
    assert s_code.context_median == 1469 and s_code.generated_median == 13
    assert s_conv.context_median == 1020 and s_conv.generated_median == 129
    assert s_code.interarrival_cv == pytest.approx(13.2, abs=0.1)
    assert s_conv.interarrival_cv == pytest.approx(1.09, abs=0.02)
    assert 3400 < s_code.duration_s < 3500 and code[-1].index == 8818


def test_load_trace_from_a_path(tmp_path):
    p = tmp_path / "mine.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 00:00:01.5,10,2\n2023-11-16 00:00:00.5,20,3")
    t = traces.load_trace(p)
    assert [(r.arrival_s, r.index) for r in t] == [(0.0, 1), (1.0, 0)]  # sorted by arrival, rows kept
    assert traces.trace_name(p) == "mine" and traces.trace_name("code") == "code"


# --- compression -------------------------------------------------------------------------------------


def synthetic(n_per_interval: list[int], interval_s: float) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    for k, n in enumerate(n_per_interval):
        for j in range(n):
            out.append(
                TraceRequest(
                    arrival_s=k * interval_s + (j + 0.5) * interval_s / n,
                    context_tokens=100,
                    generated_tokens=10,
                    index=len(out),
                )
            )
    return out


def test_compress_aggregates_adjacent_intervals_and_scales_counts():
    counts = [10, 30, 50, 70, 0, 20, 40, 60, 11]
    t = synthetic(counts, 10.0)
    # aggregate only: counts of adjacent pairs add up, time runs twice as fast
    full = traces.compress(t, interval_s=10.0, aggregate=2, rate=1.0)
    assert traces.interval_counts(full, 10.0) == [40, 120, 20, 100, 11]
    assert [r.arrival_s for r in full] == pytest.approx([r.arrival_s / 2 for r in t])
    # rate: each compressed interval keeps rate x its count, within one request
    for seed in range(5):
        part = traces.compress(t, interval_s=10.0, aggregate=2, rate=0.3, seed=seed)
        got = traces.interval_counts(part, 10.0)
        assert all(abs(g - 0.3 * c) < 1 for g, c in zip(got, [40, 120, 20, 100, 11]))
        assert {r.index for r in part} <= {r.index for r in t}
        assert part == sorted(part, key=lambda r: r.arrival_s)
    # deterministic per seed, different across seeds
    a = traces.compress(t, interval_s=10.0, aggregate=2, rate=0.3, seed=1)
    assert a == traces.compress(t, interval_s=10.0, aggregate=2, rate=0.3, seed=1)
    assert a != traces.compress(t, interval_s=10.0, aggregate=2, rate=0.3, seed=2)
    with pytest.raises(ValueError):
        traces.compress(t, rate=1.5)
    with pytest.raises(ValueError):
        traces.compress(t, aggregate=0)


def test_compress_on_the_real_traces_keeps_counts_and_burstiness(code, conv):
    interval, agg, rate = 60.0, 4, 0.3
    orig = traces.interval_counts(code, interval)
    comp = traces.compress(code, interval_s=interval, aggregate=agg, rate=rate, seed=0)
    got = traces.interval_counts(comp, interval)
    want = [rate * sum(orig[g * agg : (g + 1) * agg]) for g in range(math.ceil(len(orig) / agg))]
    assert len(got) == len(want) and all(abs(g - w) < 1 for g, w in zip(got, want))
    assert traces.stats(comp).mean_rate == pytest.approx(rate * agg * traces.stats(code).mean_rate, rel=0.05)
    # the bursty code trace stays far burstier than the steady conversation trace
    for seed in range(3):
        cv_code = traces.stats(
            traces.compress(code, interval_s=interval, aggregate=agg, rate=rate, seed=seed)
        ).interarrival_cv
        cv_conv = traces.stats(
            traces.compress(conv, interval_s=interval, aggregate=agg, rate=rate, seed=seed)
        ).interarrival_cv
        assert cv_code > 4.0 and cv_code > 3 * cv_conv
        assert 0.9 < cv_conv < 1.3
    # aggregation alone leaves the CV exactly as it was (it only rescales time)
    assert traces.stats(traces.compress(code, interval_s=interval, aggregate=agg)).interarrival_cv == pytest.approx(
        traces.stats(code).interarrival_cv, rel=1e-9
    )


def test_slice_and_stats():
    t = synthetic([4, 4, 4], 10.0)
    s = traces.slice_trace(t, 10.0, 10.0)
    assert len(s) == 4 and s[0].arrival_s == pytest.approx(1.25) and s[0].index == 4
    assert len(traces.slice_trace(t, 5.0)) == 10 and len(traces.slice_trace(t, 5.0, 0)) == 10
    st = traces.stats(t)
    assert (
        st.count == 12 and st.duration_s == pytest.approx(27.5) and st.interarrival_cv == pytest.approx(0.0, abs=1e-9)
    )
    assert st.mean_rate == pytest.approx(12 / 27.5) and st.context_median == 100
    assert traces.stats([]).count == 0 and traces.interarrival_cv([1.0, 2.0]) == 0.0


# --- assignment, lengths, prompts ---------------------------------------------------------------------


def test_assign_models_is_uniform_deterministic_and_respects_availability():
    t = synthetic([200] * 10, 10.0)
    a = traces.assign_models(t, ["m1", "m2", "m3"], seed=7)
    assert a == traces.assign_models(t, ["m1", "m2", "m3"], seed=7)
    assert a != traces.assign_models(t, ["m1", "m2", "m3"], seed=8)
    shares = [a.count(m) / len(a) for m in ("m1", "m2", "m3")]
    assert all(abs(s - 1 / 3) < 0.05 for s in shares)
    b = traces.assign_models(t, ["m1", "m2"], seed=7, available_from=[0.0, 50.0])
    assert all(m == "m1" for r, m in zip(t, b) if r.arrival_s < 50.0)
    later = [m for r, m in zip(t, b) if r.arrival_s >= 50.0]
    assert 0.4 < later.count("m2") / len(later) < 0.6
    # the live replay's picks (draws + pick_model) are the same function
    draws = traces.assignment_draws(len(t), 7)
    assert [traces.pick_model(u, ["m1", "m2", "m3"]) for u in draws] == a
    with pytest.raises(ValueError):
        traces.assign_models(t, [], seed=0)


def test_fit_lengths_caps_and_clips():
    assert traces.fit_lengths(4808, 10) == traces.Lengths(prompt_tokens=1024, output_tokens=10, clipped=False)
    assert traces.fit_lengths(500, 10, max_context=0) == traces.Lengths(
        prompt_tokens=500, output_tokens=10, clipped=False
    )
    x = traces.fit_lengths(4808, 10, model_context=256)
    assert (x.prompt_tokens, x.output_tokens, x.clipped) == (246, 10, True)
    y = traces.fit_lengths(100, 600, model_context=256)
    assert (y.prompt_tokens, y.output_tokens, y.clipped) == (1, 255, True)
    z = traces.fit_lengths(100, 20, model_context=2048)
    assert (z.prompt_tokens, z.output_tokens, z.clipped) == (100, 20, False)
    assert traces.fit_lengths(0, 0).prompt_tokens == 1 and traces.fit_lengths(0, 0).output_tokens == 1


def test_prompts_from_files_and_builtin(tmp_path, monkeypatch):
    sharegpt = tmp_path / "s.json"
    sharegpt.write_text(
        json.dumps(
            [
                {"id": "a", "conversations": [{"from": "human", "value": "first?"}, {"from": "gpt", "value": "no"}]},
                {"id": "b", "conversations": [{"from": "gpt", "value": "skip"}, {"from": "human", "value": "second"}]},
                {"id": "c", "conversations": []},
            ]
        )
    )
    assert traces.load_prompts(sharegpt) == ["first?", "second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x"}\n\n{"text": "y"}\n')
    assert traces.load_prompts(jl) == ["x", "y"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert traces.load_prompts(txt) == ["one", "two"]
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError):
        traces.load_prompts(tmp_path / "empty.json")
    monkeypatch.setenv("ISERVE_PROMPTS", str(txt))
    assert traces.resolve_prompts() == (["one", "two"], str(txt))
    assert traces.resolve_prompts(jl)[0] == ["x", "y"]
    monkeypatch.delenv("ISERVE_PROMPTS")
    monkeypatch.setattr(traces, "default_prompts_path", lambda: None)
    prompts, source = traces.resolve_prompts()
    assert source == "builtin" and prompts == list(traces.BUILTIN_PROMPTS)
    assert traces.prompt_for(0, prompts) == prompts[0] and traces.prompt_for(len(prompts) + 3, prompts) == prompts[3]


def test_sharegpt_sample_loads_when_present():
    path = SHARED_DATA / "sharegpt_V3_filtered_500_mlenergy.json"
    if not path.is_file():
        pytest.skip("the ShareGPT sample is not next to the repository")
    prompts = traces.load_prompts(path)
    assert len(prompts) == 500 and all(prompts)


# --- SLOs ---------------------------------------------------------------------------------------------


def est(tp, pp, wq="fp16", tpot=10.0):
    return ConfigEstimate(
        config=Configuration(tp=tp, pp=pp, weight_quant=wq),
        ttft_base_ms=5.0,
        ttft_per_token_ms=0.1,
        tpot_ms=tpot,
        layer_bytes=1,
        first_stage_bytes=1,
        last_stage_bytes=1,
        gpu_overhead_bytes=1,
        total_bytes=10,
        num_layers=4,
    )


def test_slo_reference_is_minimum_parallelism_fp16():
    ests = [est(2, 1, tpot=5), est(1, 1, "int8", tpot=4), est(1, 2, tpot=9), est(1, 1, tpot=12)]
    ref = slo.reference_estimate(ests)
    assert ref.config == Configuration(tp=1, pp=1)
    assert slo.slo_ms(ref, 100, 11, 2.5) == pytest.approx(2.5 * (5 + 10 + 10 * 12))
    # fp16 needs two GPUs: the reference is fp16 on two, not a quantized configuration on one
    assert slo.reference_estimate([est(2, 1), est(1, 1, "int4")]).config == Configuration(tp=2, pp=1)
    # no uncompressed configuration at all: the fewest GPUs of any kind
    assert slo.reference_estimate([est(2, 1, "int8"), est(1, 1, "int4")]).config == Configuration(
        tp=1, pp=1, weight_quant="int4"
    )
    assert slo.request_slo_ms(100, 11, fixed_ms=700) == 700
    assert slo.request_slo_ms(100, 11, scale=2.5, reference=ref) == slo.slo_ms(ref, 100, 11, 2.5)
    assert slo.request_slo_ms(100, 11) == 0 and slo.request_slo_ms(100, 11, scale=2.5) == 0
    # a fit extrapolated into negative latency gives no SLO rather than a negative one
    bad = msgspec.structs.replace(est(1, 1), ttft_per_token_ms=-1.0, tpot_ms=0.1)
    with pytest.raises(ValueError, match="no SLO"):
        slo.slo_ms(bad, 500, 2, 5.0)
    assert slo.slo_met(10, 0) is None and slo.slo_met(10, 20) is True and slo.slo_met(30, 20) is False


# --- run format ---------------------------------------------------------------------------------------


def meta() -> RunMeta:
    return RunMeta(
        kind="simulated",
        trace="code",
        rate=0.2,
        interval_s=60,
        aggregate=4,
        duration_s=100.0,
        intent=Intent(kind="min-latency"),
        models=["m"],
        seed=3,
    )


def rec(i: int, **kw) -> RequestRecord:
    base = dict(
        request_id=f"r{i}",
        model="m" if i % 2 else "n",
        deployment_id="d",
        arrival_s=float(i),
        start_s=i + 0.1,
        first_token_s=i + 0.2,
        end_s=i + 1.0,
        queue_ms=100.0,
        ttft_ms=200.0,
        tpot_ms=10.0,
        e2e_ms=1000.0 + i,
        prompt_tokens=50,
        output_tokens=10,
        slo_ms=1005.0,
    )
    base.update(kw)
    r = RequestRecord(**base)
    if r.status == "ok":
        r.slo_met = slo.slo_met(r.e2e_ms, r.slo_ms)
    return r


def test_run_round_trip_and_a_run_cut_short_still_loads(tmp_path):
    d = tmp_path / "run"
    with RunWriter(d, meta()) as w:
        for i in range(10):
            w.request(rec(i))
        w.gpu(
            GpuSample(
                t_s=0.5,
                agent_id="a",
                gpu_index=0,
                total_bytes=100,
                used_bytes=40,
                busy_fraction=0.2,
                util_percent=50,
                workers=1,
            )
        )
        w.deployment(
            DeploymentEvent(
                t_s=-3.0,
                model="m",
                deployment_id="d",
                config="tp1-pp1-wfp16-kvfp16-pnone",
                gpus=["a/0:4"],
                total_bytes=40,
                status="ready",
            )
        )
        w.update_meta(ended_at=123.0)
    run = load_run(d)
    assert run.meta.ended_at == 123.0 and run.meta.intent.kind == "min-latency" and run.meta.format_version == 1
    assert run.requests == [rec(i) for i in range(10)]
    assert run.gpus[0].used_bytes == 40 and run.deployments[0].gpus == ["a/0:4"]
    with pytest.raises(FileExistsError):
        RunWriter(d, meta())

    # a process killed mid-write: no ended_at, the last line half written
    cut = tmp_path / "cut"
    w = RunWriter(cut, meta())
    for i in range(3):
        w.request(rec(i))
    w._files["requests.jsonl"].write(msgspec.json.encode(rec(3))[:25])
    w._files["requests.jsonl"].flush()
    run = load_run(cut)  # the writer is still open: what is on disk is valid
    assert [r.request_id for r in run.requests] == ["r0", "r1", "r2"] and run.meta.ended_at == 0.0
    assert run.gpus == [] and run.deployments == []
    w.close()
    # corruption in the middle is an error, not silently skipped
    (cut / "requests.jsonl").write_bytes(b'{"nope": 1}\n' + msgspec.json.encode(rec(0)) + b"\n")
    with pytest.raises(ValueError, match="line 1"):
        load_run(cut)
    with pytest.raises(FileNotFoundError):
        load_run(tmp_path / "nothing")


def test_summarize_counts_what_it_prints():
    records = [rec(i) for i in range(9)] + [
        rec(9, status="timeout", error_code="timeout", slo_met=False),
        rec(10, status="cancelled", error_code="cancelled"),
        rec(11, status="error", error_code="worker_died", slo_met=False, clipped=True),
    ]
    s = summarize(records)
    assert (s.count, s.ok, s.errors, s.cancelled, s.clipped) == (12, 9, 2, 1, 1)
    assert s.e2e_p50_ms == pytest.approx(statistics.median(1000.0 + i for i in range(9)))
    assert s.slo_requests == 11  # cancelled requests have no verdict
    assert s.slo_attainment == pytest.approx(6 / 11)  # e2e 1000..1005 met 1005; 1006..1008 and the failures did not
    assert s.per_model == {"m": 6, "n": 6}
    assert summarize([]).slo_attainment is None


def test_flags_have_env_twins(monkeypatch):
    monkeypatch.setenv("ISERVE_RATE", "0.35")
    monkeypatch.setenv("ISERVE_MODELS", "a,b")
    cfg = parse(["--aggregate", "3", "--slo-scale", "5"])
    assert cfg.rate == 0.35 and cfg.models == ["a", "b"] and cfg.aggregate == 3 and cfg.slo_scale == 5
    assert cfg.deploy_every_s == 300.0 and cfg.max_context == 1024 and cfg.undeploy
    # the evaluation reproduces the paper: its intents search every variant (--quality any, docs/quality.md)
    assert cfg.intent_for(300, 20) == Intent(
        kind="min-cost", prompt_tokens=300, output_tokens=20, quality=QualityPolicy(mode="any")
    )
    assert parse(["--quality", "lossless"]).intent_for(1, 1).quality == QualityPolicy(mode="lossless")
    with pytest.raises(SystemExit):
        parse(["--quality", "max-kl=abc"])
    with pytest.raises(SystemExit):
        parse(["--slo-ms", "100", "--slo-scale", "2"])
    with pytest.raises(SystemExit):
        parse(["--rate", "2"])
