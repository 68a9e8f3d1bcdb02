"""The profiler's measurement method (``iserve.gpu_agent.profiling``), on the CPU: the protocol,
wall times per prompt length and per decode position, the device pass (with a stand-in clock),
memory and GPU-seconds, and profiling jobs with variants the engine refuses."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
import torch

from iserve.errors import BadRequest, CheckpointError, UnsupportedModel
from iserve.gpu_agent import profiling
from iserve.gpu_agent.profiling import job as job_mod
from iserve.gpu_agent.profiling import measure as measure_mod
from iserve.gpu_agent.profiling import protocol as protocol_mod
from iserve.gpu_agent.profiling import timing as timing_mod
from iserve.messages import FingerprintMeasurement, ProfileJob, ProfileResult, ProfileVariant, decoder, encode
from iserve.modelmaker import make_checkpoint

torch.set_num_threads(1)

PROTOCOL = profiling.Protocol(prompt_lengths=(8, 16, 32), output_lengths=(3, 6), repeats=2, warmup=1, context_tokens=64)


@pytest.fixture(scope="module")
def fps(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("fp")
    return [make_checkpoint(root / f"L{n}", "tiny-llama", num_layers=n) for n in (1, 2)]


def test_protocol_checks_and_decode_runs():
    assert PROTOCOL.decode_runs() == [(32, 3), (16, 6)]
    decode_runs = profiling.Protocol(prompt_lengths=(128, 512, 1024), output_lengths=(8, 32, 64)).decode_runs()
    assert decode_runs == [(1024, 8), (512, 32), (128, 64)]
    with pytest.raises(BadRequest, match="2 or more"):
        profiling.Protocol(prompt_lengths=(8,), output_lengths=(1,))
    with pytest.raises(BadRequest, match="exceeds"):
        profiling.Protocol(prompt_lengths=(60,), output_lengths=(8,), context_tokens=64)
    with pytest.raises(BadRequest):
        profiling.Protocol(prompt_lengths=(), output_lengths=(4,))


def test_measure_model_wall_times_memory_and_cost(fps):
    m = profiling.measure_model(fps[1], "cpu", protocol=PROTOCOL, num_layers=2)
    assert m.num_layers == 2 and m.variant == ProfileVariant() and m.timer == "perf_counter"
    assert [t.prompt_tokens for t in m.ttft] == [8, 16, 32] and all(t.ttft_ms > 0 for t in m.ttft)
    # one median per position fed by a decode step: (32, 3) feeds 32, 33; (16, 6) feeds 16..20
    assert [d.position for d in m.decode] == [16, 17, 18, 19, 20, 32, 33]
    assert m.decode_steps == 2 * 7 and m.tpot_ms > 0
    assert not m.ttft_device and not m.decode_device  # no device timing on the CPU
    assert m.kv_cache_bytes == 2 * 2 * 2 * 64 * 32 * 4 and m.context_tokens == 64  # fp32 cache on the CPU
    assert m.peak_bytes > m.weight_bytes + m.kv_cache_bytes and m.gpu_seconds > 0
    with pytest.raises(CheckpointError, match="2-layer"):
        profiling.measure_model(fps[0], "cpu", protocol=PROTOCOL, num_layers=2)


class FakeClock:
    """Stands in for ``DeviceClock`` on the CPU: marks are host times; a spin of ``ms`` advances a
    virtual device clock, so ``elapsed`` of a pair around a spin would include it."""

    def __init__(self, _device):
        self.spun = []

    def mark(self):
        return time.perf_counter()

    def spin(self, ms):
        self.spun.append(ms)

    def sync(self):
        pass

    @staticmethod
    def elapsed(a, b):
        return (b - a) * 1000.0


def test_the_device_pass_times_batches_queued_behind_a_spin(fps, monkeypatch):
    clocks = []

    def factory(dev):
        clocks.append(FakeClock(dev))
        return clocks[-1]

    queued = []
    from iserve.gpu_agent.engine.runner import Engine

    real_prefill, real_decode = Engine.queue_prefill, Engine.queue_decode
    monkeypatch.setattr(
        Engine, "queue_prefill", lambda self, ids: (queued.append(("p", len(ids))), real_prefill(self, ids))[1]
    )
    monkeypatch.setattr(
        Engine, "queue_decode", lambda self, pos: (queued.append(("d", pos)), real_decode(self, pos))[1]
    )
    m = profiling.measure_model(fps[0], "cpu", protocol=PROTOCOL, num_layers=1, clock_factory=factory)
    assert [t.prompt_tokens for t in m.ttft_device] == [8, 16, 32]
    # each decode run is device-timed at its first and its last position: (32, 3) feeds 32..33, (16, 6) 16..20
    assert [d.position for d in m.decode_device] == [16, 20, 32, 33]
    assert m.tpot_device_ms > 0 and m.timer == "perf_counter+cuda_events"
    # at most DEVICE_REPEATS samples; each sample is one spin and a batch queued back to back
    assert PROTOCOL.device_repeats == min(PROTOCOL.repeats, protocol_mod.DEVICE_REPEATS) == 2
    spins = clocks[0].spun
    assert len(spins) == 2 * (3 + 4)
    assert queued.count(("p", 8)) == 2 * timing_mod.DEVICE_PREFILLS
    assert queued.count(("d", 20)) == 2 * timing_mod.DEVICE_STEPS
    # a spin outlasts the batch's wall time twice over
    assert min(spins) >= 2 * timing_mod.DEVICE_PREFILLS * min(t.ttft_ms for t in m.ttft)


def test_jobs_time_the_device_when_asked_and_without_a_deep_run():
    job = ProfileJob(
        job_id="j",
        model="m",
        fingerprint_paths=[],
        gpu_index=0,
        variants=[],
        prompt_lengths=[8, 16],
        output_lengths=[3, 5],
        repeats=7,
        warmup=1,
        context_tokens=64,
    )
    assert profiling.protocol_of_job(job).device_repeats == protocol_mod.DEVICE_REPEATS == 3
    assert profiling.protocol_of_job(msgspec.structs.replace(job, device_timing=False)).device_repeats == 0
    deep = profiling.protocol_of_job(msgspec.structs.replace(job, replay_depth=32))
    assert deep.device_repeats == 0 and deep.replay_depth == 32 and deep.repeats == 7


def test_a_deep_run_on_one_process_captures_the_protocols_prefills_and_cuts_its_decode_runs(fps, monkeypatch):
    """The replayed deep run captures only the prefill graphs of the protocol's prompt lengths and
    cuts each decode run to ``DEEP_STEPS`` steps, for ``DEEP_REPEATS`` rounds."""
    loads = []
    real = measure_mod.load_engine

    def spy(*a, **kw):
        loads.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(measure_mod, "load_engine", spy)
    monkeypatch.setattr(timing_mod, "DEEP_STEPS", 2)
    proto = profiling.Protocol(
        prompt_lengths=(8, 16, 32), output_lengths=(3, 6), repeats=4, warmup=1, context_tokens=64, replay_depth=5
    )
    ms = profiling.measure_models(fps, "cpu", protocol=proto, device_timing=False)
    assert [m.num_layers for m in ms] == [1, 2, 5] and ms[2].replayed_from == 2
    assert [kw.get("prefill_lengths") for kw in loads] == [None, None, [8, 16, 32]]
    deep = ms[2]
    assert [t.prompt_tokens for t in deep.ttft] == [8, 16, 32]
    # (32, 3) -> 3 tokens: steps feeding 32, 33; (16, 6) cut to 3 tokens: 16, 17
    assert [d.position for d in deep.decode] == [16, 17, 32, 33]
    assert deep.decode_steps == timing_mod.DEEP_REPEATS * 4


def test_measure_fingerprint_keeps_its_signature(fps):
    m = profiling.measure_fingerprint(
        fps[0],
        "cpu",
        num_layers=1,
        prompt_lengths=[8, 16],
        output_lengths=[3, 5],
        repeats=1,
        warmup=0,
        context_tokens=32,
        variant=ProfileVariant(kv_quant="int8"),
    )
    assert m.variant.kv_quant == "int8" and len(m.ttft) == 2


def _job(paths, variants, **kw) -> ProfileJob:
    return ProfileJob(
        job_id="j1",
        model="tiny",
        fingerprint_paths=[str(p) for p in paths],
        gpu_index=0,
        variants=variants,
        prompt_lengths=[8, 16],
        output_lengths=[3, 5],
        repeats=1,
        warmup=0,
        context_tokens=32,
        gpu_warmup_s=0.0,
        **kw,
    )


def test_profile_job_measures_variants_and_reports_the_ones_it_cannot(fps, tmp_path, monkeypatch):
    real = measure_mod.load_engine

    def picky(model_dir, device, context_tokens, variant, **kw):
        if variant.weight_quant == "int4":
            raise UnsupportedModel("int4 needs a CUDA device here")
        return real(model_dir, device, context_tokens, variant, **kw)

    monkeypatch.setattr(measure_mod, "load_engine", picky)
    variants = [
        ProfileVariant(),
        ProfileVariant(weight_quant="int4"),
        ProfileVariant(tp=2),
        ProfileVariant(pruning="structured"),
    ]
    job = _job(fps, variants)
    (tmp_path / "job.json").write_bytes(encode(job))
    result = profiling.run_profile_job_file(tmp_path / "job.json", tmp_path / "result.json", ["cpu"])
    assert decoder(ProfileResult).decode((tmp_path / "result.json").read_bytes()) == result
    assert {(m.variant, m.num_layers) for m in result.measurements} == {
        (ProfileVariant(), 1),
        (ProfileVariant(), 2),
        (ProfileVariant(pruning="structured"), 1),
        (ProfileVariant(pruning="structured"), 2),
    }
    assert result.skipped == {
        "tp1-wint4-kvfp16-pnone": "int4 needs a CUDA device here",
        "tp2-wfp16-kvfp16-pnone": "needs 2 GPUs, the profiling job had 1",
    }
    assert result.gpu_type == "cpu" and result.gpu_seconds >= sum(m.gpu_seconds for m in result.measurements) * 0.99
    assert result.peak_bytes == max(m.peak_bytes for m in result.measurements)


def test_profile_job_errors_other_than_unsupported_propagate(fps):
    """A broken fingerprint fails the whole job (the agent reports it; the service retries on
    another GPU), unlike a variant the engine refuses."""
    with pytest.raises(BadRequest):
        profiling.run_profile_job(_job(fps, [ProfileVariant()]), [])
    with pytest.raises(CheckpointError):
        profiling.run_profile_job(_job([fps[0].parent / "missing"], [ProfileVariant()]), ["cpu"])


def test_tensor_parallel_variants_run_on_spawned_ranks(fps):
    """TP variants of one degree share one set of rank processes (gloo on the CPU here); rank 0
    times, the memory is the largest rank's; a degree above the devices given is reported."""
    variants = [ProfileVariant(), ProfileVariant(tp=2), ProfileVariant(tp=2, kv_quant="int8"), ProfileVariant(tp=4)]
    result = profiling.run_profile_job(_job(fps, variants), ["cpu", "cpu"])
    got = {(m.variant, m.num_layers): m for m in result.measurements}
    assert set(got) == {(v, n) for v in variants[:3] for n in (1, 2)}
    tp2 = got[ProfileVariant(tp=2), 2]
    assert tp2.tp == 2 and tp2.ttft and tp2.decode
    assert tp2.kv_cache_bytes == got[ProfileVariant(), 2].kv_cache_bytes // 2
    assert result.skipped == {"tp4-wfp16-kvfp16-pnone": "needs 4 GPUs, the profiling job had 2"}
    assert result.gpu_seconds > result.wall_seconds  # the second rank's device time counts too


