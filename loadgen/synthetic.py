"""Synthetic configuration maps for tests and CPU sweeps: the real estimator fed with fingerprint
measurements from a roofline model of a GPU (docs/simulator.md#synthetic-maps). They exercise the
system; they are not measurements."""

from __future__ import annotations

import math
from dataclasses import dataclass

from iserve.checkpoint import layer_tensor_shapes, other_tensor_shapes
from iserve.deployer.units import GIB
from iserve.fingerprint import estimator as est_mod
from iserve.messages import (
    ArchSpec,
    Configuration,
    ConfigurationMap,
    FingerprintMeasurement,
    ProfilingCost,
    PromptTiming,
    WeightBreakdown,
)


@dataclass(frozen=True)
class GpuSpec:
    """A GPU for the synthetic roofline: memory, HBM and tensor-core throughput, and the link used
    by tensor-parallel all-reduces (per-step latency and bandwidth)."""

    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    flops: float  # dense fp16 tensor FLOP/s
    link_latency_s: float
    link_bytes_per_s: float
    mem_efficiency: float = 0.8
    compute_efficiency: float = 0.5


GPU_SPECS = {
    # RTX A6000: 768 GB/s GDDR6, ~155 TFLOP/s fp16 tensor; the testbed's 8-way rings cross PCIe 4.0
    "A6000": GpuSpec("A6000", 48 * GIB, 768e9, 155e12, 15e-6, 20e9),
    "H100": GpuSpec("H100", 80 * GIB, 3.0e12, 990e12, 8e-6, 150e9),
}

# Llama tensor layout with each model's sizes; an FFN of two matrices (Falcon, GPT-J) of width ``4h``
# becomes the Llama-layout width ``8h/3`` with the same parameter count.
SYNTHETIC_MODELS: dict[str, dict[str, int]] = {
    "llama-2-7b": dict(hidden=4096, ffn=11008, layers=32, heads=32, kv=32, vocab=32000),
    "llama-2-13b": dict(hidden=5120, ffn=13824, layers=40, heads=40, kv=40, vocab=32000),
    "llama-2-70b": dict(hidden=8192, ffn=28672, layers=80, heads=64, kv=8, vocab=32000),
    "falcon-7b": dict(hidden=4544, ffn=12117, layers=32, heads=71, kv=1, vocab=65024, head_dim=64),
    "falcon-40b": dict(hidden=8192, ffn=21845, layers=60, heads=128, kv=8, vocab=65024, head_dim=64),
    "gpt-j-6b": dict(hidden=4096, ffn=10923, layers=28, heads=16, kv=16, vocab=50400),
    "tiny": dict(hidden=1024, ffn=2816, layers=8, heads=16, kv=16, vocab=32000),
}

_PROFILE_PROMPTS = (128, 512, 1024)
_PROFILE_CONTEXT = 512
_ACT_LAYER_BYTES = 8 * 2**20
_OVERHEAD_BYTES = 1536 * 2**20  # CUDA context, allocator slack, workspace
_DEQUANT_MS = {"fp16": 0.0, "int8": 0.004, "int4": 0.010}  # per layer per step
_PREFILL_QUANT = {"fp16": 1.0, "int8": 1.05, "int4": 1.15}


