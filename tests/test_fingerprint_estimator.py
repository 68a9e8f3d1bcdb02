"""The estimator's refinements of paper L2/M2: host and device timelines, decode steps by position,
non-negative fits, the communication model for unmeasured TP, KV bytes from the engine, per-family
engine limits and predicting another GPU type."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import msgspec
import numpy as np
import pytest

from iserve.checkpoint import layer_tensor_shapes, other_tensor_shapes
from iserve.fingerprint import estimator as est
from iserve.fingerprint.estimator.latency import _fit_steps
from iserve.messages import (
    ArchSpec,
    ConfigEstimate,
    Configuration,
    DecodeTiming,
    FingerprintMeasurement,
    ProfileVariant,
    ProfilingCost,
    PromptTiming,
    WeightBreakdown,
)


def _arch(heads=32, kv=32, layers=32, hidden=4096, ffn=11008, vocab=32000, **kw) -> ArchSpec:
    return ArchSpec(
        family=kw.pop("family", "llama"),
        model_type=kw.pop("model_type", "llama"),
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position=4096,
        **kw,
    )


def _weights(arch: ArchSpec) -> WeightBreakdown:
    layer = layer_tensor_shapes(arch)
    others = other_tensor_shapes(arch)
    return WeightBreakdown(
        embed_params=math.prod(others["model.embed_tokens.weight"]),
        head_params=math.prod(others["lm_head.weight"]) if "lm_head.weight" in others else 0,
        final_norm_params=math.prod(others["model.norm.weight"]),
        layer_linear_params=sum(math.prod(s) for s in layer.values() if len(s) == 2),
        layer_other_params=sum(math.prod(s) for s in layer.values() if len(s) != 2),
        checkpoint_bytes=0,
    )


# ---------------------------------------------------------------------------------------------------
# a simulated engine: the host launches kernels one by one, the device runs them in order


@dataclass(frozen=True)
class Kernel:
    host_us: float  # host time to launch it (Python + dispatch)
    dev_us: float  # device time to run it


def simulate(kernels: list[Kernel], pre_us: float, post_us: float) -> tuple[float, float]:
    """One pass: host preamble, then kernels launched one by one (each runs when both it has been
    launched and the previous one is done), then the host waits for the result and returns.
    Returns the wall time and what the profiler's device timing reads (launches queued ahead: the
    kernels back to back plus the host's work after the last one), in ms."""
    t_host, dev_free = pre_us, 0.0
    for k in kernels:
        t_host += k.host_us
        dev_free = max(dev_free, t_host) + k.dev_us
    wall = max(dev_free, t_host) + post_us
    device = sum(k.dev_us for k in kernels) + post_us
    return wall / 1000.0, device / 1000.0


def layer_kernels(tokens: int, position: int) -> list[Kernel]:
    """An eager Llama-2-7B-like layer on an H100: 14 launches of 8 us each (112 us of host time),
    GEMMs whose device time grows with the tokens, attention with the keys read."""
    gemm = lambda base, per_tok: Kernel(8, base + per_tok * tokens)  # noqa: E731
    small = Kernel(8, 2 + 0.004 * tokens)
    attn = Kernel(9, 6 + 0.006 * position + 0.00004 * tokens * tokens)
    return [
        small,
        gemm(40, 0.12),
        small,
        small,
        small,
        small,
        small,
        attn,
        gemm(14, 0.04),
        small,
        gemm(75, 0.25),
        small,
        small,
        gemm(38, 0.13),
    ]


def head_kernels(tokens: int) -> list[Kernel]:
    """Before the layers: token copy, position fill, embedding, RoPE rows."""
    return [Kernel(10, 2), Kernel(10, 2), Kernel(12, 3 + 0.002 * tokens), Kernel(10, 2), Kernel(10, 2)]


