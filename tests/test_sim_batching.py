"""The simulator's continuous batching (``--max-batch``): batch 1 is the paper's mode exactly, a batch
serves concurrent requests in far less than one after the other, FCFS holds, the KV pool is reserved,
and the batched step-time model (iserve.fingerprint.estimator.batching) has the properties it claims."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import pytest

from iserve.fingerprint.estimator import kv_cache_bytes_per_layer
from iserve.fingerprint.estimator.batching import StepModel, layer_kv_bytes, map_kv_bytes, step_model
from iserve.loadgen import simulator as sim
from iserve.loadgen.replica import pooled_map
from iserve.loadgen.simspec import SimSpec
from iserve.loadgen.simulation import Simulation
from iserve.loadgen.synthetic import synthetic_arch, synthetic_map
from iserve.loadgen.traces import TraceRequest
from iserve.messages import Configuration, Intent

GOLDEN = Path(__file__).parent / "data" / "sim_paper_mode.json"


def _golden_spec(system: str, intent: str, gpus: int, max_batch: int = 1) -> SimSpec:
    """The scenario whose records ``sim_paper_mode.json`` holds, as the simulator gave them before it
    could batch (queueing, processor sharing between deployments and timeouts all occur)."""
    models = sim.resolve_models(
        ["llama-2-13b", "falcon-7b:2", "llama-2-7b"], maps_dir=None, gpu_type="A6000", max_gpus=gpus
    )
    trace = sim.build_trace("code", rate=0.4, aggregate=4, seed=3, duration_s=60.0)
    p, o = sim.median_lengths(trace, 1024)
    return SimSpec(
        models=models,
        trace=trace,
        system=system,
        intent=Intent(kind=intent, prompt_tokens=p, output_tokens=o),
        gpus=gpus,
        deploy_every_s=30.0,
        timeout_s=60.0,
        max_batch=max_batch,
    )


def test_max_batch_1_reproduces_the_paper_mode_records_exactly():
    golden = json.loads(GOLDEN.read_text())
    fields = golden["fields"]
    for run in golden["runs"]:
        res = sim.simulate(_golden_spec(run["system"], run["intent"], run["gpus"]))
        assert len(res.requests) == run["requests"]
        got = [[getattr(r, f) for f in fields] for r in res.requests]
        assert got == run["records"], run["system"]


def test_batching_changes_the_golden_scenario():
    """The golden comparison can fail: the same scenario batched gives other records."""
    golden = json.loads(GOLDEN.read_text())["runs"][0]
    res = sim.simulate(_golden_spec(golden["system"], golden["intent"], golden["gpus"], max_batch=4))
    fields = json.loads(GOLDEN.read_text())["fields"]
    assert [[getattr(r, f) for f in fields] for r in res.requests] != golden["records"]
    assert res.meta.max_batch == 4


def _one_model(arrivals, *, max_batch, prompt=200, output=101, model="llama-2-7b"):
    cmap = synthetic_map(model, gpu_type="A6000", max_gpus=1)
    trace = [
        TraceRequest(arrival_s=t, context_tokens=prompt, generated_tokens=output, index=i)
        for i, t in enumerate(arrivals)
    ]
    spec = SimSpec(
        models=[(model, cmap)],
        trace=trace,
        gpus=1,
        intent=Intent(kind="min-latency", prompt_tokens=prompt, output_tokens=output),
        max_batch=max_batch,
    )
    return Simulation(spec).run()


def test_max_batch_1_serves_one_at_a_time_like_a_plain_fcfs_server():
    arrivals = [0.0, 0.1, 0.15, 3.0, 3.05, 9.0]
    res = _one_model(arrivals, max_batch=1)
    cmap = synthetic_map("llama-2-7b", gpu_type="A6000", max_gpus=1)
    e = next(x for x in cmap.estimates if x.config.key() == res.requests[0].config)
    solo = e.latency_ms(200, 101) / 1000.0
    free = 0.0
    by = {int(r.request_id): r for r in res.requests}
    for i, t in enumerate(arrivals):
        start = max(t, free)
        free = start + solo
        assert by[i].start_s == pytest.approx(start, abs=1e-9)
        assert by[i].end_s == pytest.approx(free, abs=1e-9)
        assert by[i].first_token_s - start == pytest.approx(e.ttft_ms(200) / 1000.0, abs=1e-9)


def test_a_batch_serves_concurrent_requests_in_far_less_than_one_after_another():
    n = 8
    one = _one_model([0.0], max_batch=n).requests[0].e2e_ms
    serial = max(r.end_s for r in _one_model([0.0] * n, max_batch=1).requests)
    batched = _one_model([0.0] * n, max_batch=n)
    span = max(r.end_s for r in batched.requests)
    assert [r.status for r in batched.requests] == ["ok"] * n
    assert serial * 1000 == pytest.approx(n * one, rel=0.01)  # one at a time: n times one request
    assert span * 1000 < 0.35 * n * one
    assert span * 1000 > one  # ... but a batch is not free
    assert all(r.start_s == 0.0 for r in batched.requests)  # every request had a slot at once


def test_fcfs_order_is_kept_when_requests_wait_for_slots():
    arrivals = [0.01 * i for i in range(12)]
    res = _one_model(arrivals, max_batch=4)
    by = sorted(res.requests, key=lambda r: int(r.request_id))
    assert [r.status for r in by] == ["ok"] * 12
    for key in ("start_s", "first_token_s", "end_s"):
        times = [getattr(r, key) for r in by]
        assert times == sorted(times), key
    # four at a time: the fifth takes the first free slot, after the first batch ends
    assert by[4].start_s == pytest.approx(min(r.end_s for r in by[:4]))
    assert by[4].start_s > by[3].first_token_s
    assert max(r.start_s for r in by[:4]) == pytest.approx(0.03)


def test_a_batched_replica_reserves_its_kv_pool():
    cmap = synthetic_map("llama-2-7b", gpu_type="A6000", max_gpus=2)
    pooled = pooled_map(cmap, 8)
    assert pooled_map(cmap, 1) is cmap
    arch, _ = synthetic_arch("llama-2-7b")
    for e, p in zip(cmap.estimates, pooled.estimates):
        exact = kv_cache_bytes_per_layer(arch, e.config, 7 * cmap.context_tokens)
        grown = p.total_bytes - e.total_bytes
        # fp16 KV within 2%, int8 within 4% (read as half of fp16's, its scales make it a little more)
        assert grown == pytest.approx(e.config.tp * e.num_layers * exact, rel=0.04), e.config.key()
    kv = map_kv_bytes(cmap.estimates, cmap.context_tokens)
    c = cmap.estimates[0].config
    assert kv(c, 2 * cmap.context_tokens) == pytest.approx(2 * kv(c, cmap.context_tokens), abs=1)


def test_the_kv_bytes_read_from_a_map_match_the_formula():
    cmap = synthetic_map("llama-2-13b", gpu_type="A6000", max_gpus=4)
    arch, _ = synthetic_arch("llama-2-13b")
    checked = 0
    for e in cmap.estimates:
        kv = layer_kv_bytes(cmap.estimates, e)
        assert kv is not None
        exact = kv_cache_bytes_per_layer(arch, e.config, cmap.context_tokens)
        assert kv == pytest.approx(exact, rel=0.02 if e.config.kv_quant == "fp16" else 0.04)
        checked += 1
    assert checked > 10
    lone = [e for e in cmap.estimates if e.config.kv_quant == "fp16"][:1]
    assert layer_kv_bytes(lone, lone[0]) is None


# ---------------------------------------------------------------------------------------------------
# the step-time model


def _estimates():
    cmap = synthetic_map("llama-2-7b", gpu_type="A6000", max_gpus=1)
    plain = next(e for e in cmap.estimates if e.config == Configuration())
    sloped = msgspec.structs.replace(plain, tpot_per_position_ms=0.002)
    host = msgspec.structs.replace(plain, tpot_host_ms=[plain.tpot_ms * 1.5, 0.0], ttft_host_ms=[30.0, 0.01])
    return cmap, [plain, sloped, host]


def test_one_sequence_and_no_prompt_gives_exactly_the_batch_1_step():
    cmap, ests = _estimates()
    for e in ests:
        m = step_model(cmap.estimates, e, cmap.context_tokens)
        assert m.kv_share > 0
        for k in (0, 1, 200, 1023, 4000):
            assert m.step_ms(1, k) == e.step_ms(k)
            assert m.decode_ms(1, k) == e.step_ms(k)
        assert m.step_ms(0, 0, [(0, 300)]) == e.ttft_ms(300)


def test_the_step_grows_with_the_batch_and_the_kv_it_reads():
    cmap, ests = _estimates()
    for e in ests:
        m = step_model(cmap.estimates, e, cmap.context_tokens)
        for b in (1, 2, 8, 32):
            steps = [m.decode_ms(b, k) for k in (b, 100 * b, 1000 * b, 4000 * b)]
            assert steps == sorted(steps)
        per_seq = [m.decode_ms(b, 1000 * b) for b in (1, 2, 4, 8, 16, 64)]
        assert per_seq == sorted(per_seq) and per_seq[-1] > per_seq[0]
        # far below b times the batch-1 step: the weights are read once for the whole batch
        assert per_seq[3] < 0.5 * 8 * per_seq[0]
        if not e.tpot_host_ms:
            at_fixed_kv = [m.decode_ms(b, 8000) for b in (1, 2, 4, 8)]
            assert all(y >= x * (1 - 1e-12) for x, y in zip(at_fixed_kv, at_fixed_kv[1:]))


def test_prompt_chunks_add_their_share_of_the_ttft():
    cmap, ests = _estimates()
    m = step_model(cmap.estimates, ests[0], cmap.context_tokens)
    e = ests[0]
    whole = m.step_ms(0, 0, [(0, 1000)])
    chunked = m.step_ms(0, 0, [(0, 512)]) + m.step_ms(0, 0, [(512, 488)])
    assert chunked > whole  # the second pass pays the fixed part again
    assert chunked == pytest.approx(e.ttft_ms(1000) + e.ttft_ms(0))
    mixed = m.step_ms(4, 4000, [(0, 100)])
    assert mixed == pytest.approx(m.decode_ms(4, 4000) + e.ttft_ms(100) - e.ttft_ms(0))


def test_without_a_kv_sibling_the_share_is_the_fits_own_slope():
    _, ests = _estimates()
    sloped = ests[1]
    m = step_model([sloped], sloped, 2048)
    assert m.kv_share == pytest.approx(sloped.tpot_per_position_ms / sloped.tpot_ms)
    assert StepModel(ests[0]).decode_ms(8, 8000) == ests[0].step_ms(1000)  # flat line, no share: weights only


# ---------------------------------------------------------------------------------------------------
# the flag


def _parse(argv, monkeypatch, env=None):
    if env is None:
        monkeypatch.delenv("ISERVE_MAX_BATCH", raising=False)
    else:
        monkeypatch.setenv("ISERVE_MAX_BATCH", env)
    ap = argparse.ArgumentParser()
    sim.add_common_args(ap)
    return ap.parse_args(argv)


def test_the_max_batch_flag_and_its_environment_twin(monkeypatch):
    assert _parse([], monkeypatch).max_batch == 1
    assert _parse(["--max-batch", "4"], monkeypatch).max_batch == 4
    assert _parse([], monkeypatch, env="16").max_batch == 16
    assert _parse(["--max-batch", "2"], monkeypatch, env="16").max_batch == 2
    with pytest.raises(SystemExit):
        _parse(["--max-batch", "-1"], monkeypatch)
    models = sim.resolve_models(["tiny"], maps_dir=None, gpu_type="A6000", max_gpus=1)
    trace = [TraceRequest(arrival_s=0.0, context_tokens=10, generated_tokens=5, index=0)]

    def spec(args):
        return sim.spec_from_args(
            args,
            models=models,
            trace_label="t",
            trace=trace,
            system="iserve",
            intent_kind="min-latency",
            rate=1.0,
            slo_scale=0.0,
            deploy_every_s=0.0,
            deploy_batch=1,
        )

    assert spec(_parse(["--max-batch", "3"], monkeypatch)).max_batch == 3
    assert spec(_parse(["--max-batch", "0"], monkeypatch)).max_batch == 8  # the deployer's default


def test_the_live_replay_asks_for_the_deployers_batch_unless_told(monkeypatch):
    from iserve.loadgen.config import parse

    monkeypatch.delenv("ISERVE_MAX_BATCH", raising=False)
    assert parse(["--dry-run"]).max_batch == 0
    assert parse(["--dry-run", "--max-batch", "1"]).max_batch == 1
    monkeypatch.setenv("ISERVE_MAX_BATCH", "4")
    assert parse(["--dry-run"]).max_batch == 4
    with pytest.raises(SystemExit):
        parse(["--dry-run", "--max-batch", "-2"])


def _batched_measurement(n: int, lines: dict[int, tuple[float, float, float, float]]):
    """A fingerprint of ``n`` layers whose batched step at batch ``b`` and position ``x`` is
    ``n * (la + ls x) + (oa + os x)`` for ``lines[b] = (la, ls, oa, os)``."""
    from iserve.messages import BatchDecodeTiming, FingerprintMeasurement, ProfileVariant, PromptTiming

    timings = [
        BatchDecodeTiming(batch=b, position=x, step_ms=n * (la + ls * x) + oa + os * x)
        for b, (la, ls, oa, os) in lines.items()
        for x in (40, 300)
    ]
    return FingerprintMeasurement(
        num_layers=n,
        variant=ProfileVariant(),
        ttft=[PromptTiming(prompt_tokens=p, ttft_ms=n * 0.5 + 0.001 * p) for p in (32, 128)],
        tpot_ms=n * 0.1 + 0.2,
        decode_steps=10,
        peak_bytes=n * 2**20 + 2**22,
        weight_bytes=n * 2**19,
        batch_decode=timings,
    )


def test_batched_steps_of_the_fingerprints_extrapolate_to_the_model_and_interpolate_in_the_batch():
    from iserve.fingerprint import estimator as est
    from iserve.fingerprint.estimator.latency import fit_batched

    lines = {1: (0.10, 1e-4, 0.3, 0.0), 8: (0.12, 6e-4, 0.35, 0.0), 32: (0.2, 2.4e-3, 0.4, 1e-5)}
    ms = [_batched_measurement(n, lines) for n in (1, 2)]
    terms = fit_batched(ms, [1, 2])
    assert [b for b, _, _ in terms] == [1, 8, 32]
    for (b, layer, other), (la, ls, oa, os) in zip(terms, lines.values()):
        assert layer == pytest.approx((la, ls), rel=1e-6) and other == pytest.approx((oa, os), rel=1e-6, abs=1e-9)
    arch, w = synthetic_arch("llama-2-7b")
    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=1024)
    L = arch.num_layers
    assert e.batch_sizes == [1, 8, 32]
    model = StepModel(e)
    for b, (la, ls, oa, os) in lines.items():  # at a measured size: the fingerprint lines times L
        assert model.decode_ms(b, b * 500) == pytest.approx(L * (la + ls * 500) + oa + os * 500, rel=1e-6)
    mid = model.decode_ms(20, 20 * 500)  # between 8 and 32: on the straight line between them
    assert mid == pytest.approx((model.decode_ms(8, 8 * 500) + model.decode_ms(32, 32 * 500)) / 2, rel=1e-6)
    beyond = model.decode_ms(56, 56 * 500)  # past 32: along the last two
    assert beyond == pytest.approx(2 * model.decode_ms(32, 32 * 500) - model.decode_ms(8, 8 * 500), rel=1e-6)
    assert model.step_ms(4, 4 * 500, [(0, 100)]) > model.decode_ms(4, 4 * 500)  # chunks still add
    old = msgspec.json.decode(
        msgspec.json.encode(msgspec.structs.replace(e, batch_sizes=[], batch_step_ms=[], batch_step_per_position_ms=[]))
    )
    assert "batch_sizes" in old  # an estimate without them decodes and uses the roofline model
    assert StepModel(msgspec.structs.replace(e, batch_sizes=[])).decode_ms(1, 500) == pytest.approx(e.step_ms(500))
