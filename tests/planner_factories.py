"""Factories, brute-force oracles and Hypothesis strategies shared by the planner tests."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from iserve.deployer.memory import split_layers, stage_capacity
from iserve.deployer.placement import GpuState
from iserve.deployer.units import GIB
from iserve.messages import ConfigEstimate, Configuration, GpuAssignment, Intent

# ---------------------------------------------------------------------------------------------------
# factories


def est(
    tp=1,
    pp=1,
    wq="fp16",
    kv="fp16",
    pr="none",
    *,
    layers=32,
    layer_bytes=GIB,
    first=0,
    last=0,
    overhead=0,
    ttft=100.0,
    per_tok=0.0,
    tpot=10.0,
    total=None,
) -> ConfigEstimate:
    """A configuration estimate; ``total_bytes`` defaults to the sum over all ``tp * pp`` GPUs."""
    if total is None:
        total = tp * (pp * overhead + layers * layer_bytes + first + last)
    return ConfigEstimate(
        config=Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pr),
        ttft_base_ms=ttft,
        ttft_per_token_ms=per_tok,
        tpot_ms=tpot,
        layer_bytes=layer_bytes,
        first_stage_bytes=first,
        last_stage_bytes=last,
        gpu_overhead_bytes=overhead,
        total_bytes=total,
        num_layers=layers,
    )


def gpu(agent="a", index=0, free=80 * GIB, load=0.0, total=80 * GIB) -> GpuState:
    return GpuState(agent_id=agent, gpu_index=index, gpu_type="H100", total_bytes=total, free_bytes=free, load=load)


def host(agent, frees_gib, loads=None) -> list[GpuState]:
    loads = loads or [0.0] * len(frees_gib)
    return [gpu(agent, i, int(f * GIB), ld) for i, (f, ld) in enumerate(zip(frees_gib, loads))]


# three configurations whose order differs by intent
FAST_BIG = est(1, 1, ttft=50, tpot=5, total=60 * GIB)  # 685 ms, 60 GiB, 1 GPU
SLOW_SMALL = est(1, 1, "int4", ttft=50, tpot=12, total=15 * GIB)  # 1574 ms, 15 GiB
MID_4GPU = est(2, 2, "int8", ttft=40, tpot=4, total=40 * GIB)  # 548 ms, 40 GiB, 4 GPUs
ALL = [SLOW_SMALL, FAST_BIG, MID_4GPU]


def used(assignments) -> list[tuple[str, int]]:
    return [(a.agent_id, a.gpu_index) for a in assignments]


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
                group = perm[s * tp : (s + 1) * tp]
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
        stage = got[s * tp : (s + 1) * tp]
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
            gpus.append(
                GpuState(
                    agent_id=f"h{a}",
                    gpu_index=i,
                    gpu_type="T",
                    total_bytes=64,
                    free_bytes=draw(st.integers(0, 64)),
                    load=draw(st.sampled_from(LOADS)),
                )
            )
    return gpus


@st.composite
def estimate_sets(draw):
    layers = draw(st.integers(1, 10))
    space = list(itertools.product([1, 2], [1, 2, 3], ["fp16", "int8", "int4"]))
    picks = draw(st.lists(st.sampled_from(space), min_size=1, max_size=7, unique=True))
    out = []
    for tp, pp, wq in picks:
        out.append(
            est(
                tp,
                pp,
                wq,
                layers=layers,
                layer_bytes=draw(st.integers(0, 12)),
                first=draw(st.integers(0, 12)),
                last=draw(st.integers(0, 12)),
                overhead=draw(st.integers(0, 6)),
                ttft=draw(st.integers(1, 50)) * 1.0,
                tpot=draw(st.integers(1, 20)) * 1.0,
            )
        )
    return out


@st.composite
def intents(draw):
    kind = draw(
        st.sampled_from(["min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget"])
    )
    return Intent(
        kind=kind,
        cost_model=draw(st.sampled_from(["mem-x-latency", "memory", "gpu-hours"])),
        slo_ms=draw(st.integers(100, 3000)) * 1.0,
        budget=draw(st.sampled_from([1e-4, 1e-3, 0.5, 3.0])),
        prompt_tokens=draw(st.integers(1, 64)),
        output_tokens=draw(st.integers(1, 128)),
    )


PROPS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