def tail_kernels() -> list[Kernel]:
    """After the layers: final norm, LM head (last position), float, argmax, then Python work of the
    loop (sampling bookkeeping, timers) that runs while the device still works."""
    return [Kernel(60, 3), Kernel(60, 95), Kernel(60, 3), Kernel(60, 4), Kernel(200, 0)]


def simulate_model(layers: int, *, tokens: int, position: int, graphs: bool = False) -> tuple[float, float]:
    """An eager engine's pass: about 0.45 ms of host work per pass besides 0.11 ms of launches per
    layer, against 0.2 ms of device time per layer: the 1- and 2-layer fingerprints are host-bound,
    the 32-layer model device-bound, so a line through the fingerprints' wall times predicts the
    host's per-layer cost (docs/fingerprint.md). With ``graphs`` the decode step is one launch."""
    ks = head_kernels(tokens) + [k for _ in range(layers) for k in layer_kernels(tokens, position)] + tail_kernels()
    if graphs and tokens == 1:
        ks = [Kernel(25, sum(k.dev_us for k in ks))]
    return simulate(ks, pre_us=20 + 0.01 * tokens, post_us=40)


def simulated_measurement(
    arch, w, layers: int, prompts: list[int], runs: list[tuple[int, int]], *, device=True, graphs=False
) -> FingerprintMeasurement:
    ttft, ttft_dev = [], []
    for p in prompts:
        wall, dev = simulate_model(layers, tokens=p, position=p)
        ttft.append(PromptTiming(prompt_tokens=p, ttft_ms=wall))
        ttft_dev.append(PromptTiming(prompt_tokens=p, ttft_ms=dev))
    decode, decode_dev = [], []
    for p, o in runs:
        for x in range(p, p + o - 1):
            wall, dev = simulate_model(layers, tokens=1, position=x, graphs=graphs)
            decode.append(DecodeTiming(position=x, step_ms=wall))
            decode_dev.append(DecodeTiming(position=x, step_ms=dev))
    weights = est.fingerprint_weight_bytes(arch, w, ProfileVariant(), layers)
    m = FingerprintMeasurement(
        num_layers=layers,
        variant=ProfileVariant(),
        ttft=ttft,
        tpot_ms=float(np.median([d.step_ms for d in decode])),
        decode_steps=len(decode),
        decode=decode,
        peak_bytes=weights + 2**30,
        weight_bytes=weights,
    )
    if device:
        m.ttft_device = ttft_dev
        m.decode_device = decode_dev
        m.tpot_device_ms = float(np.median([d.step_ms for d in decode_dev]))
    return m


def test_host_and_device_timelines_extrapolate_a_launch_bound_fingerprint_to_a_device_bound_model():
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [simulated_measurement(arch, w, n, prompts, runs) for n in (1, 2)]
    # the fingerprints' decode steps are host-bound, the full model's are device-bound
    for n in (1, 2):
        wall, dev = simulate_model(n, tokens=1, position=600)
        assert wall > dev * 1.3
    wall32, dev32 = simulate_model(32, tokens=1, position=600)
    assert wall32 < dev32 * 1.05

    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    [naive] = est.fit_estimates(
        arch,
        w,
        [msgspec.structs.replace(m, ttft_device=[], decode_device=[], tpot_device_ms=0.0) for m in ms],
        [Configuration()],
        context_tokens=2048,
    )
    assert e.tpot_host_ms and e.ttft_host_ms and not naive.tpot_host_ms
    for p, o in runs + [(200, 100), (1500, 300)]:
        truth = np.mean([simulate_model(32, tokens=1, position=x)[0] for x in range(p, p + o - 1)])
        # the slack (least wall-minus-device gap of a fingerprint) bounds the host's own time from
        # above: a few percent high at worst when every fingerprint is host-bound
        assert e.tpot_for(p, o) == pytest.approx(truth, rel=0.05), (p, o)
        assert e.tpot_for(p, o) >= truth * 0.99
        assert naive.tpot_for(p, o) < truth * 0.75  # wall-time extrapolation predicts the host's cost
    for p in prompts + [256, 768]:
        truth = simulate_model(32, tokens=p, position=p)[0]
        assert e.ttft_ms(p) == pytest.approx(truth, rel=0.02), p


