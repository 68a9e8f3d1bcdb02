"""Tests of the whole deployment decision (paper section 6): the first feasible configuration in
rank order, the reasons for what missed, and its decision time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from planner_factories import ALL, PROPS, brute_fits, check_assignments, clusters, est, estimate_sets, host, intents

from iserve.deployer.feasibility import ClusterView
from iserve.deployer.planner import Decision, plan, score
from iserve.deployer.ranking import rank
from iserve.deployer.units import GIB
from iserve.errors import Infeasible
from iserve.messages import Intent

# ---------------------------------------------------------------------------------------------------
# the whole plan


def test_plan_takes_best_ranked_that_fits_and_reports_better_ones():
    big = est(1, 1, ttft=10, tpot=5, layers=32)  # needs 32 GiB on one GPU
    tp2 = est(2, 1, ttft=20, tpot=6, layers=32, layer_bytes=GIB // 2)  # 16 GiB on each of 2 GPUs
    pp2 = est(1, 2, ttft=30, tpot=7, layers=32)  # 32 GiB over 2 GPUs, uneven allowed
    slow = est(1, 1, "int4", ttft=40, tpot=20, layers=32, layer_bytes=GIB // 4)
    gpus = host("a", [20, 14]) + host("b", [12, 12])
    d = plan([slow, pp2, big, tp2], Intent(kind="min-latency"), gpus)
    assert isinstance(d, Decision)
    assert d.estimate is pp2
    assert [r.config for r in d.rejected] == [big.config.key(), tp2.config.key()]
    assert "needs 1 GPU with 32.0 GiB free" in d.rejected[0].reason
    # hybrid packs: all GPUs idle, so the fuller GPU of host a comes first in the pipeline
    assert [(a.agent_id, a.gpu_index, a.num_layers) for a in d.assignments] == [("a", 1, 14), ("a", 0, 18)]
    assert d.fitting == 2 and d.latency_ms == pytest.approx(30 + 127 * 7)
    assert d.why.startswith(
        "min-latency: tp1-pp2-wfp16-kvfp16-pnone has the lowest estimated latency (919 ms for "
        "512+128 tokens) among the 2 configurations that fit the free GPUs; "
        "2 faster ones did not fit"
    )
    assert "layers 14/18" in d.why


def test_plan_slo_reports_filtered_and_cost():
    fast = est(1, 1, ttft=10, tpot=5, layers=16)  # 645 ms, 16 GiB
    cheap = est(1, 1, "int8", ttft=10, tpot=9, layers=16, layer_bytes=GIB // 2)  # 1153 ms, 8 GiB
    slow = est(1, 1, "int4", ttft=10, tpot=30, layers=16, layer_bytes=GIB // 4)
    intent = Intent(kind="latency-slo", cost_model="memory", slo_ms=1500)
    d = plan([fast, cheap, slow], intent, host("a", [80]), policy="packing")
    assert d.estimate is cheap and d.cost == pytest.approx(8.0)
    assert [r.config for r in d.filtered] == [slow.config.key()]
    assert "1 exceeds the SLO" in d.why


def test_score_orders_decisions_like_rank():
    gpus = host("a", [80, 80, 80, 80])
    for kind in ("min-latency", "min-cost", "min-memory", "min-gpu-hours"):
        intent = Intent(kind=kind, prompt_tokens=100, output_tokens=128)
        ranked, _ = rank(ALL, intent)
        scores = [score(plan([e], intent, gpus), intent) for e in ranked]
        assert scores == sorted(scores)


def test_plan_infeasible_names_the_closest_miss():
    big = est(1, 1, layers=32)
    pp2 = est(1, 2, layers=32)
    with pytest.raises(Infeasible) as info:
        plan([big, pp2], Intent(kind="min-latency"), host("a", [15, 15.5]) + host("b", [30]))
    msg = info.value.message
    assert "none of the 2 configurations" in msg and "the nearest to fitting, tp1-pp2-wfp16-kvfp16-pnone" in msg
    assert "15.5 and 15.0 GiB free (1.5 GiB short); free that memory on a" in msg


def test_plan_infeasible_suggests_relaxing_the_slo():
    fast = est(1, 1, ttft=10, tpot=5, layers=64)  # does not fit
    slow = est(1, 1, "int4", ttft=10, tpot=20, layers=64, layer_bytes=GIB // 4)  # fits, 2550 ms
    intent = Intent(kind="latency-slo", slo_ms=1000)
    with pytest.raises(Infeasible) as info:
        plan([fast, slow], intent, host("a", [40]))
    assert "raising slo_ms to 2550 ms would admit tp1-pp1-wint4-kvfp16-pnone" in info.value.message


def test_plan_without_estimates_or_gpus():
    with pytest.raises(Infeasible, match="profile the model"):
        plan([], Intent(), host("a", [80]))
    with pytest.raises(Infeasible, match="no GPUs"):
        plan([est()], Intent(), [])


@PROPS
@given(estimate_sets(), clusters(), intents(), st.sampled_from(["least-loaded", "packing", "hybrid"]))
def test_plan_chooses_the_best_ranked_feasible_configuration(estimates, gpus, intent, policy):
    ranked, filtered = rank(estimates, intent)
    feasible = [brute_fits(e, gpus) for e in ranked]
    if not any(feasible):
        with pytest.raises(Infeasible):
            plan(estimates, intent, gpus, policy=policy)
        return
    d = plan(estimates, intent, gpus, policy=policy)
    best = feasible.index(True)
    assert d.estimate is ranked[best]
    assert [r.config for r in d.rejected] == [e.config.key() for e in ranked[:best]]
    assert [r.config for r in d.filtered] == [r.config for r in filtered]
    assert d.fitting == sum(feasible)
    check_assignments(d.estimate, gpus, d.assignments)
    assert d.why.startswith(f"{intent.kind}: {d.estimate.config.key()}")


# ---------------------------------------------------------------------------------------------------
# decision time (the benchmark is bench/bench_decision.py; docs/deployment.md quotes its table)


def _bench_decision():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_decision.py"
    spec = importlib.util.spec_from_file_location("bench_decision", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decision_time_for_1000_configurations_on_64_gpus_stays_in_milliseconds():
    """A guard against complexity regressions, not the benchmark: the benchmark's worst case (every
    configuration but the last few misses, each explained) must stay far below a second. The target,
    < 20 ms, is measured by the benchmark; here the bound is 5x that so a loaded CI machine passes."""
    import random
    import time

    import msgspec

    bench = _bench_decision()
    gpus = bench.make_cluster("worst-case", random.Random(7))
    view = ClusterView(gpus)
    estimates = [
        msgspec.structs.replace(e, tpot_ms=e.tpot_ms * 20) if view.fits(e) else e for e in bench.make_estimates(1000)
    ]
    assert len(estimates) == 1000 and len(gpus) == 64
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        d = plan(estimates, Intent(kind="min-latency"), gpus)
        best = min(best, (time.perf_counter() - t0) * 1000.0)
    assert len(d.rejected) > 900 and d.fitting >= 1
    check_assignments(d.estimate, gpus, d.assignments)
    assert best < 100.0, f"plan() took {best:.1f} ms at best for 1,000 configurations on 64 GPUs"


@pytest.mark.parametrize("scenario", ["empty", "fragmented", "worst-case"])
def test_decision_time_at_a_load_stays_in_milliseconds(scenario):
    """The same guard with an expected load: every configuration that fits may be sized and its
    replicas placed (the benchmark's target, < 20 ms, is measured there)."""
    import random
    import time

    bench = _bench_decision()
    gpus = bench.make_cluster(scenario, random.Random(7))
    estimates = bench.make_estimates(1000)
    for kind in ("min-cost", "min-latency", "latency-slo"):
        intent = Intent(kind=kind, slo_ms=3000.0, rate=20.0)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            d = plan(estimates, intent, gpus, load=bench.load_spec(estimates, intent))
            best = min(best, (time.perf_counter() - t0) * 1000.0)
        assert d.replicas and d.replica_why
        for r in d.replicas:
            check_assignments(d.estimate, gpus, r)
        assert best < 100.0, f"plan() at a load took {best:.1f} ms at best ({scenario}, {kind})"
