"""The paper's baselines as deployment policies (loadgen/baselines.py): valid decisions
(memory never exceeded, every layer exactly once) that follow each baseline's definition."""

from __future__ import annotations

import itertools

import pytest

from iserve.deployer.placement import GpuState
from iserve.deployer.planner import Decision, plan
from iserve.deployer.units import GIB
from iserve.errors import BadRequest, Infeasible
from iserve.loadgen import alpaserve, baselines
from iserve.messages import ConfigEstimate, Configuration, Intent

INTENT = Intent(kind="min-latency", prompt_tokens=100, output_tokens=11)


def est(
    tp=1,
    pp=1,
    wq="fp16",
    kv="fp16",
    pr="none",
    *,
    layers=32,
    layer_gib=1.0,
    first=0,
    last=0,
    overhead=0,
    ttft=100.0,
    tpot=10.0,
) -> ConfigEstimate:
    """A configuration estimate whose per-rank layer bytes shrink with TP (``layer_gib / tp``)."""
    lb = int(layer_gib * GIB / tp)
    return ConfigEstimate(
        config=Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pr),
        ttft_base_ms=ttft,
        ttft_per_token_ms=0.0,
        tpot_ms=tpot,
        layer_bytes=lb,
        first_stage_bytes=first,
        last_stage_bytes=last,
        gpu_overhead_bytes=overhead,
        total_bytes=tp * (pp * overhead + layers * lb + first + last),
        num_layers=layers,
    )