def test_graph_captured_decode_is_extrapolated_within_a_percent():
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [simulated_measurement(arch, w, n, prompts, runs, graphs=True) for n in (1, 2)]
    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    for p, o in runs + [(64, 200), (1800, 100)]:
        truth = np.mean([simulate_model(32, tokens=1, position=x, graphs=True)[0] for x in range(p, p + o - 1)])
        assert e.tpot_for(p, o) == pytest.approx(truth, rel=0.01), (p, o)


def test_graph_captured_decode_ignores_host_jitter_in_the_wall_slope():
    """A captured decode step has no per-layer host work: jitter that makes the 2-layer fingerprint's
    wall steps slower must not be multiplied by the layer count (seen on an H100: +15-20%)."""
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [simulated_measurement(arch, w, n, prompts, runs, graphs=True) for n in (1, 2)]
    ms[1].decode = [DecodeTiming(position=d.position, step_ms=d.step_ms + 0.05) for d in ms[1].decode]
    ms[1].tpot_ms += 0.05
    flagged = [msgspec.structs.replace(m, decode_graphs=True) for m in ms]
    [e] = est.fit_estimates(arch, w, flagged, [Configuration()], context_tokens=2048)
    [unflagged] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    assert not e.tpot_host_ms and unflagged.tpot_host_ms
    for p, o in runs:
        truth = np.mean([simulate_model(32, tokens=1, position=x, graphs=True)[0] for x in range(p, p + o - 1)])
        assert e.tpot_for(p, o) == pytest.approx(truth, rel=0.01), (p, o)
        assert unflagged.tpot_for(p, o) > truth * 1.05  # the jitter, times 31 layers


def test_host_bound_models_keep_the_host_line():
    """Where every layer is host-bound (tiny GEMMs), the wall-time extrapolation is the answer."""
    arch = _arch()
    w = _weights(arch)

    def cheap(layers, tokens, position):
        ks = [Kernel(10, 2)] + [Kernel(8, 3) for _ in range(14 * layers)] + [Kernel(8, 3), Kernel(8, 5)]
        return simulate(ks, 15, 35)

    runs = [(64, 8), (16, 16)]
    ms = []
    for n in (1, 2):
        m = FingerprintMeasurement(
            num_layers=n,
            variant=ProfileVariant(),
            tpot_ms=cheap(n, 1, 0)[0],
            decode_steps=1,
            peak_bytes=2**31,
            ttft=[PromptTiming(prompt_tokens=p, ttft_ms=cheap(n, p, p)[0]) for p in (16, 32, 64)],
            ttft_device=[PromptTiming(prompt_tokens=p, ttft_ms=cheap(n, p, p)[1]) for p in (16, 32, 64)],
            tpot_device_ms=cheap(n, 1, 0)[1],
        )
        m.decode = [DecodeTiming(position=x, step_ms=cheap(n, 1, x)[0]) for p, o in runs for x in range(p, p + o - 1)]
        m.decode_device = [
            DecodeTiming(position=x, step_ms=cheap(n, 1, x)[1]) for p, o in runs for x in range(p, p + o - 1)
        ]
        ms.append(m)
    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=512)
    assert e.tpot_for(64, 8) == pytest.approx(cheap(32, 1, 64)[0], rel=0.01)
    assert e.ttft_ms(32) == pytest.approx(cheap(32, 32, 32)[0], rel=0.01)


