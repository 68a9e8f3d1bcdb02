"""Unit tests of the small pure pieces: busy window, FCFS queues, prompt fitting, flags, messages."""

from __future__ import annotations

import argparse
import os

import msgspec
import pytest

from iserve import errors
from iserve import messages as m
from iserve.gpu_agent.load import BusyWindow, busy_from_heartbeats, parse_simulated
from iserve.gpu_agent.prompts import fit_prompt
from iserve.scheduler.queues import FcfsQueues, Queued
from iserve.settings import flag

# --- busy window (paper: load = busy seconds / window) ------------------------------------------


def test_busy_window_fraction_and_expiry():
    w = BusyWindow(window_s=10)
    for t in range(1, 11):
        w.add(float(t), 1.0, 0.5 if t <= 5 else 0.0)
    assert w.fraction(10.0) == pytest.approx(0.25)
    # after the busy half slides out of the window the GPU is idle
    for t in range(11, 16):
        w.add(float(t), 1.0, 0.0)
    assert w.fraction(15.0) == pytest.approx(0.0)


def test_busy_window_prorates_the_sample_straddling_its_start():
    # reports every 1.1 s (a late timer) into a 10 s window: 10 samples cover 11 s, and the fraction
    # must stay the true busy share, not busy seconds of 11 s over 10
    w = BusyWindow(window_s=10)
    t = 0.0
    for _ in range(20):
        t += 1.1
        w.add(t, 1.1, 0.55)
    assert w.fraction(t) == pytest.approx(0.5)


def test_busy_window_short_history_and_clamping():
    w = BusyWindow(window_s=120)
    w.add(1.0, 1.0, 5.0)  # more busy time than the interval is clamped
    assert w.fraction(1.0) == 1.0
    with pytest.raises(ValueError):
        BusyWindow(0)


def test_busy_from_heartbeats_takes_largest_delta():
    assert busy_from_heartbeats({"a": 1.0, "b": 2.0}, {"a": 1.6, "b": 2.2}, 1.0) == pytest.approx(0.6)
    assert busy_from_heartbeats({}, {"new": 9.0}, 1.0) == 0.0  # no previous reading: no delta yet
    assert busy_from_heartbeats({"a": 0.0}, {"a": 3.0}, 1.0) == 1.0


def test_parse_simulated():
    assert parse_simulated("2x48GB") == [48 * 2**30] * 2
    assert parse_simulated("1x80GB,2x24g") == [80 * 2**30, 24 * 2**30, 24 * 2**30]
    for bad in ("", "x48GB", "2x", "0x10GB", "eight"):
        with pytest.raises(ValueError):
            parse_simulated(bad)


# --- FCFS ------------------------------------------------------------------------------------------


def q(rid: str, t: float = 0.0, model: str = "m", deadline: float = 100.0) -> Queued[str]:
    return Queued(rid, model, t, deadline, rid)


def test_fcfs_order_and_one_at_a_time():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d1", "m")
    for i in range(3):
        f.enqueue(q(f"r{i}", i))
    first = f.start_next("d1")
    assert first.request_id == "r0"
    assert f.start_next("d1") is None  # busy: no second request starts
    f.finish("d1", "r0")
    assert f.start_next("d1").request_id == "r1"


def test_fcfs_balances_replicas_by_outstanding_work():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("a", "m")
    f.add_replica("b", "m")
    f.add_replica("c", "other")
    placed = [f.enqueue(q(f"r{i}")).deployment_id for i in range(4)]
    assert placed == ["a", "b", "a", "b"]
    assert f.enqueue(q("x", model="missing")) is None
    assert f.enqueue(q("pin"), deployment_id="b").deployment_id == "b"
    assert f.enqueue(q("wrong"), deployment_id="c") is None  # c serves another model


def test_a_queue_is_full_only_when_every_replica_has_max_queued_waiting():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("a", "m")
    f.add_replica("b", "m")
    for i in range(4):
        f.enqueue(q(f"r{i}"))
    f.start_next("a")
    f.start_next("b")  # one running on each, one waiting on each
    assert not f.full("m", "", 2) and f.full("m", "", 1) and f.full("m", "a", 1)
    assert not f.full("m", "", 0)  # 0: no limit
    f.finish("a", "r0")
    f.start_next("a")  # a's waiting request starts
    assert not f.full("m", "", 1)  # a has room again
    assert not f.full("missing", "", 1)  # no replica: not "full" (the caller says not_found)


