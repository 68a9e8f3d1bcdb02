"""Tests of steps II and III of the deployment decision: the memory model, the uneven layer split and
load-aware placement, with brute-force property checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from planner_factories import (
    PROPS,
    brute_choice,
    check_assignments,
    clusters,
    est,
    estimate_sets,
    host,
    policy_order,
    used,
)

from iserve.deployer.feasibility import ClusterView
from iserve.deployer.memory import even_needs, even_stage_needs, shortfall_bytes, split_layers, stage_capacity
from iserve.deployer.placement import arrange
from iserve.deployer.planner import place
from iserve.deployer.units import GIB
from iserve.errors import BadRequest


def test_stage_capacity_counts_first_and_last_extras():
    e = est(layers=40, layer_bytes=GIB, first=2 * GIB, last=3 * GIB, overhead=GIB)
    assert stage_capacity(e, 20 * GIB, first=False, last=False) == 19
    assert stage_capacity(e, 20 * GIB, first=True, last=False) == 17
    assert stage_capacity(e, 20 * GIB, first=False, last=True) == 16
    assert stage_capacity(e, 20 * GIB, first=True, last=True) == 14
    assert stage_capacity(e, 80 * GIB, first=True, last=True) == 40  # never more than the model's layers
    assert stage_capacity(e, int(1.5 * GIB), first=False, last=False) == 0


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
    even = [
        list(s)
        for s in splits
        if max(s) == level and all(b == min(c, level) or b == level - 1 for b, c in zip(s, caps))
    ]
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
    assert [(a.gpu_index, a.first_layer, a.num_layers) for a in got] == [
        (0, 0, 26),
        (2, 0, 26),
        (1, 26, 10),
        (3, 26, 10),
    ]


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
@given(estimate_sets(), st.lists(st.integers(0, 64), min_size=6, max_size=6))
def test_miss_shortfall_pairs_even_needs_with_the_freest_gpus(estimates, frees):
    frees = sorted(frees, reverse=True)
    for e in estimates:
        if e.config.pp > e.num_layers:
            continue
        needs = even_needs(e)
        assert needs == [n for n in even_stage_needs(e) for _ in range(e.config.tp)]
        k = e.config.tp * e.config.pp
        assert shortfall_bytes(even_stage_needs(e), frees[:k], e.config.tp) == sum(
            max(0, n - f) for n, f in zip(needs, frees[:k])
        )
