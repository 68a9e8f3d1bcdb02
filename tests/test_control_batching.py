"""The control plane of continuous batching, pure: FCFS queues with several slots per replica, the
deployer's KV pool in the memory plan, the wire fields and their defaults, the status table."""

from __future__ import annotations

import msgspec
import pytest
from planner_factories import est
from rich.console import Console
from test_planner_gpu_types import choose, cmap, gpus_of

from iserve import cli
from iserve.deployer.config import parse as parse_deployer
from iserve.deployer.memory import kv_pool_tokens, stage_capacity, with_kv_pool
from iserve.deployer.planner import largest_batch
from iserve.deployer.units import GIB
from iserve.errors import BadRequest, Infeasible
from iserve.fingerprint.estimator.memory import kv_cache_bytes_per_layer
from iserve.messages import (
    ArchSpec,
    Configuration,
    DeploymentRecord,
    DeployRequest,
    GpuAssignment,
    Intent,
    LaunchWorker,
    QueueStats,
    StageSpec,
    WorkerHeartbeat,
    decode,
    encode,
)
from iserve.scheduler.queues import FcfsQueues, Queued
from iserve.tables import deployments_table, queue_row, queues_table


def q(rid: str, t: float = 0.0, model: str = "m", deadline: float = 100.0) -> Queued[str]:
    return Queued(rid, model, t, deadline, rid)


def started(f: FcfsQueues[str], dep: str) -> list[str]:
    """What the scheduler does: start requests while the replica has a free slot."""
    out = []
    while (item := f.start_next(dep)) is not None:
        out.append(item.request_id)
    return out


# --- queues with slots ------------------------------------------------------------------------------


def test_three_slots_start_three_at_once_and_the_fourth_waits_in_order():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m", slots=3)
    for i in range(5):
        f.enqueue(q(f"r{i}", i))
    assert started(f, "d") == ["r0", "r1", "r2"]
    r = f.replicas["d"]
    assert list(r.running) == ["r0", "r1", "r2"] and [x.request_id for x in r.queue] == ["r3", "r4"]
    assert r.outstanding == 5 and r.free_slots == 0 and f.depth("d") == 2
    f.finish("d", "r1")  # any slot that frees takes the oldest queued request
    assert r.free_slots == 1 and started(f, "d") == ["r3"]
    f.finish("d", "r0")
    f.finish("d", "r2")
    assert started(f, "d") == ["r4"] and list(r.running) == ["r3", "r4"]
    f.finish("d", "r3")
    f.finish("d", "r4")
    assert started(f, "d") == [] and r.outstanding == 0


def test_one_slot_is_one_request_at_a_time():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m")
    for i in range(3):
        f.enqueue(q(f"r{i}", i))
    assert started(f, "d") == ["r0"]
    f.finish("d", "r0")
    assert started(f, "d") == ["r1"]


def test_requests_bind_to_the_replica_with_least_outstanding_work_whatever_its_slots():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("a", "m", slots=4)
    f.add_replica("b", "m", slots=1)
    placed = [f.enqueue(q(f"r{i}")).deployment_id for i in range(4)]
    assert placed == ["a", "b", "a", "b"]  # outstanding (queued + running), ties by id: as with one slot
    assert started(f, "a") == ["r0", "r2"] and started(f, "b") == ["r1"]
    assert f.enqueue(q("r4")).deployment_id == "a"  # a: 2 running; b: 1 running + 1 queued; tie -> a


def test_cancel_a_running_request_keeps_its_slot_until_it_finishes():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m", slots=2)
    for rid in ("a", "b", "c"):
        f.enqueue(q(rid))
    started(f, "d")
    dep, item, running = f.cancel("b")
    assert (dep, item.request_id, running) == ("d", "b", True)
    assert "b" in f.replicas["d"].running and started(f, "d") == []  # the worker still has to stop it
    dep, item, running = f.cancel("c")
    assert (dep, item.request_id, running) == ("d", "c", False) and f.depth("d") == 0
    f.finish("d", "b")
    assert list(f.replicas["d"].running) == ["a"] and f.cancel("b") == ("", None, False)


def test_remove_replica_returns_the_queued_then_every_running_request():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m", slots=3)
    for i in range(5):
        f.enqueue(q(f"r{i}", i))
    started(f, "d")
    orphans = f.remove_replica("d")
    assert [x.request_id for x in orphans] == ["r3", "r4", "r0", "r1", "r2"]
    assert f.remove_replica("d") == [] and f.cancel("r0") == ("", None, False)