def test_nnls_is_exact_when_feasible_and_never_negative():
    rng = np.random.default_rng(0)
    a = rng.random((20, 4))
    truth = np.array([1.0, 0.5, 2.0, 0.25])
    assert est.nnls(a, a @ truth) == pytest.approx(truth)
    y = a @ np.array([1.0, -0.3, 2.0, 0.25]) + rng.normal(0, 0.01, 20)
    coef = est.nnls(a, y)
    assert (coef >= 0).all() and coef[1] == 0.0
    # an unconstrained fit would give a negative per-position slope from this noise; ours is 0
    points = [(n, x, n * 1.0 + 0.5 + (0.01 if x == 10 else 0.0)) for n in (1, 2) for x in (10, 500)]
    (a_l, b_l), (a_o, b_o) = _fit_steps(points)
    assert b_l >= 0 and b_o >= 0 and a_l == pytest.approx(1.0, abs=0.02)


def _mean_of_max_brute(e: ConfigEstimate, p: int, o: int) -> float:
    if o <= 1:
        return e.step_ms(p)
    return sum(e.step_ms(x) for x in range(p, p + o - 1)) / (o - 1)


def test_tpot_for_is_the_exact_mean_of_the_larger_of_two_lines():
    rnd = random.Random(1)
    base = dict(
        config=Configuration(),
        ttft_base_ms=1.0,
        ttft_per_token_ms=0.01,
        layer_bytes=1,
        first_stage_bytes=1,
        last_stage_bytes=1,
        gpu_overhead_bytes=1,
        total_bytes=1,
        num_layers=1,
    )
    for _ in range(300):
        e = ConfigEstimate(
            **base,
            tpot_ms=rnd.uniform(0, 10),
            tpot_per_position_ms=rnd.choice([0.0, rnd.uniform(0, 0.01)]),
            tpot_host_ms=[rnd.uniform(0, 10), rnd.choice([0.0, rnd.uniform(0, 0.01)])],
        )
        p, o = rnd.randrange(0, 3000), rnd.randrange(1, 800)
        assert e.tpot_for(p, o) == pytest.approx(_mean_of_max_brute(e, p, o), rel=1e-9)
        assert e.latency_ms(p, o) == pytest.approx(e.ttft_ms(p) + (o - 1) * e.tpot_for(p, o), rel=1e-9)
    # without host lines: the old formula
    plain = ConfigEstimate(**base, tpot_ms=5.0)
    assert plain.latency_ms(512, 128) == pytest.approx(plain.ttft_ms(512) + 127 * 5.0)
    host = ConfigEstimate(**base, tpot_ms=5.0, ttft_host_ms=[50.0, 0.0, 0.0])
    assert host.ttft_ms(10) == 50.0 and host.ttft_ms(10_000) == pytest.approx(1.0 + 100.0)


def _measure(
    arch, w, v: ProfileVariant, n: int, *, step=0.2, other=1.0, ctx=512, kv_per_token=None
) -> FingerprintMeasurement:
    weights = est.fingerprint_weight_bytes(arch, w, v, n)
    cfg = Configuration(tp=v.tp, weight_quant=v.weight_quant, kv_quant=v.kv_quant, pruning=v.pruning)
    kv = n * (kv_per_token * ctx if kv_per_token else est.kv_cache_bytes_per_layer(arch, cfg, ctx))
    return FingerprintMeasurement(
        num_layers=n,
        variant=v,
        tpot_ms=n * step + other,
        decode_steps=8,
        peak_bytes=weights + kv + 600 * 2**20,
        ttft=[PromptTiming(prompt_tokens=p, ttft_ms=n * (0.5 + 0.01 * p) + 2 + 0.001 * p) for p in (128, 512, 1024)],
        weight_bytes=weights,
        kv_cache_bytes=kv,
        context_tokens=ctx,
    )


def test_kv_cache_bytes_come_from_the_engine_report():
    arch = _arch(32, 8)
    w = _weights(arch)
    v = ProfileVariant(kv_quant="int8")
    per_token = 2 * 8 * (128 + 2) + 64  # whatever the engine stores per layer and token
    ms = [_measure(arch, w, v, n, kv_per_token=per_token) for n in (1, 2)]
    [e] = est.fit_estimates(arch, w, ms, [Configuration(kv_quant="int8")], context_tokens=4096)
    lw = est.layer_weights(arch, w, "fp16", "none")
    assert e.layer_bytes == lw.per_rank(1) + per_token * 4096