def synthetic_arch(name: str) -> tuple[ArchSpec, WeightBreakdown]:
    """The architecture and exact weight breakdown of a synthetic model (see ``SYNTHETIC_MODELS``)."""
    try:
        s = SYNTHETIC_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown synthetic model {name!r}; choose one of {', '.join(SYNTHETIC_MODELS)}") from None
    arch = ArchSpec(
        family="llama",
        model_type="llama",
        num_layers=s["layers"],
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_attention_heads=s["heads"],
        num_kv_heads=s["kv"],
        head_dim=s.get("head_dim", s["hidden"] // s["heads"]),
        vocab_size=s["vocab"],
        max_position=4096,
    )
    layer, other = layer_tensor_shapes(arch), other_tensor_shapes(arch)
    w = WeightBreakdown(
        embed_params=math.prod(other["model.embed_tokens.weight"]),
        head_params=math.prod(other["lm_head.weight"]) if "lm_head.weight" in other else 0,
        final_norm_params=arch.hidden_size,
        layer_linear_params=sum(math.prod(v) for v in layer.values() if len(v) == 2),
        layer_other_params=sum(math.prod(v) for v in layer.values() if len(v) != 2),
        checkpoint_bytes=0,
    )
    return arch, w


def _allreduce_s(gpu: GpuSpec, tp: int, nbytes: float) -> float:
    """One ring all-reduce over ``tp`` GPUs: ``2 (tp - 1)`` steps, each a link latency plus a
    ``1 / tp`` chunk of the bytes."""
    if tp <= 1:
        return 0.0
    steps = 2 * (tp - 1)
    return steps * (gpu.link_latency_s + nbytes / tp / gpu.link_bytes_per_s)


def _measurement(arch: ArchSpec, w: WeightBreakdown, v, n: int, gpu: GpuSpec) -> FingerprintMeasurement:
    """The roofline timings and memory of an ``n``-layer fingerprint of variant ``v``."""
    cfg = Configuration(tp=v.tp, weight_quant=v.weight_quant, kv_quant=v.kv_quant, pruning=v.pruning)
    pruned = est_mod.pruned_arch(arch, v.pruning)
    tp, h = v.tp, arch.hidden_size
    hbm = gpu.hbm_bytes_per_s * gpu.mem_efficiency
    flops = gpu.flops * gpu.compute_efficiency
    lw = est_mod.layer_weights(arch, w, v.weight_quant, v.pruning).per_rank(tp)
    params = sum(math.prod(s) for s in layer_tensor_shapes(pruned).values() if len(s) == 2) / tp
    if v.pruning == "2:4":
        params /= 2  # sparse tensor cores skip the pruned half
    kv_read = est_mod.kv_cache_bytes_per_layer(arch, cfg, _PROFILE_CONTEXT)
    heads_rank = pruned.num_attention_heads / tp
    # decode: weights and KV read once per token, kernel launches, dequantization, 2 all-reduces
    layer_tpot = (lw + kv_read) / hbm + 25e-6 + _DEQUANT_MS[v.weight_quant] / 1000 + 2 * _allreduce_s(gpu, tp, 2 * h)
    head_bytes = (w.head_params or w.embed_params) * 2 / tp
    other_tpot = head_bytes / hbm + 0.5e-3
    ttft = []
    for p in _PROFILE_PROMPTS:
        compute = (2 * params * p + 4 * p * p * heads_rank * arch.head_dim) / flops * _PREFILL_QUANT[v.weight_quant]
        layer = max(compute, lw / hbm) + 25e-6 + 2 * _allreduce_s(gpu, tp, 2 * h * p)
        other = head_bytes / hbm + 2 * p * h * 2 / hbm + 2e-3
        ttft.append(PromptTiming(prompt_tokens=p, ttft_ms=(n * layer + other) * 1000))
    weights = est_mod.fingerprint_weight_bytes(arch, w, v, n)
    kv = n * est_mod.kv_cache_bytes_per_layer(arch, cfg, _PROFILE_CONTEXT)
    return FingerprintMeasurement(
        num_layers=n,
        variant=v,
        ttft=ttft,
        tpot_ms=(n * layer_tpot + other_tpot) * 1000,
        decode_steps=32,
        peak_bytes=weights + kv + n * _ACT_LAYER_BYTES + _OVERHEAD_BYTES,
        weight_bytes=weights,
        kv_cache_bytes=kv,
        timer="synthetic",
    )


def synthetic_map(
    model: str, *, gpu_type: str = "A6000", max_gpus: int = 8, context_tokens: int = 2048, name: str | None = None
) -> ConfigurationMap:
    """A configuration map of a synthetic model on a synthetic GPU (docs/simulator.md#synthetic-maps),
    built by the real estimator from roofline fingerprint measurements."""
    gpu = GPU_SPECS.get(gpu_type)
    if gpu is None:
        raise ValueError(f"no synthetic GPU {gpu_type!r}; choose one of {', '.join(GPU_SPECS)}")
    arch, w = synthetic_arch(model)
    configs = est_mod.enumerate_configurations(arch, max_gpus)
    supported, _ = est_mod.split_supported(configs, {}, arch=arch)
    ms = [_measurement(arch, w, v, n, gpu) for v in est_mod.measurement_variants(supported) for n in (1, 2)]
    return est_mod.build_configuration_map(
        model=name or model,
        gpu_type=gpu.name,
        arch=arch,
        weights=w,
        measurements=ms,
        capabilities={},
        gpu_memory_bytes=gpu.memory_bytes,
        max_gpus=max_gpus,
        context_tokens=context_tokens,
        configs=configs,
        cost=ProfilingCost(),
        device="synthetic",
    )
