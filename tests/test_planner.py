"""Tests of the deployment controller's pure decisions (paper section 6): ranking by intent, the
uneven layer split, load-aware placement, and the whole plan, with brute-force property checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from iserve.deployer.planner import (
    GIB,
    ClusterView,
    Decision,
    GpuState,
    arrange,
    cost,
    latency_ms,
    place,
    plan,
    rank,
    score,
    split_layers,
    stage_capacity,
)
from iserve.errors import BadRequest, Infeasible
from iserve.messages import ConfigEstimate, Configuration, DeployRequest, GpuAssignment, Intent, decode

# ---------------------------------------------------------------------------------------------------
# factories


def est(tp=1, pp=1, wq="fp16", kv="fp16", pr="none", *, layers=32, layer_bytes=GIB, first=0, last=0,
        overhead=0, ttft=100.0, per_tok=0.0, tpot=10.0, total=None) -> ConfigEstimate:
    """A configuration estimate; ``total_bytes`` defaults to the sum over all ``tp * pp`` GPUs."""
    if total is None:
        total = tp * (pp * overhead + layers * layer_bytes + first + last)
    return ConfigEstimate(
        config=Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pr),
        ttft_base_ms=ttft, ttft_per_token_ms=per_tok, tpot_ms=tpot, layer_bytes=layer_bytes,
        first_stage_bytes=first, last_stage_bytes=last, gpu_overhead_bytes=overhead, total_bytes=total,
        num_layers=layers)


def gpu(agent="a", index=0, free=80 * GIB, load=0.0, total=80 * GIB) -> GpuState:
    return GpuState(agent_id=agent, gpu_index=index, gpu_type="H100", total_bytes=total, free_bytes=free, load=load)


def host(agent, frees_gib, loads=None) -> list[GpuState]:
    loads = loads or [0.0] * len(frees_gib)
    return [gpu(agent, i, int(f * GIB), l) for i, (f, l) in enumerate(zip(frees_gib, loads))]


def used(assignments) -> list[tuple[str, int]]:
    return [(a.agent_id, a.gpu_index) for a in assignments]


# ---------------------------------------------------------------------------------------------------
# metrics


def test_latency_and_cost_formulas():
    e = est(tp=2, pp=2, ttft=200.0, per_tok=0.5, tpot=20.0, total=40 * GIB)
    intent = Intent(prompt_tokens=100, output_tokens=11)
    # TTFT 200 + 0.5 * 100 = 250 ms, plus 10 further decode steps of 20 ms
    assert latency_ms(e, intent) == pytest.approx(450.0)
    assert cost(e, Intent(cost_model="mem-x-latency", prompt_tokens=100, output_tokens=11)) == pytest.approx(40 * 0.45)
    assert cost(e, Intent(cost_model="memory", prompt_tokens=100, output_tokens=11)) == pytest.approx(40.0)
    assert cost(e, Intent(cost_model="gpu-hours", prompt_tokens=100, output_tokens=11)) == pytest.approx(4 * 0.45 / 3600)


def test_stage_capacity_counts_first_and_last_extras():
    e = est(layers=40, layer_bytes=GIB, first=2 * GIB, last=3 * GIB, overhead=GIB)
    assert stage_capacity(e, 20 * GIB, first=False, last=False) == 19
    assert stage_capacity(e, 20 * GIB, first=True, last=False) == 17
    assert stage_capacity(e, 20 * GIB, first=False, last=True) == 16
    assert stage_capacity(e, 20 * GIB, first=True, last=True) == 14
    assert stage_capacity(e, 80 * GIB, first=True, last=True) == 40  # never more than the model's layers
    assert stage_capacity(e, int(1.5 * GIB), first=False, last=False) == 0


# ---------------------------------------------------------------------------------------------------
# step I: ranking


FAST_BIG = est(1, 1, ttft=50, tpot=5, total=60 * GIB)  # 685 ms, 60 GiB, 1 GPU
SLOW_SMALL = est(1, 1, "int4", ttft=50, tpot=12, total=15 * GIB)  # 1574 ms, 15 GiB
MID_4GPU = est(2, 2, "int8", ttft=40, tpot=4, total=40 * GIB)  # 548 ms, 40 GiB, 4 GPUs
ALL = [SLOW_SMALL, FAST_BIG, MID_4GPU]


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


# ---------------------------------------------------------------------------------------------------
# step II: layer split


def test_split_layers_paper_example():
    # 32 layers, PP=4 on fragmented GPUs: the later stage gives up the surplus layer
    assert split_layers(32, [10, 12, 7, 6]) == [10, 9, 7, 6]


@pytest.mark.parametrize(
    "layers, caps, expected",
    [
        (32, [100, 100, 100, 100], [8, 8, 8, 8]),
        (10, [100, 100, 100, 100], [3, 3, 2, 2]),
        (32, [40], [32]),
        (5, [5, 1], [4, 1]),
        (4, [1, 1, 1, 1], [1, 1, 1, 1]),
        (7, [2, 9, 2], [2, 3, 2]),
    ],
)
def test_split_layers_even_as_memory_allows(layers, caps, expected):
    assert split_layers(layers, caps) == expected


@pytest.mark.parametrize(
    "layers, caps",
    [(32, [10, 10, 7, 4]), (3, [5, 5, 5, 5]), (10, [10, 0]), (10, []), (1, [0])],
)
def test_split_layers_infeasible(layers, caps):
    assert split_layers(layers, caps) is None


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 14), st.lists(st.integers(0, 9), min_size=1, max_size=4))
def test_split_layers_matches_brute_force(layers, caps):
    splits = [s for s in itertools.product(*(range(1, c + 1) for c in caps)) if sum(s) == layers]
    got = split_layers(layers, caps)
    if not splits:
        assert got is None
        return
    assert got is not None and sum(got) == layers
    assert all(1 <= b <= c for b, c in zip(got, caps))
    assert max(got) == min(max(s) for s in splits)  # the water-filling level is the least possible
    # among the most even splits, the later stages give up layers first
    level = max(got)
    even = [list(s) for s in splits if max(s) == level and all(b == min(c, level) or b == level - 1
                                                            for b, c in zip(s, caps))]
    assert got == max(even)


# ---------------------------------------------------------------------------------------------------
# step III: placement


def test_fragmented_pipeline_gets_uneven_stages():
    # capacities 10, 12, 7, 6 layers of 1 GiB, in least-loaded order (loads rise with the index)
    gpus = host("a", [10, 12, 7, 6], loads=[0.0, 0.1, 0.2, 0.3])
    got = place(est(1, 4, layers=32), gpus, policy="least-loaded", theta=0.5)
    assert [(a.gpu_index, a.first_layer, a.num_layers) for a in got] == [(0, 0, 10), (1, 10, 9), (2, 19, 7), (3, 26, 6)]
    assert [a.memory_bytes for a in got] == [10 * GIB, 9 * GIB, 7 * GIB, 6 * GIB]


def test_least_loaded_picks_idle_gpus():
    gpus = host("a", [40] * 4, loads=[0.9, 0.0, 0.6, 0.1])
    got = place(est(1, 2, layers=32), gpus, policy="least-loaded", theta=0.5)
    assert used(got) == [("a", 1), ("a", 3)]


def test_least_loaded_skips_gpus_without_memory():
    gpus = host("a", [0.5, 40, 40, 40], loads=[0.0, 0.5, 0.6, 0.9])
    got = place(est(1, 2, layers=32), gpus, policy="least-loaded", theta=0.5)
    assert used(got) == [("a", 1), ("a", 2)]


def test_selection_reaches_least_deep_into_the_policy_order():
    # {0, 3} and {1, 2} both hold 30 layers, {0, 1} and {0, 2} do not: taking the idlest GPU first
    # would drag in the busiest one, so least-loaded takes 1 and 2 (the busiest GPU used is less busy)
    gpus = host("a", [10, 15, 15, 22], loads=[0.0, 0.1, 0.2, 0.3])
    got = place(est(1, 2, layers=30), gpus, policy="least-loaded", theta=0.5)
    assert used(got) == [("a", 1), ("a", 2)]


def test_packing_picks_busy_gpus():
    gpus = host("a", [40] * 4, loads=[0.9, 0.0, 0.6, 0.1])
    got = place(est(1, 2, layers=32), gpus, policy="packing", theta=0.5)
    assert used(got) == [("a", 0), ("a", 2)]


def test_packing_breaks_load_ties_on_gpus_already_holding_work():
    gpus = host("a", [70, 30, 50, 80])  # all idle: the fullest GPUs first
    got = place(est(1, 1, layers=16), gpus, policy="packing", theta=0.5)
    assert used(got) == [("a", 1)]
    got = place(est(1, 1, layers=16), gpus, policy="least-loaded", theta=0.5)
    assert used(got) == [("a", 3)]  # least-loaded spreads onto the emptiest


def test_hybrid_packs_below_theta_and_spreads_above():
    gpus = host("a", [40, 40, 40, 40], loads=[0.4, 0.3, 0.0, 0.8])
    # packable: load < 0.5 -> GPUs 0, 1, 2; packing order among them: 0 (0.4), 1 (0.3)
    got = place(est(1, 2, layers=32), gpus, policy="hybrid", theta=0.5)
    assert used(got) == [("a", 0), ("a", 1)]
    # a stricter threshold leaves only GPU 2 packable, too few for 2 GPUs: spread least-loaded over all
    got = place(est(1, 2, layers=32), gpus, policy="hybrid", theta=0.2)
    assert used(got) == [("a", 2), ("a", 1)]


def test_hybrid_falls_back_when_packable_gpus_lack_memory():
    gpus = host("a", [10, 10, 60, 60], loads=[0.2, 0.1, 0.7, 0.9])
    got = place(est(1, 1, layers=32), gpus, policy="hybrid", theta=0.5)
    assert used(got) == [("a", 2)]  # least-loaded of those that hold it


def test_all_gpus_of_a_deployment_share_one_host():
    gpus = host("a", [20, 1]) + host("b", [20, 1])
    got = place(est(1, 2, layers=32), gpus, policy="least-loaded", theta=0.5)
    assert isinstance(got, str)
    assert "needs 2 GPUs on one host" in got and "the best host" in got
    got = place(est(1, 2, layers=32), gpus + host("c", [17, 17]), policy="packing", theta=0.5)
    assert used(got) == [("c", 0), ("c", 1)]


def test_host_choice_follows_the_policy():
    a = host("a", [40] * 4, loads=[0.9, 0.0, 0.0, 0.0])
    b = host("b", [40] * 4, loads=[0.5, 0.5, 0.5, 0.5])
    e = est(1, 2, layers=32)
    # packing: b's two busy GPUs beat a's one busy GPU plus an idle one
    assert used(place(e, a + b, policy="packing", theta=1.0)) == [("b", 0), ("b", 1)]
    # least-loaded: a has two idle GPUs
    assert used(place(e, a + b, policy="least-loaded", theta=1.0)) == [("a", 1), ("a", 2)]


def test_tensor_parallel_stages_group_gpus_by_free_memory():
    # free 30, 10, 30, 10 GiB in policy order; tp=2 x pp=2 must pair 30+30 and 10+10 to hold 36 layers
    gpus = host("a", [30, 10, 30, 10], loads=[0.0, 0.1, 0.2, 0.3])
    got = place(est(2, 2, layers=36), gpus, policy="least-loaded", theta=0.5)
    assert [(a.gpu_index, a.first_layer, a.num_layers) for a in got] == [(0, 0, 26), (2, 0, 26), (1, 26, 10), (3, 26, 10)]


def test_first_and_last_roles_move_when_the_policy_order_cannot_hold_them():
    # GPU 0 comes first in the order but cannot hold the 6 GiB embedding with a layer
    e = est(1, 2, layers=10, first=6 * GIB)
    gpus = host("a", [5, 20], loads=[0.0, 0.1])
    got = place(e, gpus, policy="least-loaded", theta=0.5)
    assert [(a.gpu_index, a.first_layer, a.num_layers) for a in got] == [(1, 0, 5), (0, 5, 5)]
    assert got[0].memory_bytes == 11 * GIB


def test_place_explains_a_miss():
    e = est(1, 2, layers=32, first=GIB)
    got = place(e, host("a", [9, 8.5, 3]), policy="hybrid", theta=0.5)
    assert isinstance(got, str)
    assert got.startswith("tp1-pp2-wfp16-kvfp16-pnone needs 2 GPUs on one host with 16.0 to 17.0 GiB free each")
    assert "9.0 and 8.5 GiB free" in got


def test_place_validates_its_inputs():
    with pytest.raises(BadRequest, match="policy"):
        place(est(), host("a", [80]), policy="random", theta=0.5)
    with pytest.raises(BadRequest, match="theta"):
        place(est(), host("a", [80]), policy="hybrid", theta=1.5)
    with pytest.raises(BadRequest, match="twice"):
        place(est(), host("a", [80]) + host("a", [80]), policy="hybrid", theta=0.5)


def test_arrange_rejects_gpus_that_cannot_hold_the_model():
    assert arrange(est(1, 2, layers=32), host("a", [10, 10])) is None


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
    assert d.why.startswith("min-latency: tp1-pp2-wfp16-kvfp16-pnone has the lowest estimated latency (919 ms for "
                            "512+128 tokens) among the 2 configurations that fit the free GPUs; 2 faster ones did not fit")
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


# ---------------------------------------------------------------------------------------------------
# property tests against brute force


def brute_fits(e: ConfigEstimate, gpus: list[GpuState]) -> bool:
    """Exhaustive: any ordered choice of tp*pp GPUs of one host, stages in that order."""
    tp, pp, n = e.config.tp, e.config.pp, e.num_layers
    for agent in {g.agent_id for g in gpus}:
        mine = [g for g in gpus if g.agent_id == agent]
        for perm in itertools.permutations(mine, tp * pp):
            caps = []
            for s in range(pp):
                group = perm[s * tp:(s + 1) * tp]
                caps.append(min(stage_capacity(e, g.free_bytes, first=s == 0, last=s == pp - 1) for g in group))
            if split_layers(n, caps) is not None:
                return True
    return False


def policy_order(gpus, policy):
    if policy == "least-loaded":
        return sorted(gpus, key=lambda g: (g.load, -g.free_bytes, g.agent_id, g.gpu_index))
    return sorted(gpus, key=lambda g: (-g.load, -(g.total_bytes - g.free_bytes), g.agent_id, g.gpu_index))


def brute_choice(e, gpus, policy):
    """The fitting GPU set, on one host, whose deepest GPU in the policy order comes earliest, then
    the next deepest, and so on; None when nothing fits."""
    order = policy_order(gpus, policy)
    pos = {(g.agent_id, g.gpu_index): i for i, g in enumerate(order)}
    best = None
    for agent in {g.agent_id for g in gpus}:
        mine = [g for g in gpus if g.agent_id == agent]
        for subset in itertools.combinations(mine, e.config.gpus):
            if brute_fits(e, list(subset)):
                depth = sorted((pos[(g.agent_id, g.gpu_index)] for g in subset), reverse=True)
                if best is None or depth < best[0]:
                    best = (depth, {(g.agent_id, g.gpu_index) for g in subset})
    return None if best is None else best[1]


def check_assignments(e: ConfigEstimate, gpus: list[GpuState], got: list[GpuAssignment]):
    tp, pp, n = e.config.tp, e.config.pp, e.num_layers
    assert len(got) == tp * pp
    ids = used(got)
    assert len(set(ids)) == len(ids), "a GPU appears twice"
    assert len({a.agent_id for a in got}) == 1, "GPUs on more than one host"
    free = {(g.agent_id, g.gpu_index): g.free_bytes for g in gpus}
    start = 0
    for s in range(pp):
        stage = got[s * tp:(s + 1) * tp]
        assert len({(a.first_layer, a.num_layers) for a in stage}) == 1, "ranks of a stage differ"
        a0 = stage[0]
        assert a0.first_layer == start and a0.num_layers >= 1
        start += a0.num_layers
        for a in stage:
            need = e.stage_bytes(a.num_layers, first=s == 0, last=s == pp - 1)
            assert a.memory_bytes == need
            assert need <= free[(a.agent_id, a.gpu_index)], "stage exceeds the GPU's free memory"
    assert start == n, "layers not placed exactly once"


LOADS = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9]


@st.composite
def clusters(draw):
    gpus = []
    for a in range(draw(st.integers(1, 3))):
        for i in range(draw(st.integers(1, 4))):
            gpus.append(GpuState(agent_id=f"h{a}", gpu_index=i, gpu_type="T", total_bytes=64,
                                 free_bytes=draw(st.integers(0, 64)), load=draw(st.sampled_from(LOADS))))
    return gpus


@st.composite
def estimate_sets(draw):
    layers = draw(st.integers(1, 10))
    space = list(itertools.product([1, 2], [1, 2, 3], ["fp16", "int8", "int4"]))
    picks = draw(st.lists(st.sampled_from(space), min_size=1, max_size=7, unique=True))
    out = []
    for tp, pp, wq in picks:
        out.append(est(tp, pp, wq, layers=layers, layer_bytes=draw(st.integers(0, 12)),
                       first=draw(st.integers(0, 12)), last=draw(st.integers(0, 12)),
                       overhead=draw(st.integers(0, 6)), ttft=draw(st.integers(1, 50)) * 1.0,
                       tpot=draw(st.integers(1, 20)) * 1.0))
    return out


@st.composite
def intents(draw):
    kind = draw(st.sampled_from(["min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget"]))
    return Intent(kind=kind, cost_model=draw(st.sampled_from(["mem-x-latency", "memory", "gpu-hours"])),
                  slo_ms=draw(st.integers(100, 3000)) * 1.0, budget=draw(st.sampled_from([1e-4, 1e-3, 0.5, 3.0])),
                  prompt_tokens=draw(st.integers(1, 64)), output_tokens=draw(st.integers(1, 128)))


PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(estimate_sets(), clusters(), st.sampled_from(["least-loaded", "packing"]))
def test_placement_is_valid_and_policy_optimal(estimates, gpus, policy):
    for e in estimates:
        got = place(e, gpus, policy=policy, theta=0.5)
        expected = brute_choice(e, gpus, policy)
        assert ClusterView(gpus).fits(e) == (expected is not None)
        if expected is None:
            assert isinstance(got, str) and got.startswith(e.config.key())
            continue
        assert not isinstance(got, str), got
        check_assignments(e, gpus, got)
        assert set(used(got)) == expected
        if e.config.tp == 1:  # stages follow the policy order unless the first/last extras forbid it
            order = [(g.agent_id, g.gpu_index) for g in policy_order(gpus, policy)]
            positions = [order.index(x) for x in used(got)]
            if positions != sorted(positions):
                assert e.first_stage_bytes or e.last_stage_bytes


@PROPS
@given(estimate_sets(), clusters(), st.sampled_from([0.2, 0.5, 0.8]))
def test_hybrid_packs_when_it_can(estimates, gpus, theta):
    for e in estimates:
        got = place(e, gpus, policy="hybrid", theta=theta)
        packable = [g for g in gpus if g.load < theta]
        packed = brute_choice(e, packable, "packing")
        if packed is not None:
            assert set(used(got)) == packed
        else:
            spread = brute_choice(e, gpus, "least-loaded")
            assert (spread is None) == isinstance(got, str)
            if spread is not None:
                assert set(used(got)) == spread
        if not isinstance(got, str):
            check_assignments(e, gpus, got)


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
    estimates = [msgspec.structs.replace(e, tpot_ms=e.tpot_ms * 20) if view.fits(e) else e
                 for e in bench.make_estimates(1000)]
    assert len(estimates) == 1000 and len(gpus) == 64
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        d = plan(estimates, Intent(kind="min-latency"), gpus)
        best = min(best, (time.perf_counter() - t0) * 1000.0)
    assert len(d.rejected) > 900 and d.fitting >= 1
    check_assignments(d.estimate, gpus, d.assignments)
    assert best < 100.0, f"plan() took {best:.1f} ms at best for 1,000 configurations on 64 GPUs"


@PROPS
@given(estimate_sets(), st.lists(st.integers(0, 64), min_size=6, max_size=6))
def test_miss_shortfall_pairs_even_needs_with_the_freest_gpus(estimates, frees):
    from iserve.deployer.planner import _even_needs, _even_stage_needs, _shortfall

    frees = sorted(frees, reverse=True)
    for e in estimates:
        if e.config.pp > e.num_layers:
            continue
        needs = _even_needs(e)
        assert needs == [n for n in _even_stage_needs(e) for _ in range(e.config.tp)]
        k = e.config.tp * e.config.pp
        assert _shortfall(_even_stage_needs(e), frees[:k], e.config.tp) == sum(
            max(0, n - f) for n, f in zip(needs, frees[:k]))