def test_unmeasured_tensor_parallel_variants_come_from_the_communication_model():
    arch = _arch(32, 8, ffn=14336, vocab=128256)
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n) for n in (1, 2)]
    comm = est.CommModel(alpha_us=10.0, bus_gbps=200.0)
    configs = [Configuration(), Configuration(tp=2), Configuration(tp=4, pp=2)]
    one, two, four = est.fit_estimates(arch, w, ms, configs, context_tokens=2048, comm=comm)
    assert one.method == "fingerprint" and two.method == four.method == "fingerprint+comm"
    ar = comm.collective_ms(arch.hidden_size * 2, 2)  # one decode all-reduce on 2 ranks
    assert ar == pytest.approx((10.0 + 1.0 * 8192 / 200e3) / 1000)
    # per layer: half the device time plus two all-reduces
    L = arch.num_layers
    assert two.tpot_ms > one.tpot_ms / 2 + L * 2 * ar - 1e-9
    assert two.tpot_ms < one.tpot_ms  # still faster at this size
    # memory per rank: sharded weights and KV, the same activations and overhead, plus NCCL buffers
    assert two.gpu_overhead_bytes == one.gpu_overhead_bytes + est.NCCL_BUFFER_BYTES
    assert two.first_stage_bytes == math.ceil(arch.vocab_size / 2) * arch.hidden_size * 2
    with pytest.raises(ValueError, match="not profiled"):
        est.fit_estimates(arch, w, ms, [Configuration(tp=2)], context_tokens=2048)  # no comm model: excluded

    cmap = est.build_configuration_map(
        model="m",
        gpu_type="NVIDIA H100 80GB HBM3",
        arch=arch,
        weights=w,
        measurements=ms,
        capabilities={},
        gpu_memory_bytes=80 * 2**30,
        max_gpus=2,
        context_tokens=2048,
        cost=ProfilingCost(),
        comm=comm,
        configs=configs[:2],
    )
    assert [x.method for x in cmap.estimates] == ["fingerprint", "fingerprint+comm"]
    assert "200 GB/s" in cmap.cost.comm_model
    assert est.default_comm("NVIDIA H100 80GB HBM3").bus_gbps > est.default_comm("NVIDIA RTX A6000").bus_gbps


def test_measured_tensor_parallel_variants_are_used_as_measured():
    arch = _arch(32, 8)
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n) for n in (1, 2)] + [
        _measure(arch, w, ProfileVariant(tp=2), n, step=0.15) for n in (1, 2)
    ]
    [two] = est.fit_estimates(arch, w, ms, [Configuration(tp=2)], context_tokens=2048, comm=est.CommModel(10, 200))
    assert two.method == "fingerprint" and two.tpot_ms == pytest.approx(32 * 0.15 + 1.0)


def test_measurement_variants_fold_tp_beyond_the_profiling_gpus_into_tp1():
    arch = _arch(32, 8)
    configs = est.enumerate_configurations(arch, 8)
    assert {v.tp for v in est.measurement_variants(configs, max_tp=2)} == {1, 2}
    assert {v.tp for v in est.measurement_variants(configs)} == {1, 2, 4, 8}


def test_family_limits_exclude_with_the_family_named():
    arch = _arch(family="falcon", model_type="falcon", norm_type="layer", gated_mlp=False)
    caps = {
        "tp": [1, 2],
        "weight_quant": ["fp16", "int8"],
        "families": ["llama", "falcon"],
        "by_family": {"falcon": {"weight_quant": ["fp16"]}},
    }
    supported, excluded = est.split_supported([Configuration(), Configuration(weight_quant="int8")], caps, arch=arch)
    assert supported == [Configuration()]
    assert (
        excluded[0].reason == "the torch engine does not implement int8 weight quantization for the falcon family yet"
    )


