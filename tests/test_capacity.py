"""The capacity model of a batched replica (iserve.deployer.capacity), the replica count each intent
needs at a load (iserve.deployer.replicas), the decision at a load (planner.plan with a LoadSpec) and
the wire fields that carry a load."""

from __future__ import annotations

import math
import random
import statistics

import msgspec
import pytest
from planner_factories import check_assignments, est, host

from iserve.deployer.capacity import Load, Replica, batch_limit, output_quantile
from iserve.deployer.loadplan import LoadSpec
from iserve.deployer.memory import kv_pool_tokens
from iserve.deployer.planner import plan
from iserve.deployer.ranking import validate_intent
from iserve.deployer.replicas import LATENCY_SLACK, UTILIZATION_CAP, replicas_needed
from iserve.deployer.units import GIB
from iserve.errors import BadRequest
from iserve.fingerprint.estimator.batching import StepModel, step_model
from iserve.loadgen.replica import serve_alone
from iserve.loadgen.synthetic import synthetic_map
from iserve.messages import DeploymentRecord, DeployReply, DeployRequest, Intent, decode, encode
from iserve.stats import percentile

# ---------------------------------------------------------------------------------------------------
# the capacity model


def _replica(batch: int = 8, p: int = 512, o: int = 128) -> Replica:
    return Replica(StepModel(est(ttft=100.0, per_tok=0.2, tpot=10.0), kv_share=1e-4), batch, p, o)


def test_one_at_a_time_is_the_textbook_queue():
    """Batch 1: M/M/1 for exponential lengths (cv2 1), Pollaczek-Khinchine's M/D/1 for fixed ones."""
    rep = _replica(batch=1)
    t = rep.solo_ms
    assert rep.throughput == pytest.approx(1000.0 / t)
    for rho in (0.1, 0.5, 0.9):
        rate = rho * rep.throughput
        assert rep.at(rate, 1.0).mean_ms == pytest.approx(t / (1 - rho))
        assert rep.at(rate, 0.0).mean_ms == pytest.approx(t + rho * t / (2 * (1 - rho)))
        assert rep.at(rate, 1.0).wait == pytest.approx(rho)


def test_the_curve_starts_at_the_solo_latency_and_rises_to_the_throughput():
    rep = _replica()
    idle = rep.at(0.0, 0.0)
    assert idle.mean_ms == pytest.approx(rep.solo_ms) and idle.p_ms == pytest.approx(rep.solo_ms)
    rates = [u * rep.throughput for u in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99)]
    means = [rep.at(r, 1.0).mean_ms for r in rates]
    p95s = [rep.at(r, 1.0).p_ms for r in rates]
    assert means == sorted(means) and p95s == sorted(p95s)
    assert all(p >= m * 0.99 for p, m in zip(p95s, means))
    # a batch completes more than one request at a time, but each runs slower than alone
    assert rep.throughput > 1000.0 / rep.solo_ms
    assert math.isinf(rep.at(rep.throughput, 1.0).mean_ms)


def test_longer_tails_and_smaller_pools():
    assert output_quantile(100, 0.0, 95) == 100
    assert output_quantile(100, 1.0, 95) == pytest.approx(100 * math.log(20), rel=0.02)  # exponential
    assert batch_limit(8, 0, 512, 128) == 8
    assert batch_limit(8, 4 * 640, 512, 128) == 4  # the pool holds 4 worst cases
    assert batch_limit(8, 100, 512, 128) == 1


def _poisson(rate: float, p: int, o: int, n: int, seed: int) -> list[tuple[float, int, int]]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, p, o))
    return out


TOLERANCE = 0.08  # bench/bench_capacity.py: fixed lengths stay within 6.2% up to 80% utilization


@pytest.mark.parametrize("utilization", [0.5, 0.8])
def test_the_model_follows_the_simulated_replica(utilization):
    """The analytic curve against the simulator's batched replica on a fixed synthetic load (Poisson
    arrivals, 512 + 128 tokens, batch 8, synthetic H100 Llama-2-7B): mean and p95 within TOLERANCE."""
    cmap = synthetic_map("llama-2-7b", gpu_type="H100", context_tokens=2048)
    e = next(x for x in cmap.estimates if x.config.key() == "tp1-pp1-wfp16-kvfp16-pnone")
    sm = step_model(cmap.estimates, e, cmap.context_tokens)
    pool = kv_pool_tokens(8, 0, cmap.context_tokens)
    rep = Replica(sm, batch_limit(8, pool, 512, 128), 512, 128)
    rate = utilization * rep.throughput
    lat = serve_alone(sm, _poisson(rate, 512, 128, 3000, seed=1), max_batch=8, kv_tokens=pool)[300:]
    model = rep.at(rate, 0.0, 95.0)
    assert model.mean_ms == pytest.approx(statistics.fmean(lat), rel=TOLERANCE)
    assert model.p_ms == pytest.approx(percentile(lat, 95), rel=TOLERANCE)