def test_the_fingerprint_pair_is_timed_interleaved(fps, monkeypatch):
    """Both fingerprints stay loaded and take turns within every repeat, so drift between them
    does not enter their difference (the per-layer cost)."""
    calls = []
    real = timing_mod._run_wall

    def spy(engine, ids, max_tokens, sink=None):
        calls.append((engine.arch.num_layers, len(ids), max_tokens, sink is not None))
        return real(engine, ids, max_tokens, sink)

    monkeypatch.setattr(timing_mod, "_run_wall", spy)
    m1, m2 = profiling.measure_models(fps, "cpu", protocol=PROTOCOL, num_layers=[1, 2])
    assert (m1.num_layers, m2.num_layers) == (1, 2) and m1.decode and m2.ttft
    timed = [c[0] for c in calls if c[3]]  # the timed runs hand tokens to the sink
    per_engine = 3 + 2  # prompt lengths + decode runs
    assert timed == ([1] * per_engine + [2] * per_engine) * PROTOCOL.repeats
    assert m1.gpu_seconds == m2.gpu_seconds > 0


def _tp_pair_rank(rank: int, size: int, port: int, paths: list[str], queue) -> None:
    """One CPU rank of a TP=2 measurement of the fingerprint pair; rank 0 records its run order."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        calls = []
        real = timing_mod._run_wall

        def spy(engine, ids, max_tokens, sink=None):
            calls.append((engine.arch.num_layers, sink is not None))
            return real(engine, ids, max_tokens, sink)

        timing_mod._run_wall = spy
        ms = profiling.measure_models(
            paths, "cpu", protocol=PROTOCOL, variant=ProfileVariant(tp=2), num_layers=[1, 2], tp_rank=rank, tp_size=size
        )
        queue.put((rank, ([c[0] for c in calls if c[1]], [encode(m) for m in ms])))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(e).__name__}: {e}"))


def test_tp_fingerprint_pair_is_timed_interleaved_too(fps, spawn_ranks):
    """At TP=2 the pair is loaded together on every rank and rank 0 times it interleaved, as at TP=1
    (timing each fingerprint in its own session let drift between them into the per-layer cost:
    TP=2 estimates were 2x off on two H200s). The follower runs every generation the leader
    announces, for the right engine, and reports its own memory."""
    results = spawn_ranks(_tp_pair_rank, 2, [str(p) for p in fps])
    order, lead = results[0]
    per_engine = 3 + 2
    assert order == ([1] * per_engine + [2] * per_engine) * PROTOCOL.repeats
    m1, m2 = (decoder(FingerprintMeasurement).decode(b) for b in lead)
    assert (m1.num_layers, m2.num_layers, m1.tp) == (1, 2, 2) and m1.ttft and m2.decode
    f1, f2 = (decoder(FingerprintMeasurement).decode(b) for b in results[1][1])
    assert not f1.ttft and f1.peak_bytes > 0 and f2.weight_bytes > f1.weight_bytes


def test_replayed_depth_adds_a_deep_run_of_the_deepest_fingerprint(fps):
    """With ``replay_depth`` the 2-layer fingerprint also runs with its layers replayed to that depth:
    a third measurement, timed interleaved with the pair, whose latency is a deep model's while its
    weights are the fingerprint's; the estimator fits memory without it."""
    from iserve import checkpoint
    from iserve.fingerprint import estimator

    protocol = profiling.Protocol(
        prompt_lengths=(8, 16, 32), output_lengths=(3, 6), repeats=2, context_tokens=64, replay_depth=6
    )
    ms = profiling.measure_models(fps, "cpu", protocol=protocol, num_layers=[1, 2])
    assert [(m.num_layers, m.replayed_from) for m in ms] == [(1, 0), (2, 0), (6, 2)]
    assert ms[2].weight_bytes == ms[1].weight_bytes and ms[2].kv_cache_bytes == 3 * ms[1].kv_cache_bytes
    assert ms[2].ttft and ms[2].decode
    # The deep run is as long as a full model's pass: DEEP_REPEATS rounds, not the pair's.
    protocol5 = profiling.Protocol(
        prompt_lengths=(8, 16, 32), output_lengths=(3, 6), repeats=5, context_tokens=64, replay_depth=6
    )
    calls = []
    real = timing_mod._run_wall
    try:
        timing_mod._run_wall = lambda engine, ids, n, sink=None: (
            calls.append((len(engine.stages[0].layers), sink is not None)) or real(engine, ids, n, sink)
        )
        profiling.measure_models(fps, "cpu", protocol=protocol5, num_layers=[1, 2])
    finally:
        timing_mod._run_wall = real
    timed = [n for n, s in calls if s]
    assert timed.count(6) == timing_mod.DEEP_REPEATS * (3 + 2) and timed.count(1) == timed.count(2) == 5 * 5
    ck = checkpoint.scan_checkpoint(fps[1])
    arch, weights = ck.arch, checkpoint.weight_breakdown(ck)
    with_deep = estimator.fit_variant(arch, weights, ms)
    pair = estimator.fit_variant(arch, weights, ms[:2])
    assert with_deep.fingerprint_layers == (1, 2)
    assert (with_deep.activation_layer_bytes, with_deep.overhead_bytes) == (
        pair.activation_layer_bytes,
        pair.overhead_bytes,
    )
    with pytest.raises(ValueError, match="two depths"):
        estimator.fit_variant(arch, weights, [ms[0], ms[2]])  # memory needs two loaded depths
    with pytest.raises(BadRequest, match="replay_depth"):
        profiling.Protocol(prompt_lengths=(8, 16), output_lengths=(3,), replay_depth=-1)
    assert ms[2].replay_copies == 0
    # replay_distinct (from the job): the deep run's 4 replayed layers are copies; the pair is as before.
    job = ProfileJob(
        job_id="j",
        model="m",
        fingerprint_paths=[str(f) for f in fps],
        gpu_index=0,
        prompt_lengths=[8, 16, 32],
        output_lengths=[3, 6],
        repeats=2,
        context_tokens=64,
        replay_depth=6,
        replay_distinct=True,
    )
    distinct = profiling.measure_models(fps, "cpu", protocol=profiling.protocol_of_job(job), num_layers=[1, 2])
    assert [(m.num_layers, m.replayed_from, m.replay_copies) for m in distinct] == [(1, 0, 0), (2, 0, 0), (6, 2, 4)]
    assert distinct[2].weight_bytes > ms[2].weight_bytes