def test_expiry_drops_queued_requests_only_and_slots_can_change():
    f: FcfsQueues[str] = FcfsQueues()
    f.add_replica("d", "m", slots=2)
    f.enqueue(q("run", deadline=1.0))
    f.enqueue(q("run2", deadline=1.0))
    f.enqueue(q("wait", deadline=1.0))
    started(f, "d")
    assert [x.request_id for x in f.expire(5.0)] == ["wait"]  # the running ones are the worker's to end
    f.add_replica("d", "m", slots=1)  # fewer slots: the running finish, no new one starts until below
    f.enqueue(q("next"))
    f.finish("d", "run")
    assert started(f, "d") == []
    f.finish("d", "run2")
    assert started(f, "d") == ["next"]
    with pytest.raises(ValueError):
        f.add_replica("e", "m", slots=0)


# --- the deployer's KV pool -------------------------------------------------------------------------


def test_kv_pool_tokens_default_to_max_batch_contexts():
    assert kv_pool_tokens(1, 0, 2048) == 2048  # paper mode: one sequence, what the estimate counts
    assert kv_pool_tokens(8, 0, 2048) == 8 * 2048
    assert kv_pool_tokens(8, 5000, 2048) == 5000


def per_token(nbytes: int):
    return lambda config, tokens: nbytes * tokens // config.tp


def test_a_pool_no_larger_than_what_the_estimate_counts_changes_nothing():
    e = est(layers=32)
    assert with_kv_pool(e, 2048, 2048, per_token(4096)) is e
    assert with_kv_pool(e, 512, 2048, per_token(4096)) is e  # a shorter context keeps today's reservation


def test_the_pool_grows_every_layer_on_every_rank_and_the_total():
    e = est(tp=2, pp=2, layers=32, layer_bytes=GIB, first=3 * 2**20, last=5 * 2**20, overhead=2**20)
    p = with_kv_pool(e, 8 * 2048, 2048, per_token(4096))
    extra = 7 * 2048 * 4096 // 2  # the tokens beyond the counted context, this rank's half
    assert p.layer_bytes == e.layer_bytes + extra
    assert p.total_bytes == e.total_bytes + 2 * 32 * extra  # tp ranks x layers
    assert p.total_bytes == 2 * (
        2 * e.gpu_overhead_bytes + 32 * p.layer_bytes + e.first_stage_bytes + e.last_stage_bytes
    )
    # a stage pays the pool's share of the layers it holds
    assert p.stage_bytes(16, first=True, last=False) == e.stage_bytes(16, first=True, last=False) + 16 * extra
    assert (p.config, p.tpot_ms, p.first_stage_bytes, p.gpu_overhead_bytes) == (
        e.config,
        e.tpot_ms,
        e.first_stage_bytes,
        e.gpu_overhead_bytes,
    )


def test_the_pool_is_priced_by_the_estimators_kv_formula():
    arch = ArchSpec(
        family="llama",
        model_type="llama",
        num_layers=32,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_kv_heads=32,
        head_dim=128,
        vocab_size=32000,
        max_position=4096,
    )
    fp16, int8 = Configuration(tp=1), Configuration(tp=2, kv_quant="int8")
    assert kv_cache_bytes_per_layer(arch, fp16, 1000) == 2 * 32 * 128 * 2 * 1000  # K and V, heads, fp16
    assert kv_cache_bytes_per_layer(arch, int8, 1000) == 2 * 32 * (128 + 2) * 1000 // 2  # int8 + scales, half


def test_paper_mode_plans_exactly_as_before():
    profiles = {"H100": cmap("H100", est(ttft=20, tpot=5), est(2, 1, ttft=15, tpot=4))}
    before = choose(profiles)
    after = choose(profiles, max_batch=1, kv_tokens=0, kv_bytes=per_token(4096))
    assert after.decision.estimate is before.decision.estimate
    assert after.decision.assignments == before.decision.assignments and after.decision.why == before.decision.why


def test_a_pool_is_reserved_in_the_decision_and_the_placement():
    e = est(layers=32, layer_bytes=GIB)
    got = choose({"H100": cmap("H100", e, context=2048)}, max_batch=8, kv_bytes=per_token(4096))
    extra = 7 * 2048 * 4096
    assert got.decision.estimate.layer_bytes == GIB + extra
    assert got.decision.assignments[0].memory_bytes == 32 * (GIB + extra)