# ---------------------------------------------------------------------------------------------------
# replica counts


def test_cost_intents_take_the_fewest_replicas_that_hold_the_load():
    rep = _replica()
    for kind in ("min-cost", "min-memory", "min-gpu-hours", "cost-budget"):
        assert replicas_needed(rep, Load(0.0, 512, 128), kind).replicas == 1
        load = Load(3.3 * rep.throughput, 512, 128)
        c = replicas_needed(rep, load, kind)
        assert c.met and c.replicas == math.ceil(3.3 / UTILIZATION_CAP)
        assert c.point.utilization <= UTILIZATION_CAP
        assert load.rate / (c.replicas - 1) > UTILIZATION_CAP * rep.throughput


def test_min_latency_adds_replicas_until_the_mean_is_near_the_unloaded_one():
    rep = _replica()
    load = Load(2.0 * rep.throughput, 512, 128)
    c = replicas_needed(rep, load, "min-latency")
    target = LATENCY_SLACK * rep.solo_ms
    assert c.met and c.point.mean_ms <= target
    assert rep.at(load.rate / (c.replicas - 1), load.cv2).mean_ms > target
    assert c.replicas > replicas_needed(rep, load, "min-cost").replicas


def test_latency_slo_takes_the_fewest_replicas_that_meet_the_slo_at_the_percentile():
    rep = _replica()
    load = Load(2.0 * rep.throughput, 512, 128, cv2=0.0)
    slo = 1.6 * rep.solo_ms
    c95 = replicas_needed(rep, load, "latency-slo", slo_ms=slo, percentile=95)
    assert c95.met and c95.point.p_ms <= slo
    assert rep.at(load.rate / (c95.replicas - 1), 0.0, 95).p_ms > slo
    c99 = replicas_needed(rep, load, "latency-slo", slo_ms=slo, percentile=99)
    assert c99.replicas >= c95.replicas
    # an SLO below the unloaded latency cannot be met by any count
    never = replicas_needed(rep, load, "latency-slo", slo_ms=0.5 * rep.solo_ms, max_replicas=16)
    assert not never.met and never.replicas == 16


# ---------------------------------------------------------------------------------------------------
# the decision at a load


def _spec(estimates, rate: float, intent: Intent, batch: int = 8) -> LoadSpec:
    steps = {e.config: StepModel(e, 1e-4) for e in estimates}
    load = Load(rate, intent.prompt_tokens, intent.output_tokens, intent.output_cv2)
    return LoadSpec(load, steps.__getitem__, batch, 0, intent.slo_percentile)


@pytest.mark.parametrize(
    "intent",
    [
        Intent(kind="min-cost"),
        Intent(kind="min-latency"),
        Intent(kind="min-memory"),
        Intent(kind="min-gpu-hours"),
        Intent(kind="latency-slo", slo_ms=3000.0),
        Intent(kind="cost-budget", budget=1e6),
    ],
    ids=lambda i: i.kind,
)
def test_a_load_gives_every_intent_replicas_placed_within_the_free_memory(intent):
    estimates = [est(1, 1, ttft=100, tpot=10, layers=8, total=8 * GIB), est(1, 1, "int8", ttft=100, tpot=12, layers=8)]
    gpus = host("a", [40] * 4) + host("b", [40] * 4)
    alone = plan(estimates, intent, gpus)
    assert alone.replicas == [] and alone.replica_why == ""
    rep = Replica(StepModel(estimates[0], 1e-4), 8, intent.prompt_tokens, intent.output_tokens)
    d = plan(estimates, intent, gpus, load=_spec(estimates, 3 * rep.throughput, intent))
    assert len(d.replicas) > 1 and d.replicas[0] == d.assignments
    assert f"{len(d.replicas)} replicas" in d.replica_why and d.replica_why in d.why
    used: dict[tuple[str, int], int] = {}
    for a in (a for r in d.replicas for a in r):
        used[(a.agent_id, a.gpu_index)] = used.get((a.agent_id, a.gpu_index), 0) + a.memory_bytes
    free = {(g.agent_id, g.gpu_index): g.free_bytes for g in gpus}
    assert all(b <= free[k] for k, b in used.items()), "replicas overcommit a GPU"
    for r in d.replicas:
        check_assignments(d.estimate, gpus, r)
    assert d.point is not None and d.point.utilization <= UTILIZATION_CAP


def test_a_load_that_needs_more_replicas_than_fit_takes_those_that_fit_and_says_so():
    estimates = [est(1, 1, ttft=100, tpot=10, layers=8)]  # 8 GiB a replica
    gpus = host("a", [20, 9])  # room for 3
    intent = Intent(kind="min-cost")
    rep = Replica(StepModel(estimates[0], 1e-4), 8, 512, 128)
    d = plan(estimates, intent, gpus, load=_spec(estimates, 10 * rep.throughput, intent))
    assert len(d.replicas) == 3 and "3 is the most the free GPUs could hold" in d.replica_why
    assert "grows without bound" in d.replica_why