def test_translate_map_to_another_gpu_type():
    arch = _arch(32, 8)
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n) for n in (1, 2)]
    cmap = est.build_configuration_map(
        model="m",
        gpu_type="NVIDIA H100 80GB HBM3",
        arch=arch,
        weights=w,
        measurements=ms,
        capabilities={},
        gpu_memory_bytes=80 * 2**30,
        max_gpus=1,
        context_tokens=2048,
        configs=[Configuration()],
    )
    h200 = est.translate_map(cmap, "NVIDIA H200", 141 * 2**30)
    [a], [b] = cmap.estimates, h200.estimates
    assert b.tpot_ms == pytest.approx(a.tpot_ms * 3350 / 4800)
    assert b.ttft_per_token_ms == pytest.approx(a.ttft_per_token_ms)  # same dense throughput
    assert b.total_bytes == a.total_bytes and "predicted from" in h200.device and b.method == "fingerprint+translated"
    small = est.translate_map(cmap, "NVIDIA L4", 2**30)
    assert not small.estimates and "does not fit" in small.excluded[-1].reason
    with pytest.raises(ValueError, match="no published"):
        est.translate_map(cmap, "Some Future GPU", 2**40)


def test_memory_noise_in_the_process_view_is_not_multiplied_by_the_layers():
    """NVML (or reserved) peaks carry noise the allocator's view does not, e.g. load temporaries left
    cached: 500 MiB more on the 2-layer fingerprint must not become 32 x 500 MiB."""
    arch = _arch()
    w = _weights(arch)
    ms = [_measure(arch, w, ProfileVariant(), n) for n in (1, 2)]
    ms[0].nvml_peak_bytes = ms[0].peak_bytes + 700 * 2**20
    ms[1].nvml_peak_bytes = ms[1].peak_bytes + 1200 * 2**20
    [e] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=512)
    [alloc] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=512, memory_source="allocator")
    assert e.layer_bytes == alloc.layer_bytes  # the per-layer term comes from the allocator
    assert e.total_bytes - alloc.total_bytes == 950 * 2**20  # the median of the two extras, once


def test_a_deep_run_with_the_serving_graphs_sets_how_memory_outside_the_allocator_grows_with_depth():
    """At TP=2 NCCL holds memory outside the allocator for every captured all-reduce, so a model's
    GPU memory grows per layer by more than the fingerprints' allocator slope shows. A replayed run
    at the model's depth that captured every graph the fingerprints did reads it; one that captured
    fewer (the one-process deep run captures only the protocol's prompt lengths) is left out, and a
    deep run reading less than the fingerprints' line never lowers the estimate."""
    arch = _arch()
    w = _weights(arch)
    v = ProfileVariant(tp=2)
    ms = [msgspec.structs.replace(_measure(arch, w, v, n), graphs=40) for n in (1, 2)]
    for m in ms:
        m.nvml_peak_bytes = m.peak_bytes + 2 * 2**30  # context, NCCL, workspaces

    def deep(graphs: int, extra_per_layer: int):
        d = _measure(arch, w, v, 32)
        own = est.fingerprint_weight_bytes(arch, w, v, 2) + d.kv_cache_bytes
        d = msgspec.structs.replace(d, replayed_from=2, graphs=graphs, peak_bytes=own + 600 * 2**20)
        d.nvml_peak_bytes = d.peak_bytes + 2 * 2**30 + 30 * extra_per_layer
        return d

    cfg = Configuration(tp=2)
    [plain] = est.fit_estimates(arch, w, ms, [cfg], context_tokens=512)
    [grown] = est.fit_estimates(arch, w, ms + [deep(40, 7 * 2**20)], [cfg], context_tokens=512)
    [fewer] = est.fit_estimates(arch, w, ms + [deep(3, 7 * 2**20)], [cfg], context_tokens=512)
    [lower] = est.fit_estimates(arch, w, ms + [deep(40, -(2**20))], [cfg], context_tokens=512)
    per_gpu = lambda e: e.stage_bytes(32, first=True, last=True)  # noqa: E731
    assert per_gpu(grown) - per_gpu(plain) == pytest.approx(30 * 7 * 2**20, abs=2**20)
    assert per_gpu(fewer) == per_gpu(plain) and per_gpu(lower) == per_gpu(plain)
    # a pipeline stage of half the layers carries half of the growth beyond the fingerprints'
    assert grown.stage_bytes(16, first=True, last=False) - plain.stage_bytes(
        16, first=True, last=False
    ) == pytest.approx((16 - 1.5) * 7 * 2**20 * 30 / 30.5, abs=2**20)