def test_fcfs_cancel_expire_and_remove():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m")
    f.enqueue(q("run"))
    f.enqueue(q("wait", deadline=5.0))
    f.enqueue(q("late", deadline=1.0))
    f.start_next("d")
    assert f.cancel("run") == ("d", f.replicas["d"].running["run"], True)
    dep, item, running = f.cancel("wait")
    assert (dep, item.request_id, running) == ("d", "wait", False)
    assert [x.request_id for x in f.expire(2.0)] == ["late"]
    f.enqueue(q("later", deadline=3.0))
    assert [(d, x.request_id) for d, x in f.expire_by_replica(3.0)] == [("d", "later")]
    assert f.depth("d") == 0
    assert f.cancel("nope") == ("", None, False)
    orphans = f.remove_replica("d")
    assert [x.request_id for x in orphans] == ["run"]


# --- prompt fitting (trace replay asks for exactly ContextTokens) ---------------------------------


def test_fit_prompt_pads_and_truncates():
    assert fit_prompt([1, 5, 6], 7, keep_first=True) == [1, 5, 6, 5, 6, 5, 6]
    assert fit_prompt([1, 5, 6, 7], 2, keep_first=True) == [1, 5]
    assert fit_prompt([1], 3, keep_first=True) == [1, 1, 1]
    assert fit_prompt([4, 5], 0, keep_first=False) == [4, 5]


# --- flags with environment twins ------------------------------------------------------------------


def test_flag_reads_env_twin(monkeypatch):
    monkeypatch.setenv("ISERVE_THETA", "0.25")
    monkeypatch.setenv("ISERVE_DRY_RUN", "yes")
    p = argparse.ArgumentParser()
    flag(p, "--theta", default=0.5, type=float)
    flag(p, "--dry-run", default=False, type=bool)
    a = p.parse_args([])
    assert a.theta == 0.25 and a.dry_run is True
    assert p.parse_args(["--theta", "0.9"]).theta == 0.9  # the flag wins over the environment
    assert "ISERVE_THETA" in p.format_help()


def test_flag_bad_env_value_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("ISERVE_THETA", "lots")
    p = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        flag(p, "--theta", default=0.5, type=float)
    assert "ISERVE_THETA" in capsys.readouterr().err


def test_placement_settings_and_agent_windows_have_env_twins(monkeypatch, capsys):
    from iserve.deployer.config import parse as deployer_parse
    from iserve.gpu_agent.config import parse as agent_parse

    for name in (
        "ISERVE_PLACEMENT",
        "ISERVE_THETA",
        "ISERVE_LOAD_WINDOW_S",
        "ISERVE_INTERVAL_S",
        "ISERVE_WORKER_STALE_S",
    ):
        monkeypatch.delenv(name, raising=False)
    cfg = deployer_parse([])
    assert (cfg.placement, cfg.theta) == ("hybrid", 0.5)
    a = agent_parse([])
    assert (a.interval_s, a.load_window_s, a.worker_stale_s) == (1.0, 120.0, 30.0)  # per second, paper's 120 s window
    monkeypatch.setenv("ISERVE_PLACEMENT", "packing")
    monkeypatch.setenv("ISERVE_THETA", "0.3")
    monkeypatch.setenv("ISERVE_WORKER_STALE_S", "12")
    cfg = deployer_parse([])
    assert (cfg.placement, cfg.theta) == ("packing", 0.3)
    assert agent_parse([]).worker_stale_s == 12.0
    assert deployer_parse(["--placement", "least-loaded"]).placement == "least-loaded"  # the flag wins
    with pytest.raises(SystemExit):
        deployer_parse(["--theta", "1.5"])
    assert "theta" in capsys.readouterr().err
    monkeypatch.setenv("ISERVE_PLACEMENT", "random")  # a bad environment value is refused, not carried along
    with pytest.raises(SystemExit):
        deployer_parse([])
    err = capsys.readouterr().err
    assert "ISERVE_PLACEMENT" in err and "least-loaded" in err


# --- NVML readings (a stand-in pynvml module: no GPU here) ---------------------------------------