# ---------------------------------------------------------------------------------------------------
# the wire


def test_the_load_fields_round_trip_and_old_messages_still_decode():
    intent = Intent(kind="latency-slo", slo_ms=900.0, rate=12.5, slo_percentile=99.0, output_cv2=0.25)
    req = DeployRequest(model="m", intent=intent)
    assert decode(encode(req), DeployRequest) == req
    old = decode(b'{"type":"deploy_request","model":"m","intent":{"kind":"min-cost"}}', DeployRequest)
    assert (old.intent.rate, old.intent.slo_percentile, old.intent.output_cv2) == (0.0, 95.0, 1.0)
    e = est()
    record = DeploymentRecord(
        deployment_id="m-1", model="m", model_path="/m", gpu_type="H100", config=e.config, estimate=e,
        intent=intent, placement_policy="hybrid", gpus=[], agent_id="a", worker_id="w", context_tokens=512,
    )  # fmt: skip
    reply = DeployReply(deployment=record, why="w", replicas=2, replicas_why="2 replicas: ...", others=[record])
    assert decode(encode(reply), DeployReply) == reply
    older = msgspec.json.decode(encode(reply))
    for k in ("replicas", "replicas_why", "others"):
        del older[k]
    for k in ("rate", "slo_percentile", "output_cv2"):
        del older["deployment"]["intent"][k]
    back = decode(msgspec.json.encode(older), DeployReply)
    assert (back.replicas, back.replicas_why, back.others, back.deployment.intent.rate) == (1, "", [], 0.0)
    for bad in ('{"rate":-1}', '{"slo_percentile":100}', '{"slo_percentile":10}', '{"output_cv2":-0.5}'):
        with pytest.raises(msgspec.ValidationError):
            decode(b'{"type":"deploy_request","model":"m","intent":' + bad.encode() + b"}", DeployRequest)


def test_an_unusable_load_is_refused_with_what_to_fix():
    with pytest.raises(BadRequest, match="requests/s"):
        validate_intent(Intent(rate=float("inf")))
    with pytest.raises(BadRequest, match="95 for p95"):
        validate_intent(Intent(slo_percentile=100.0))


# ---------------------------------------------------------------------------------------------------
# the CLI


def test_deploy_flags_carry_the_load_with_environment_twins(monkeypatch):
    from iserve.cli import build_parser, intent_from_args

    monkeypatch.setenv("ISERVE_SLO_PERCENTILE", "99")
    a = build_parser().parse_args(["deploy", "m", "--intent", "latency-slo", "--slo-ms", "900", "--rate", "7"])
    i = intent_from_args(a)
    assert (i.rate, i.slo_percentile, i.output_cv2, i.prompt_tokens) == (7.0, 99.0, 1.0, 512)
    monkeypatch.setenv("ISERVE_RATE", "3.5")
    assert intent_from_args(build_parser().parse_args(["deploy", "m"])).rate == 3.5


def test_a_trace_gives_the_load_its_rate_lengths_and_spread(tmp_path, monkeypatch):
    from iserve.cli import build_parser, intent_from_args
    from iserve.loadgen.traces import TraceRequest, expected_load

    trace = [TraceRequest(arrival_s=t, context_tokens=c, generated_tokens=g, index=k) for k, (t, c, g) in
             enumerate([(0.0, 100, 10), (1.0, 300, 30), (2.0, 5000, 20)])]  # fmt: skip
    load = expected_load(trace, max_context=1024)
    assert load.rate == pytest.approx(1.5) and load.prompt_tokens == round((100 + 300 + 1024) / 3)
    assert load.output_tokens == 20 and load.output_cv2 == pytest.approx(statistics.pvariance([10, 30, 20]) / 400)
    with pytest.raises(ValueError, match="at least 2"):
        expected_load(trace[:1])
    csv = tmp_path / "t.csv"
    csv.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,10\n"
                   "2023-11-16 18:15:48.6805900,300,30\n")  # fmt: skip
    i = intent_from_args(build_parser().parse_args(["deploy", "m", "--trace", str(csv)]))
    assert (i.rate, i.prompt_tokens, i.output_tokens) == (pytest.approx(1.0), 200, 20)
    i = intent_from_args(build_parser().parse_args(["deploy", "m", "--trace", str(csv), "--rate", "9"]))
    assert i.rate == 9.0
    with pytest.raises(SystemExit, match="--trace"):
        intent_from_args(build_parser().parse_args(["deploy", "m", "--trace", str(tmp_path / "missing.csv")]))