def model(layers=32, layer_gib=1.0, tps=(1, 2, 4), max_gpus=8, quant=True, **kw) -> list[ConfigEstimate]:
    """Every (tp, pp) with tp * pp <= max_gpus, fp16, plus int4 variants (which the baselines must ignore)."""
    out = []
    for tp in tps:
        for pp in range(1, min(max_gpus // tp, layers) + 1):
            out.append(est(tp, pp, layers=layers, layer_gib=layer_gib, tpot=10.0 / tp, **kw))
            if quant:
                out.append(est(tp, pp, "int4", layers=layers, layer_gib=layer_gib / 4, tpot=4.0 / tp, **kw))
    return out


def host(frees_gib, agent="h0", loads=None, total_gib=48) -> list[GpuState]:
    loads = loads or [0.0] * len(frees_gib)
    return [
        GpuState(
            agent_id=agent, gpu_index=i, gpu_type="A6000", total_bytes=total_gib * GIB, free_bytes=int(f * GIB), load=ld
        )
        for i, (f, ld) in enumerate(zip(frees_gib, loads))
    ]


def check_valid(d: Decision, gpus: list[GpuState]) -> None:
    """Memory never exceeded, one host, tp * pp GPUs, every layer exactly once, stage bytes exact."""
    e = d.estimate
    c = e.config
    assert len(d.assignments) == c.tp * c.pp
    assert len({(a.agent_id, a.gpu_index) for a in d.assignments}) == c.tp * c.pp
    assert len({a.agent_id for a in d.assignments}) == 1
    free = {(g.agent_id, g.gpu_index): g.free_bytes for g in gpus}
    for a in d.assignments:
        assert a.memory_bytes <= free[(a.agent_id, a.gpu_index)]
    stages = [d.assignments[s * c.tp : (s + 1) * c.tp] for s in range(c.pp)]
    start = 0
    for s, ranks in enumerate(stages):
        assert len({(a.first_layer, a.num_layers) for a in ranks}) == 1  # every rank holds the stage's layers
        assert ranks[0].first_layer == start and ranks[0].num_layers >= 1
        for a in ranks:
            assert a.memory_bytes == e.stage_bytes(a.num_layers, first=s == 0, last=s == c.pp - 1)
        start += ranks[0].num_layers
    assert start == e.num_layers


# ---------------------------------------------------------------------------------------------------
# TensorRT-LLM_TP and _PP


def test_max_tp_takes_the_largest_tp_at_pp1_in_fp16():
    gpus = host([48] * 8)
    d = baselines.max_tp(model(), INTENT, gpus)
    assert (d.estimate.config.tp, d.estimate.config.pp) == (4, 1)
    assert d.estimate.config.weight_quant == "fp16" and d.estimate.config.kv_quant == "fp16"
    check_valid(d, gpus)
    assert d.latency_ms == pytest.approx(100 + 10 * 2.5)
    assert "max-tp" in d.why


def test_max_tp_grows_pp_only_when_it_must():
    # 32 GiB at fp16: TP=4 needs 8 GiB per GPU at PP=1; with 5 GiB free per GPU, PP must grow to 2
    gpus = host([5] * 8)
    d = baselines.max_tp(model(), INTENT, gpus)
    assert (d.estimate.config.tp, d.estimate.config.pp) == (4, 2)
    check_valid(d, gpus)
    assert d.rejected and d.rejected[0].config.startswith("tp4-pp1-")


def test_max_pp_spreads_layers_over_every_gpu_and_shrinks_when_gpus_are_full():
    gpus = host([48] * 4)
    d = baselines.max_pp(model(max_gpus=4), INTENT, gpus)
    assert (d.estimate.config.tp, d.estimate.config.pp) == (1, 4)
    check_valid(d, gpus)
    assert sorted(a.gpu_index for a in d.assignments) == [0, 1, 2, 3]
    # PP = min(GPUs, layers)
    shallow = baselines.max_pp(model(layers=2, max_gpus=4), INTENT, gpus)
    assert shallow.estimate.config.pp == 2
    # a full GPU cannot hold a stage: the largest PP that fits, on the other GPUs, split unevenly
    frag = host([20, 0.5, 10, 6])
    d3 = baselines.max_pp(model(max_gpus=4), INTENT, frag)
    assert d3.estimate.config.pp == 3
    check_valid(d3, frag)
    assert 1 not in {a.gpu_index for a in d3.assignments}
    assert len({a.num_layers for a in d3.assignments}) > 1  # uneven stages


def test_static_baselines_ignore_load_and_the_intent():
    gpus = host([48] * 8, loads=[0.9, 0.9, 0.9, 0.9, 0.0, 0.0, 0.0, 0.0])
    a = baselines.max_tp(model(), Intent(kind="min-memory"), gpus)
    b = baselines.max_tp(model(), Intent(kind="min-latency"), host([48] * 8))
    assert a.estimate.config == b.estimate.config
    assert [x.gpu_index for x in a.assignments] == [x.gpu_index for x in b.assignments]


def test_baselines_raise_infeasible_with_a_reason():
    with pytest.raises(Infeasible, match="fits the free GPUs"):
        baselines.max_tp(model(), INTENT, host([0.5] * 8))
    with pytest.raises(Infeasible, match="no configuration this baseline deploys"):
        baselines.max_pp([est(1, 1, "int4")], INTENT, host([48]))


# ---------------------------------------------------------------------------------------------------
# Accelerate


def test_accelerate_shards_over_all_gpus_with_the_allgather_penalty():
    layers, layer_gib = 32, 1.0
    kv_gib = 0.25  # per layer at fp16; the int8-KV sibling holds half of it
    ests = []
    for pp in range(1, 9):
        ests.append(est(1, pp, layers=layers, layer_gib=layer_gib, first=GIB // 2, last=GIB // 2, overhead=GIB // 4))
        ests.append(
            est(
                1,
                pp,
                kv="int8",
                layers=layers,
                layer_gib=layer_gib - kv_gib / 2,
                first=GIB // 2,
                last=GIB // 2,
                overhead=GIB // 4,
            )
        )
    weights, layer_w = baselines.weight_bytes(ests, ests[0])
    assert layer_w == int(layer_gib * GIB) - int(kv_gib * GIB)
    assert weights == layers * layer_w + GIB
    gpus = host([48] * 8)
    bw = 50e9
    d = baselines.accelerate(ests, INTENT, gpus, allgather_bytes_per_s=bw)
    check_valid(d, gpus)
    assert d.estimate.config.pp == 8 and len(d.assignments) == 8
    gather_ms = 7 / 8 * weights / bw * 1000
    base = ests[0]
    assert d.estimate.tpot_ms == pytest.approx(base.tpot_ms + gather_ms)
    assert d.estimate.ttft_base_ms == pytest.approx(base.ttft_base_ms + gather_ms)
    assert d.latency_ms == pytest.approx(base.latency_ms(100, 11) + 11 * gather_ms)
    # one gathered layer per GPU on top of the shard
    assert d.estimate.gpu_overhead_bytes == base.gpu_overhead_bytes + layer_w
    assert d.estimate.method == "accelerate-fsdp"
    # fewer GPUs free: sharded over as many as fit, with that many's penalty
    d4 = baselines.accelerate(ests, INTENT, host([48] * 4 + [0.1] * 4), allgather_bytes_per_s=bw)
    assert d4.estimate.config.pp == 4
    assert d4.estimate.tpot_ms == pytest.approx(base.tpot_ms + 3 / 4 * weights / bw * 1000)
    with pytest.raises(BadRequest):
        baselines.accelerate(ests, INTENT, gpus, allgather_bytes_per_s=0)


def test_iserve_is_the_planner():
    ests, gpus = model(), host([48] * 8)
    intent = Intent(kind="min-memory")
    a, b = baselines.iserve(ests, intent, gpus), plan(ests, intent, gpus)
    assert a.estimate.config == b.estimate.config and a.assignments == b.assignments
    assert a.estimate.config.weight_quant == "int4"  # iServe may compress; the baselines never do


@pytest.mark.parametrize("frees", [[48] * 8, [10, 30, 2, 48, 7, 7, 25, 12], [3, 3, 3, 3, 40, 0, 0, 1]])
def test_every_baseline_decision_is_valid_on_fragmented_gpus(frees):
    gpus = host(frees)
    ests = model(layers=40, layer_gib=0.6, first=GIB // 4, last=GIB // 3, overhead=GIB // 5)
    for fn in (baselines.max_tp, baselines.max_pp, baselines.accelerate, baselines.iserve):
        try:
            d = fn(ests, INTENT, gpus)
        except Infeasible:
            continue
        check_valid(d, gpus)
        if fn is not baselines.iserve:
            assert baselines.is_plain(d.estimate)


# ---------------------------------------------------------------------------------------------------
# AlpaServe


def _alpa_models():
    big = model(layers=40, layer_gib=3.0, tps=(1, 2, 4), max_gpus=4, quant=False, ttft=400.0)  # 120 GiB: >= 3 GPUs
    small = model(layers=24, layer_gib=0.5, tps=(1, 2, 4), max_gpus=4, quant=False, ttft=50.0)  # 12 GiB
    return {"big": big, "small-a": small, "small-b": small}


def _alpa(drop: bool, rates=None):
    models = _alpa_models()
    rates = rates or {"big": 0.01, "small-a": 1.0, "small-b": 1.0}
    slo = {"big": 2000.0, "small-a": 400.0, "small-b": 400.0}
    return alpaserve.alpaserve(
        models,
        rates,
        host([48] * 4),
        drop_models=drop,
        intent=Intent(kind="min-latency", prompt_tokens=100, output_tokens=20),
        slo_ms=slo,
    )


def _check_plan_memory(p: alpaserve.AlpaServePlan, gpus: list[GpuState]) -> None:
    used = {(g.agent_id, g.gpu_index): 0 for g in gpus}
    for reps in p.replicas.values():
        for d in reps:
            check_valid(d, gpus)
            for a in d.assignments:
                used[(a.agent_id, a.gpu_index)] += a.memory_bytes
    free = {(g.agent_id, g.gpu_index): g.free_bytes for g in gpus}
    assert all(used[k] <= free[k] for k in used)


def test_alpaserve_may_drop_a_model_and_alpaserve_star_never_does():
    gpus = host([48] * 4)
    dropping = _alpa(drop=True)
    assert dropping.dropped == ["big"] and dropping.replicas["big"] == []
    assert "big" in dropping.drop_reasons
    # the GPUs the big model would need serve the busy small ones instead
    assert all(dropping.replicas[m] for m in ("small-a", "small-b"))
    _check_plan_memory(dropping, gpus)

    keeping = _alpa(drop=False)
    assert keeping.dropped == []
    assert all(keeping.replicas[m] for m in ("big", "small-a", "small-b"))
    _check_plan_memory(keeping, gpus)
    # the big model needs a group of at least 3 GPUs; the small ones share what is left
    big = keeping.replicas["big"][0]
    assert big.estimate.config.gpus >= 3
    assert 0 <= keeping.attainment <= 1 and keeping.evaluations > 0
    assert "alpaserve*" in keeping.why


def test_alpaserve_picks_one_parallelism_per_group_in_fp16():
    p = _alpa(drop=False)
    for grp in p.groups:
        held = [
            d
            for m in grp.models
            for d in p.replicas[m]
            if {(a.agent_id, a.gpu_index) for a in d.assignments} == set(grp.gpus)
        ]
        assert {(d.estimate.config.tp, d.estimate.config.pp) for d in held} <= {(grp.tp, grp.pp)}
    for reps in p.replicas.values():
        assert all(baselines.is_plain(d.estimate) for d in reps)
    # the groups partition the GPUs
    gpus = list(itertools.chain.from_iterable(g.gpus for g in p.groups))
    assert sorted(gpus) == sorted(set(gpus)) == [("h0", i) for i in range(4)]


def test_alpaserve_with_room_for_all_keeps_every_model_and_replicates_busy_ones():
    small = model(layers=24, layer_gib=0.5, tps=(1, 2), max_gpus=4, quant=False, ttft=50.0)
    p = alpaserve.alpaserve(
        {"a": small, "b": small},
        {"a": 3.0, "b": 0.1},
        host([48] * 4),
        drop_models=True,
        intent=INTENT,
        slo_ms={"a": 500.0, "b": 500.0},
    )
    assert p.dropped == []
    assert len(p.replicas["a"]) >= len(p.replicas["b"]) >= 1
    _check_plan_memory(p, host([48] * 4))


def test_alpaserve_slos_default_to_a_multiple_of_minimum_parallelism():
    with pytest.raises(BadRequest, match="SLO"):
        alpaserve.alpaserve(_alpa_models(), {}, host([48] * 4), drop_models=True, intent=INTENT, slo_ms={})
    rates = {"big": 0.01, "small-a": 1.0, "small-b": 1.0}
    p = alpaserve.alpaserve(_alpa_models(), rates, host([48] * 4), False)
    assert p.dropped == [] and 0 <= p.attainment <= 1