def test_a_pool_that_does_not_fit_is_rejected_with_the_reason():
    e = est(layers=32, layer_bytes=GIB)  # 32 GiB; 33 GiB free; the pool adds 32 x 56 MiB = 1.75 GiB
    gpus = gpus_of("H100", "h", [33])
    with pytest.raises(Infeasible) as err:
        choose({"H100": cmap("H100", e)}, gpus=gpus, max_batch=8, kv_bytes=per_token(4096))
    msg = err.value.message
    assert "KV pool of 16384 tokens (max_batch 8 x 2048 tokens of context)" in msg and "smaller max_batch" in msg
    with pytest.raises(Infeasible, match=r"KV pool of 40000 tokens \(kv_tokens 40000\)"):
        choose({"H100": cmap("H100", e)}, gpus=gpus, kv_tokens=40_000, kv_bytes=per_token(4096))
    # nothing fits even without the pool: the usual reason, no word of the pool
    with pytest.raises(Infeasible) as err:
        choose({"H100": cmap("H100", e)}, gpus=gpus_of("H100", "h", [20]), max_batch=8, kv_bytes=per_token(4096))
    assert "KV pool" not in err.value.message


def test_a_pool_shorter_than_one_context_is_a_bad_request():
    with pytest.raises(BadRequest, match="cannot hold one request"):
        choose({"H100": cmap("H100", est())}, kv_tokens=1000)


def test_the_deployers_default_batch_is_a_flag_with_an_environment_twin(monkeypatch):
    assert parse_deployer([]).default_max_batch == 8
    assert parse_deployer(["--default-max-batch", "1"]).default_max_batch == 1
    monkeypatch.setenv("ISERVE_DEFAULT_MAX_BATCH", "4")
    assert parse_deployer([]).default_max_batch == 4
    with pytest.raises(SystemExit):
        parse_deployer(["--default-max-batch", "0"])


# --- the wire ---------------------------------------------------------------------------------------


def record(**kw) -> DeploymentRecord:
    e = est(layers=4, layer_bytes=2**20)
    fields = dict(
        deployment_id="d1",
        model="m",
        model_path="/m",
        gpu_type="H100",
        config=e.config,
        estimate=e,
        intent=Intent(),
        placement_policy="hybrid",
        gpus=[GpuAssignment(agent_id="a", gpu_index=0, first_layer=0, num_layers=4, memory_bytes=4 * 2**20)],
        agent_id="a",
        worker_id="w1",
        context_tokens=256,
        status="ready",
    )
    return DeploymentRecord(**{**fields, **kw})


def without(msg: msgspec.Struct, *names: str) -> bytes:
    """``msg`` encoded as a sender that predates ``names`` would send it."""
    d = msgspec.json.decode(encode(msg))
    for n in names:
        d.pop(n)
    return msgspec.json.encode(d)


def test_new_fields_round_trip_and_old_payloads_decode_to_the_defaults():
    req = DeployRequest(model="m", max_batch=4, kv_tokens=9000)
    assert decode(encode(req), DeployRequest) == req
    assert decode(without(req, "max_batch", "kv_tokens"), DeployRequest) == DeployRequest(model="m")
    rec = record(max_batch=4, kv_tokens=1024)
    assert decode(encode(rec), DeploymentRecord) == rec
    old = decode(without(rec, "max_batch", "kv_tokens"), DeploymentRecord)
    assert (old.max_batch, old.kv_tokens) == (1, 0)
    launch = LaunchWorker(
        worker_id="w",
        deployment_id="d",
        model="m",
        model_path="/m",
        config=Configuration(),
        stages=[StageSpec(gpu_index=0, first_layer=0, num_layers=4)],
        max_batch=8,
        kv_tokens=2048,
    )
    assert decode(encode(launch), LaunchWorker) == launch
    old_launch = decode(without(launch, "max_batch", "kv_tokens"), LaunchWorker)
    assert (old_launch.max_batch, old_launch.kv_tokens) == (1, 0)
    hb = WorkerHeartbeat(
        worker_id="w", deployment_id="d", state="busy", busy_seconds=1.0, running=3, waiting=2, kv_blocks_used=10,
        kv_blocks_total=64,
    )  # fmt: skip
    assert decode(encode(hb), WorkerHeartbeat) == hb
    old_hb = decode(without(hb, "running", "waiting", "kv_blocks_used", "kv_blocks_total"), WorkerHeartbeat)
    assert (old_hb.running, old_hb.waiting, old_hb.kv_blocks_used, old_hb.kv_blocks_total) == (0, 0, 0, 0)
    qs = QueueStats(deployment_id="d", model="m", worker_id="w", queue_depth=1, in_flight=3, completed=0, failed=0)
    old_qs = msgspec.json.decode(without(qs, "max_batch", "kv_blocks_used", "kv_blocks_total"), type=QueueStats)
    assert (old_qs.max_batch, old_qs.kv_blocks_used, old_qs.kv_blocks_total) == (1, 0, 0)


