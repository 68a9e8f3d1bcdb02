"""Tests of step I of the deployment decision: the metrics of one request and the ranking by intent."""

from __future__ import annotations

import itertools

import pytest
from planner_factories import ALL, FAST_BIG, MID_4GPU, SLOW_SMALL, est, host

from iserve.deployer.planner import plan
from iserve.deployer.ranking import cost, latency_ms, rank
from iserve.deployer.units import GIB
from iserve.errors import BadRequest
from iserve.messages import DeployRequest, Intent, decode

# ---------------------------------------------------------------------------------------------------
# metrics


def test_latency_and_cost_formulas():
    e = est(tp=2, pp=2, ttft=200.0, per_tok=0.5, tpot=20.0, total=40 * GIB)
    intent = Intent(prompt_tokens=100, output_tokens=11)
    # TTFT 200 + 0.5 * 100 = 250 ms, plus 10 further decode steps of 20 ms
    assert latency_ms(e, intent) == pytest.approx(450.0)
    assert cost(e, Intent(cost_model="mem-x-latency", prompt_tokens=100, output_tokens=11)) == pytest.approx(40 * 0.45)
    assert cost(e, Intent(cost_model="memory", prompt_tokens=100, output_tokens=11)) == pytest.approx(40.0)
    assert cost(e, Intent(cost_model="gpu-hours", prompt_tokens=100, output_tokens=11)) == pytest.approx(
        4 * 0.45 / 3600
    )


# ---------------------------------------------------------------------------------------------------
# step I: ranking


def keys(estimates):
    return [e.config.key() for e in estimates]


@pytest.mark.parametrize(
    "kind, cost_model, expected",
    [
        ("min-latency", "mem-x-latency", [MID_4GPU, FAST_BIG, SLOW_SMALL]),
        # GiB x s: 60 x 0.685 = 41.1, 15 x 1.574 = 23.6, 40 x 0.548 = 21.9
        ("min-cost", "mem-x-latency", [MID_4GPU, SLOW_SMALL, FAST_BIG]),
        ("min-cost", "memory", [SLOW_SMALL, MID_4GPU, FAST_BIG]),
        # GPU-hours: 1 x 0.685, 1 x 1.574, 4 x 0.548
        ("min-cost", "gpu-hours", [FAST_BIG, SLOW_SMALL, MID_4GPU]),
        ("min-memory", "mem-x-latency", [SLOW_SMALL, MID_4GPU, FAST_BIG]),
        ("min-gpu-hours", "memory", [FAST_BIG, SLOW_SMALL, MID_4GPU]),
    ],
)
def test_rank_orders_by_intent(kind, cost_model, expected):
    ranked, rejected = rank(ALL, Intent(kind=kind, cost_model=cost_model, prompt_tokens=100, output_tokens=128))
    assert keys(ranked) == keys(expected)
    assert rejected == []


def test_rank_latency_slo_keeps_those_within_and_orders_cheapest_first():
    intent = Intent(kind="latency-slo", cost_model="memory", slo_ms=700, prompt_tokens=100, output_tokens=128)
    ranked, rejected = rank(ALL, intent)
    assert keys(ranked) == keys([MID_4GPU, FAST_BIG])  # 40 GiB before 60 GiB
    assert [r.config for r in rejected] == [SLOW_SMALL.config.key()]
    assert "1574 ms" in rejected[0].reason and "SLO of 700 ms" in rejected[0].reason


def test_rank_cost_budget_keeps_those_within_and_orders_fastest_first():
    intent = Intent(kind="cost-budget", cost_model="memory", budget=45.0, prompt_tokens=100, output_tokens=128)
    ranked, rejected = rank(ALL, intent)
    assert keys(ranked) == keys([MID_4GPU, SLOW_SMALL])
    assert [r.config for r in rejected] == [FAST_BIG.config.key()]
    assert "budget of 45 GiB" in rejected[0].reason


def test_rank_ties_break_on_configuration_key():
    a = est(1, 2, "int8")
    b = est(1, 2, "fp16")
    c = est(2, 1, "fp16")
    for order in itertools.permutations([a, b, c]):
        ranked, _ = rank(list(order), Intent(kind="min-latency"))
        assert keys(ranked) == sorted(keys([a, b, c]))


def test_intent_defaults_to_min_cost_for_a_documented_request_size():
    # a deploy.request that names only the model: minimise cost (GiB x s) for 512 tokens in, 128 out
    req = decode(b'{"type":"deploy_request","model":"m"}', DeployRequest)
    assert req.intent == Intent(kind="min-cost", cost_model="mem-x-latency", prompt_tokens=512, output_tokens=128)
    assert req.placement == "" and req.context_tokens == 0 and req.gpu_type == ""
    ranked, _ = rank(ALL, req.intent)
    costs = [cost(e, req.intent) for e in ranked]
    assert costs == sorted(costs)
    assert plan(ALL, req.intent, host("a", [80] * 4)).estimate is ranked[0]


def test_the_request_size_decides_the_configuration():
    # quick prefill, slow decode vs slow prefill, quick decode: the expected lengths pick the winner
    prefill_fast = est(1, 1, "int8", ttft=10, per_tok=0.1, tpot=20)
    decode_fast = est(2, 1, ttft=10, per_tok=2.0, tpot=5)
    short = Intent(kind="min-latency", prompt_tokens=1000, output_tokens=2)  # 130 vs 2015 ms
    long = Intent(kind="min-latency", prompt_tokens=10, output_tokens=500)  # 9991 vs 2525 ms
    gpus = host("a", [80, 80])
    assert plan([prefill_fast, decode_fast], short, gpus).estimate is prefill_fast
    d = plan([prefill_fast, decode_fast], long, gpus)
    assert d.estimate is decode_fast and d.latency_ms == pytest.approx(10 + 2.0 * 10 + 499 * 5)
    assert "10+500 tokens" in d.why


@pytest.mark.parametrize(
    "intent, words",
    [
        (Intent(kind="latency-slo"), "slo_ms"),
        (Intent(kind="latency-slo", slo_ms=-5), "slo_ms"),
        (Intent(kind="latency-slo", slo_ms=float("nan")), "slo_ms"),
        (Intent(kind="cost-budget"), "budget"),
        (Intent(kind="cost-budget", budget=0.0, cost_model="gpu-hours"), "GPU-h"),
        (Intent(prompt_tokens=0), "prompt_tokens"),
        (Intent(output_tokens=-1), "output_tokens"),
        (Intent(kind="max-joy"), "intent kind"),
        (Intent(cost_model="dollars"), "cost_model"),
    ],
)
def test_rank_rejects_unusable_intents(intent, words):
    with pytest.raises(BadRequest) as info:
        rank(ALL, intent)
    assert words in info.value.message