def test_nvml_gpus_read_memory_and_utilization(monkeypatch):
    import sys
    import types

    from iserve.gpu_agent.gpus import GpuReading, NvmlGpus, discover

    gib = 1 << 30
    fake = types.ModuleType("pynvml")
    fake.NVMLError = type("NVMLError", (Exception,), {})
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: 2
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3" if h == 0 else "NVIDIA H100 80GB HBM3"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        total=80 * gib, used=(h + 1) * gib, free=(79 - h) * gib
    )

    def util(h):
        if h == 1:
            raise fake.NVMLError("not supported")
        return types.SimpleNamespace(gpu=37, memory=5)

    fake.nvmlDeviceGetUtilizationRates = util
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus = NvmlGpus()
    assert not gpus.simulated
    assert gpus.read() == [
        GpuReading(0, "NVIDIA H100 80GB HBM3", 80 * gib, gib, 37.0),
        GpuReading(1, "NVIDIA H100 80GB HBM3", 80 * gib, 2 * gib, 0.0),
    ]
    assert gpus.visible_devices_env([1, 3]) == {"CUDA_VISIBLE_DEVICES": "1,3"} and gpus.device_for(3, 1) == "cuda:1"
    assert not discover("", "").simulated
    fake.nvmlDeviceGetCount = lambda: 0  # a driver without GPUs: the agent still runs, on a simulated one
    assert discover("", "").simulated


# --- wire messages ---------------------------------------------------------------------------------


def test_messages_round_trip_and_validate():
    req = m.DeployRequest(model="x", intent=m.Intent(kind="latency-slo", slo_ms=2000))
    assert m.decode(m.encode(req), m.DeployRequest) == req
    with pytest.raises(msgspec.ValidationError):
        m.decode(b'{"type":"deploy_request","model":"x","intent":{"kind":"fastest"}}', m.DeployRequest)
    with pytest.raises(msgspec.ValidationError):
        m.decode(b'{"type":"deploy_request"}', m.DeployRequest)


def test_messages_are_append_only_compatible():
    # a newer sender's extra field is ignored; an older sender's missing optional field defaults
    newer = b'{"type":"infer_request","request_id":"r","model":"m","prompt":"p","brand_new":1}'
    r = m.decode(newer, m.InferRequest)
    assert r.max_tokens == 64 and r.stream_to == ""


def test_stream_union_and_error_conversion():
    dec = m.decoder(m.StreamMessage)
    chunk = dec.decode(m.encode(m.TokenChunk(request_id="r", index=0, token_id=5, text="a")))
    assert isinstance(chunk, m.TokenChunk)
    e = dec.decode(m.encode(errors.PromptTooLong("too long", request_id="r").to_reply()))
    err = errors.from_reply(e)
    assert isinstance(err, errors.PromptTooLong) and err.code == "prompt_too_long" and err.request_id == "r"
    unknown = errors.from_reply(m.ErrorReply(code="brand_new_code", message="x"))
    assert unknown.code == "brand_new_code"


def test_configuration_key_and_estimate_math():
    c = m.Configuration(tp=2, pp=4, weight_quant="int4", kv_quant="int8", pruning="2:4")
    assert c.key() == "tp2-pp4-wint4-kvint8-p24" and c.gpus == 8
    e = m.ConfigEstimate(
        config=c,
        ttft_base_ms=10,
        ttft_per_token_ms=0.1,
        tpot_ms=5,
        layer_bytes=100,
        first_stage_bytes=1000,
        last_stage_bytes=2000,
        gpu_overhead_bytes=50,
        total_bytes=0,
        num_layers=32,
    )
    assert e.ttft_ms(100) == pytest.approx(20)
    assert e.latency_ms(100, 11) == pytest.approx(20 + 10 * 5)
    assert e.stage_bytes(8, first=True, last=False) == 50 + 800 + 1000
    assert e.stage_bytes(8, first=True, last=True) == 50 + 800 + 3000


def test_cpu_affinity_mask_and_pinning_off_a_gpu(monkeypatch):
    from iserve.gpu_agent.gpus import cpus_of_mask, pin_to_gpu_cpus

    assert cpus_of_mask([0b1011, 0b1]) == {0, 1, 3, 64}
    assert cpus_of_mask([0, 0]) == set()
    before = os.sched_getaffinity(0)
    assert pin_to_gpu_cpus("cpu") == []  # not a CUDA device: nothing changes
    monkeypatch.setenv("ISERVE_PIN_CPUS", "0")
    assert pin_to_gpu_cpus("cuda:0") == []  # switched off
    assert os.sched_getaffinity(0) == before


def test_a_stream_silent_since_a_bus_reconnect_is_lost():
    from iserve.scheduler.service import stream_lost_in_reconnect as lost

    assert not lost(last_msg=10.0, reconnected_at=None, now=100.0, silent_s=5.0)  # no reconnect: the idle rules
    assert not lost(last_msg=10.0, reconnected_at=12.0, now=16.9, silent_s=5.0)  # tokens may still come
    assert lost(last_msg=10.0, reconnected_at=12.0, now=17.0, silent_s=5.0)
    assert not lost(last_msg=13.0, reconnected_at=12.0, now=30.0, silent_s=5.0)  # it streamed after the reconnect