def test_a_device_time_above_its_wall_time_counts_as_the_wall_time():
    """Device time is part of the pass, so a device median above the wall median is noise: it is
    capped there. (Single hiccups are removed earlier, by the medians over repeats.)"""
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [simulated_measurement(arch, w, n, prompts, runs, graphs=True) for n in (1, 2)]
    capped = [msgspec.structs.replace(m) for m in ms]
    capped[1].ttft_device = [PromptTiming(prompt_tokens=128, ttft_ms=ms[1].ttft[0].ttft_ms)] + ms[1].ttft_device[1:]
    ms[1].ttft_device = [PromptTiming(prompt_tokens=128, ttft_ms=3 * ms[1].ttft[0].ttft_ms)] + ms[1].ttft_device[1:]
    [noisy] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    [at_wall] = est.fit_estimates(arch, w, capped, [Configuration()], context_tokens=2048)
    assert noisy.ttft_ms(128) == pytest.approx(at_wall.ttft_ms(128), rel=1e-9)
    # a decode step's device time likewise
    capped[0].decode_device = list(capped[0].decode)
    ms[0].decode_device = [DecodeTiming(position=d.position, step_ms=10 * d.step_ms) for d in ms[0].decode]
    [noisy] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    [at_wall] = est.fit_estimates(arch, w, capped, [Configuration()], context_tokens=2048)
    assert noisy.tpot_for(512, 32) == pytest.approx(at_wall.tpot_for(512, 32), rel=1e-9)


def test_captured_prefill_ignores_host_jitter_in_the_wall_ttft_slope():
    """A prefill captured in one graph has no per-layer host work either: jitter that makes the
    2-layer fingerprint's wall TTFT slower must not be multiplied by the layer count, while an eager
    prefill (int4's) keeps the host line as a bound."""
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [simulated_measurement(arch, w, n, prompts, runs, graphs=True) for n in (1, 2)]
    ms[1].ttft = [PromptTiming(prompt_tokens=t.prompt_tokens, ttft_ms=t.ttft_ms + 0.3) for t in ms[1].ttft]
    captured = [msgspec.structs.replace(m, decode_graphs=True, prefill_graph_tokens=2048) for m in ms]
    eager = [msgspec.structs.replace(m, decode_graphs=True, prefill_graph_tokens=0) for m in ms]
    [c] = est.fit_estimates(arch, w, captured, [Configuration()], context_tokens=2048)
    [e] = est.fit_estimates(arch, w, eager, [Configuration()], context_tokens=2048)
    assert not c.ttft_host_ms and e.ttft_host_ms
    for p in prompts:
        truth = simulate_model(32, tokens=p, position=p)[0]
        assert c.ttft_ms(p) == pytest.approx(truth, rel=0.02), p
        assert e.ttft_ms(p) > c.ttft_ms(p) + 5.0  # 0.3 ms of jitter, times 31 layers