def test_bad_batch_values_are_refused_on_decode():
    with pytest.raises(msgspec.ValidationError, match="max_batch"):
        decode(
            msgspec.json.encode({**msgspec.json.decode(encode(DeployRequest(model="m"))), "max_batch": -1}),
            DeployRequest,
        )
    with pytest.raises(msgspec.ValidationError, match="max_batch"):
        decode(msgspec.json.encode({**msgspec.json.decode(encode(record())), "max_batch": 0}), DeploymentRecord)


# --- the command line -------------------------------------------------------------------------------


def rendered(table) -> str:
    c = Console(record=True, width=300)
    c.print(table)
    return c.export_text()


def test_status_shows_running_queued_batch_and_kv_blocks():
    d1, d2 = record(max_batch=4), record(deployment_id="d2", worker_id="w2", max_batch=2)
    stats = QueueStats(
        deployment_id="d1", model="m", worker_id="w1", queue_depth=2, in_flight=3, completed=7, failed=0,
        max_batch=4, kv_blocks_used=10, kv_blocks_total=64,
    )  # fmt: skip
    assert queue_row(d1, stats)[:5] == ["d1", "3/4", "2", "10/64", "7"]
    # no scheduler report: the record's batch size, dashes for the rest
    assert queue_row(d2, None)[1:5] == ["-/2", "-", "-", "-"]
    # a worker that does not report its pool
    assert queue_row(d1, msgspec.structs.replace(stats, kv_blocks_used=0, kv_blocks_total=0))[3] == "-"
    text = rendered(queues_table([d1, d2], {"d1": stats}))
    for word in ("running", "queued", "KV blocks", "3/4", "10/64", "d2"):
        assert word in text
    # at a terminal's 80 columns the deployment's status stays readable
    c = Console(record=True, width=80)
    c.print(deployments_table([d1]))
    assert "ready" in c.export_text()


def test_deploy_takes_a_batch_size_and_a_kv_pool(monkeypatch):
    a = cli.build_parser().parse_args(["deploy", "m", "--max-batch", "4", "--kv-tokens", "9000"])
    assert (a.max_batch, a.kv_tokens) == (4, 9000)
    assert (lambda a: (a.max_batch, a.kv_tokens))(cli.build_parser().parse_args(["deploy", "m"])) == (0, 0)
    monkeypatch.setenv("ISERVE_MAX_BATCH", "2")
    assert cli.build_parser().parse_args(["deploy", "m"]).max_batch == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["deploy", "m", "--max-batch", "-1"])


def test_stage_capacity_counts_the_pool():
    e = est(layers=32, layer_bytes=GIB)
    p = with_kv_pool(e, 4096, 2048, lambda c, n: GIB * n // 2048)  # one more GiB per layer
    assert stage_capacity(e, 32 * GIB, first=True, last=True) == 32
    assert stage_capacity(p, 32 * GIB, first=True, last=True) == 16


def test_the_default_batch_halves_until_its_pool_fits_and_an_asked_for_one_does_not():
    tried: list[int] = []

    def plan_with(b: int) -> str:
        tried.append(b)
        if b > 2:
            raise Infeasible(f"batch {b} does not fit")
        return f"plan {b}"

    assert largest_batch(plan_with, 8, fixed=False) == ("plan 2", 2) and tried == [8, 4, 2]
    with pytest.raises(Infeasible, match="batch 8"):
        largest_batch(plan_with, 8, fixed=True)
    with pytest.raises(Infeasible, match="batch 1"):
        largest_batch(lambda b: (_ for _ in ()).throw(Infeasible(f"batch {b}")), 8, fixed=False)


def test_every_command_spells_its_timeout_flag_timeout_s():
    p = cli.build_parser()
    for argv in (["deploy", "m"], ["register", "path"], ["demo"], ["generate", "m", "hi"]):
        assert p.parse_args([*argv, "--timeout-s", "7"]).timeout == 7.0, argv
    assert p.parse_args(["deploy", "m", "--timeout", "6"]).timeout == 6.0  # the old spelling still works