def test_replay_depth_setting():
    from iserve.checkpoint import arch_from_config
    from iserve.fingerprint import estimator
    from iserve.modelmaker import preset_config

    arch = arch_from_config(preset_config("llama-2-7b"))
    assert estimator.replay_depth(arch, -1) == 32 and estimator.replay_depth(arch, 0) == 0
    assert estimator.replay_depth(arch, 48) == 48 and estimator.replay_depth(arch, 2) == 0
    with pytest.raises(ValueError):
        estimator.replay_depth(arch, -2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_a_job_times_batches_and_deep_steps_and_its_tensor_cache_changes_no_measured_memory(fps, monkeypatch):
    """The one-GPU path end to end: fingerprints built from the job's tensor cache measure the same
    memory as fingerprints read from their files (the cache is the process's, not the engines'),
    the job's own peak counts the cache, a job without a deep run is device-timed, the deep run runs
    its decode runs, and the fused decode is on."""
    job = _job(fps, [ProfileVariant()], replay_depth=6)
    job = msgspec.structs.replace(job, repeats=2, context_tokens=64, gpu_warmup_s=0.2)
    plain = profiling.run_profile_job(msgspec.structs.replace(job, replay_depth=0), ["cuda:0"])
    assert all(m.ttft_device and m.decode_device and m.timer == "perf_counter+cuda_events" for m in plain.measurements)
    cached = profiling.run_profile_job(job, ["cuda:0"])
    monkeypatch.setattr(job_mod, "CACHE_ROOM", 10**12)  # no room: every engine reads its files
    read = profiling.run_profile_job(job, ["cuda:0"])
    assert [m.num_layers for m in cached.measurements] == [1, 2, 6]
    for a, b in zip(cached.measurements[:2], read.measurements[:2]):
        assert a.peak_bytes == pytest.approx(b.peak_bytes, abs=2 << 20)
        assert a.reserved_peak_bytes == pytest.approx(b.reserved_peak_bytes, abs=4 << 20)
        assert a.fused_decode and a.fused_error == ""
    assert cached.peak_bytes > read.peak_bytes
    deep = cached.measurements[2]
    assert deep.replayed_from == 2 and [t.prompt_tokens for t in deep.ttft] == [8, 16] and deep.decode
    assert deep.prefill_graph_tokens == 64  # only the buckets of 8 and 16 tokens (64 both) were captured


def test_a_tp_measurement_that_overruns_names_its_variant_and_shows_the_ranks_stacks(fps, capfd):
    """A hung TP measurement (run 8 on two H200s hung without a trace) is killed at the job's time
    limit; before that every live rank prints its threads' stacks, so the hang can be located."""
    # Rounds without end: at the time limit both ranks are timing (their start takes a few seconds).
    job = msgspec.structs.replace(_job(fps, [ProfileVariant(tp=2)]), repeats=1_000_000, timeout_s=25.0)
    with pytest.raises(TimeoutError, match="tp2-wfp16-kvfp16-pnone"):
        profiling.run_profile_job(job, ["cpu", "cpu"])
    err = capfd.readouterr().err
    assert err.count("most recent call first") >= 2, err[-2000:]  # faulthandler's dumps, from both ranks' stderr
    assert "_tp_rank_main" in err


def test_batched_steps_are_timed_at_each_batch_size_and_both_positions(fps):
    """``Protocol.batch_sizes``: the batching engine's decode step of each fingerprint at each size, from
    the shortest and the longest prompt; the batch-1 timings are unchanged, TP runs none."""
    protocol = protocol_mod.Protocol(
        prompt_lengths=(8, 16, 32), output_lengths=(3, 6), repeats=2, warmup=1, context_tokens=64, batch_sizes=(1, 4)
    )
    ms = profiling.measure_models([fps[0], fps[1]], "cpu", protocol=protocol, num_layers=[1, 2])
    for m in ms:
        got = [(t.batch, t.position) for t in m.batch_decode]
        # prefilled to 8 (or 32) tokens, a first token, one untimed step, two timed ones: positions 10, 11
        assert got == [(1, 10), (1, 34), (4, 10), (4, 34)], got
        assert all(t.step_ms > 0 for t in m.batch_decode)
        assert [t.prompt_tokens for t in m.ttft] == [8, 16, 32]
    assert not profiling.measure_model(fps[0], "cpu", protocol=PROTOCOL, num_layers=1).batch_decode
    with pytest.raises(BadRequest, match="batch_sizes"):
        protocol_mod.Protocol(prompt_lengths=(8,), output_lengths=(3,), batch_sizes=(0,))
    job = ProfileJob(job_id="j", model="m", fingerprint_paths=[], gpu_index=0, batch_sizes=[8, 1, 8])
    assert protocol_mod.protocol_of_job(job).batch_sizes == (1, 8)
    with pytest.raises(msgspec.ValidationError):
        decoder(ProfileJob).decode(encode(msgspec.structs.replace(job, batch_sizes=[0])))