def test_a_deep_run_sets_both_latencies_by_the_wall_lines():
    """With a replayed deep run (its decode runs only, shortened), TTFT and TPOT are the wall lines
    through all three depths: the deep run carries what a pass costs at the model's depth, host gaps
    included, which the device line through the pair misses."""
    arch = _arch()
    w = _weights(arch)
    prompts, runs = [128, 512, 1024], [(1024, 8), (512, 32)]
    ms = [
        msgspec.structs.replace(simulated_measurement(arch, w, n, prompts, runs, graphs=True), decode_graphs=True)
        for n in (1, 2)
    ]

    def model_step(x):  # the model's steps pay 0.1 ms more host gap than the fingerprints' (seen on an H100)
        return simulate_model(32, tokens=1, position=x, graphs=True)[0] + 0.1

    deep_decode = [DecodeTiming(position=x, step_ms=model_step(x)) for p, o in runs for x in range(p, p + 8)]
    deep = FingerprintMeasurement(
        num_layers=32,
        variant=ProfileVariant(),
        tpot_ms=float(np.median([d.step_ms for d in deep_decode])),
        ttft=[PromptTiming(prompt_tokens=p, ttft_ms=simulate_model(32, tokens=p, position=p)[0]) for p in prompts],
        decode_steps=len(deep_decode),
        decode=deep_decode,
        peak_bytes=0,
        replayed_from=2,
        decode_graphs=True,
    )
    [with_deep] = est.fit_estimates(arch, w, ms + [deep], [Configuration()], context_tokens=2048)
    [pair] = est.fit_estimates(arch, w, ms, [Configuration()], context_tokens=2048)
    assert not with_deep.tpot_host_ms and not with_deep.ttft_host_ms  # one line each, the wall's
    for p, o in runs:
        truth = np.mean([model_step(x) for x in range(p, p + o - 1)])
        assert with_deep.tpot_for(p, o) == pytest.approx(truth, rel=0.01), (p, o)
        assert pair.tpot_for(p, o) < truth * 0.99
    for p in prompts:
        assert with_deep.ttft_ms(p) == pytest.approx(simulate_model(32, tokens=p, position=p)[0], rel=0.02), p


@pytest.mark.parametrize("host_over_device, tp2_at_most, tp2_at_least", [(1.1, 0.75, 0.0), (3.0, 1.0, 0.8)])
def test_a_derived_tp_variant_keeps_the_host_work_not_tp1s_device_work(host_over_device, tp2_at_most, tp2_at_least):
    """The H100 maps had every TP degree of Llama-2-7B at TP=1's TPOT: the TP=1 wall line, which is
    mostly device work when device-bound, was kept as each derived variant's host floor. Device-bound
    (wall 1.1x device), TP=2 must be much faster; launch-bound (wall 3x device), it must stay near TP=1."""
    arch = _arch(32, 32)
    w = _weights(arch)
    fit = est.fit_variant(arch, w, [_measure(arch, w, ProfileVariant(), n) for n in (1, 2)])
    k = host_over_device
    walled = dataclasses.replace(
        fit,
        tpot_host_layer=(fit.tpot_layer_ms * k, fit.tpot_layer_per_position_ms * k),
        tpot_host_other=(fit.tpot_other_ms * k, fit.tpot_other_per_position_ms * k),
        ttft_host_layer=tuple(c * k for c in fit.ttft_layer),
        ttft_host_other=tuple(c * k for c in fit.ttft_other),
    )
    comm = est.CommModel(alpha_us=10.0, bus_gbps=200.0)
    two = est.derive_tp_fit(arch, walled, 2, comm)
    one_e = est.estimate_config(arch, w, walled, Configuration(), context_tokens=2048)
    two_e = est.estimate_config(arch, w, two, Configuration(tp=2), context_tokens=2048)
    ratio = two_e.tpot_for(512, 128) / one_e.tpot_for(512, 128)
    assert tp2_at_least <= ratio <= tp2_at_most, ratio
    assert two_e.ttft_ms(512) <= one_e.ttft_ms(512)
