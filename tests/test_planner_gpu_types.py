"""Tests of the choice across GPU types: :func:`plan_gpu_types` runs the plan on every profiled type
and keeps the decision that best meets the intent."""

from __future__ import annotations

import pytest
from planner_factories import est, gpu

from iserve.deployer.placement import GpuState
from iserve.deployer.planner import plan, plan_gpu_types
from iserve.deployer.units import GIB
from iserve.errors import BadRequest, Infeasible, Unavailable
from iserve.messages import ConfigEstimate, ConfigurationMap, Intent
from iserve.quality import ANY


def cmap(gpu_type: str, *estimates: ConfigEstimate, context: int = 2048) -> ConfigurationMap:
    return ConfigurationMap(
        model="m",
        gpu_type=gpu_type,
        gpu_memory_bytes=80 * GIB,
        max_gpus=8,
        context_tokens=context,
        estimates=list(estimates),
    )


def gpus_of(gpu_type: str, agent: str, frees_gib: list[float]) -> list[GpuState]:
    out = []
    for i, f in enumerate(frees_gib):
        g = gpu(agent, i, int(f * GIB))
        out.append(
            GpuState(
                agent_id=g.agent_id,
                gpu_index=g.gpu_index,
                gpu_type=gpu_type,
                total_bytes=g.total_bytes,
                free_bytes=g.free_bytes,
                load=g.load,
            )
        )
    return out


GPUS = gpus_of("A100", "a", [80, 80]) + gpus_of("H100", "h", [80, 80])
ARGS = dict(policy="hybrid", theta=0.5, stale_s=5.0, model="m")


def choose(profiles, intent=Intent(kind="min-latency"), gpus=GPUS, **kw):
    return plan_gpu_types(profiles, intent, gpus, **{**ARGS, **kw})


def test_the_faster_type_wins_a_min_latency_intent():
    slow, fast = est(ttft=50, tpot=20), est(ttft=20, tpot=5)
    got = choose({"A100": cmap("A100", slow), "H100": cmap("H100", fast)})
    assert got.profile.gpu_type == "H100" and got.decision.estimate is fast
    assert {a.agent_id for a in got.decision.assignments} == {"h"}  # only GPUs of the chosen type


def test_the_cheaper_type_wins_a_min_cost_intent():
    big = est(ttft=10, tpot=5, layers=32)  # 32 GiB
    small = est(1, 1, "int4", ttft=10, tpot=6, layers=32, layer_bytes=GIB // 4)  # 8 GiB
    intent = Intent(kind="min-cost", cost_model="memory", quality=ANY)  # int4 is not measured here
    got = choose({"H100": cmap("H100", big), "A100": cmap("A100", small)}, intent)
    assert got.profile.gpu_type == "A100" and got.decision.cost == pytest.approx(8.0)


def test_a_type_whose_gpus_cannot_hold_any_configuration_is_skipped():
    fast = est(ttft=10, tpot=5, layers=64)  # 64 GiB: only the A100 host has room
    gpus = gpus_of("A100", "a", [80]) + gpus_of("H100", "h", [40])
    got = choose({"H100": cmap("H100", fast), "A100": cmap("A100", est(ttft=40, tpot=20, layers=64))}, gpus=gpus)
    assert got.profile.gpu_type == "A100"


def test_missing_profiles_short_contexts_and_types_without_gpus_are_skipped():
    e = est()
    gpus = gpus_of("A100", "a", [80])
    profiles = {"H100": None, "L4": cmap("L4", e), "T4": cmap("T4", e, context=512), "A100": cmap("A100", e)}
    got = choose(profiles, gpus=gpus + gpus_of("T4", "t", [80]), context_tokens=1024)
    assert got.profile.gpu_type == "A100"


def test_ties_go_to_the_type_listed_first():
    e = est()
    for order in (["A100", "H100"], ["H100", "A100"]):
        got = choose({t: cmap(t, e) for t in order})
        assert got.profile.gpu_type == order[0]


def test_one_type_decides_as_plan_does():
    estimates = [est(ttft=50, tpot=20), est(2, 1, ttft=20, tpot=5, layer_bytes=GIB // 2), est(1, 2, ttft=30, tpot=7)]
    intent = Intent(kind="min-latency")
    got = choose({"A100": cmap("A100", *estimates)}, intent)
    want = plan(estimates, intent, GPUS[:2], policy="hybrid", theta=0.5)
    assert got.decision == want


def test_no_gpus_of_any_profiled_type_is_unavailable():
    with pytest.raises(Unavailable) as info:
        choose({"A100": cmap("A100", est())}, gpus=gpus_of("H100", "h", [80]))
    assert info.value.message == (
        "no A100 GPU reported load in the last 5 s; start a GPU agent (`iserve up` starts one)."
    )


def test_only_a_too_long_context_is_a_bad_request():
    with pytest.raises(BadRequest) as info:
        choose({"A100": cmap("A100", est(), context=512)}, context_tokens=1024)
    assert info.value.message.startswith(
        "context_tokens 1024 is longer than m was profiled for "
        "(the A100 profile is for a context of 512 tokens); ask for at most that"
    )


def test_every_type_infeasible_lists_each_reason():
    huge = est(layers=200)
    with pytest.raises(Infeasible) as info:
        choose({"A100": cmap("A100", huge), "H100": None, "T4": cmap("T4", huge, context=512)}, context_tokens=1024)
    parts = info.value.message.split("; ")
    assert parts[0].startswith("A100: none of the 1 configurations")
    assert "the H100 profile is missing" in parts
    assert parts[-1] == "the T4 profile is for a context of 512 tokens"


def test_a_pinned_configuration_is_the_one_placed_or_a_bad_request():
    fast, small = est(ttft=20, tpot=5), est(wq="int8", ttft=30, tpot=8, layer_bytes=GIB // 2)
    profiles = {"H100": cmap("H100", fast, small)}
    assert choose(profiles).decision.estimate is fast  # the intent's pick
    pinned = choose(profiles, config=small.config.key())
    assert pinned.decision.estimate is small
    with pytest.raises(BadRequest, match="not in m's H100 profile"):
        choose(profiles, config="tp8-pp1-wfp16-kvfp16-pnone")
