"""The Estimator of the Fingerprint Controller: from fingerprint measurements to a configuration map.

Pure functions, no I/O: the live fingerprint service, ``iserve validate``, the benchmark and the trace
simulator run the same code. docs/fingerprint.md explains the method and its validation.

The paper (section 5) profiles an LLM's 1- and 2-hidden-layer *fingerprints* at PP=1 and extrapolates
linearly in the number of hidden layers. We implement its L2 latency method and its M2 memory method,
with the weights computed exactly instead of extrapolated, and two refinements that the paper's
linear form needs to hold on a real engine: host and device time are extrapolated separately, and a
decode step's cost depends on the position it feeds.

Configurations (:func:`enumerate_configurations`)
    TP: powers of two dividing both ``num_attention_heads`` and ``num_kv_heads``; PP: 1 up to
    ``min(max_gpus, num_layers)`` (every integer, not only powers of two) with ``TP * PP <= max_gpus``;
    weight quantization {fp16, int8, int4}; KV-cache quantization {fp16, int8}; pruning
    {none, 2:4, structured}. A *variant* is a configuration less its PP degree: the fingerprints are
    profiled once per variant, at PP=1 (:func:`measurement_variants`).

Latency (paper L2, equations 2 and 3, per variant)
    Each measurement gives, per prompt length ``p``, the host wall TTFT (what a request pays) and,
    on a GPU, the device's own time for the same prefill (the engine's launches queued ahead, see
    ``iserve.gpu_agent.engine.profile``); and per decode position the wall and device time of the
    step. Each of the two is fitted by least squares over every fingerprint, prompt length and
    position:

    * TTFT: ``T(n, p) = n * (l0 + l1 p + l2 p^2) + (o0 + o1 p + o2 p^2)`` with ``n`` the
      fingerprint's hidden layers (quadratic terms only with 3+ prompt lengths on every fingerprint,
      at least 2 required);
    * decode step feeding position ``x``: ``S(n, x) = n * (a_l + b_l x) + (a_o + b_o x)``
      (a step reads every key before it; with steps at one position only, ``b = 0``).

    Every coefficient is a cost and is fitted non-negative (:func:`nnls`): exact where the
    unconstrained fit already is, and immune to a noisy negative slope. A replayed deep run of the
    2-layer fingerprint (``FingerprintMeasurement.replayed_from``; ``n`` = its depth) is one more
    point of these fits, and with one the wall lines are the estimate (its passes are measured at
    the model's depth); memory is fitted from the loaded fingerprints only.

    A full model of ``L`` layers then costs ``max(device(L) + slack, host(L))`` per pass, where
    ``host`` is the wall-time extrapolation and ``slack`` the smallest wall-minus-device gap seen (the
    host work before the first kernel and after the last, which a device-bound pass still pays).
    Why the larger: a pass is a pipeline from the host's launches to the device's kernels, and the
    slower side bounds it. A 1-2 layer fingerprint can be host-bound where the full model is
    device-bound; extrapolating wall time alone then predicts the host's per-layer launch cost and
    underestimates the model (docs/fingerprint.md, with the 3.6 ms vs 12.4 ms story of
    docs/results/2026-11-21-h100-issue2-llama-2-7b.txt). Where no device time was measured (CPU), ``device = host`` and ``slack = 0``,
    i.e. plain L2. A pass captured in one CUDA graph (decode steps; prefills up to
    ``prefill_graph_tokens``) has no per-layer host work, so it has no host bound. The estimate keeps both bounds (``ConfigEstimate.ttft_host_ms`` and
    ``tpot_host_ms``) so TTFT stays a function of the prompt length and TPOT of the positions.
    PP>1 reuses the PP=1 latency unchanged: with batch 1 the paper measures the pipeline hand-off at
    under 0.05% of the latency, so nothing is added for it.

Tensor parallelism without TP fingerprints (:func:`derive_tp_fit`, method "fingerprint+comm")
    When a TP>1 variant could not be measured (fewer GPUs than TP on the profiling host) but its
    TP=1 twin was, its device time is modeled: every device term is split evenly over the ``t`` ranks
    (the engine shards heads, FFN channels and the vocabulary), and each layer adds two all-reduces
    of the hidden states (``tokens * hidden * 2`` bytes: after attention and after the MLP), the
    pass adds one for the vocab-parallel embedding, an all-gather of the fp32 logits of the last
    position and a broadcast of the chosen token. One collective of ``m`` bytes costs
    ``alpha + 2 (t-1)/t * m / beta`` (NCCL's bus-bandwidth convention), with ``alpha`` and ``beta``
    measured by the profiler when it had several GPUs (``ProfileResult.allreduce_*``), else the
    defaults of :data:`COMM_DEFAULTS` for the GPU type. The host bound is the TP=1 one (every rank
    launches its whole pass). Memory per rank: exact sharded weights and KV cache, the TP=1
    activation and overhead terms, plus :data:`NCCL_BUFFER_BYTES`. ``iserve validate`` on a
    multi-GPU host checks this model.

Memory (paper M2, with exact weights)
    * Weights are exact, from the :class:`~iserve.messages.WeightBreakdown` and per-tensor shapes, in
      the *serving* element size of 2 bytes (fp16/bf16), whatever dtype the checkpoint stores.
    * Only the 2-D layer weights (the "linear" tensors: projections, experts, MoE router) are
      quantized or 2:4-pruned; embeddings, norms, biases and the LM head stay 16-bit.
      int8: 1 byte per element plus one 16-bit scale per output row. int4: half a byte per element
      of the row padded to a multiple of 128 columns, plus a 16-bit scale and zero point per group
      of 128 columns of each row (the engine's tinygemm layout).
    * 2:4 pruning in 16 bits keeps 2 of every 4 values plus a 2-bit position per kept value, i.e.
      ``numel/2`` stored values and ``numel/8`` metadata bytes (``torch.sparse.to_sparse_semi_structured``:
      56.25% of dense). Combined with int8/int4 the engine quantizes the pruned dense matrix (the
      zeros are stored; there is no quantized 2:4 kernel), so the bytes are those of the dense
      quantized matrix.
    * Structured pruning removes 25% of the FFN channels (``f - f // 4`` kept, per expert for MoE) and
      25% of the attention heads by whole KV groups (``kv - kv // 4`` KV heads kept, each with its
      query heads); with fewer than 4 KV heads it removes 25% of the query heads of each group
      instead (``g - g // 4`` of the ``g`` query heads per KV head kept). The pruned shapes give the
      exact weights and the smaller KV cache. A TP degree that does not divide the kept heads cannot
      run: :func:`split_supported` (given the architecture) excludes it with that reason.
    * Tensor parallelism: a layer's linear weights are split evenly over the TP ranks (the few scale
      bytes that row-parallel layers would duplicate are ignored), its norms and biases are replicated;
      the embedding and the LM head are vocab-parallel (``ceil(vocab / TP)`` rows per rank); the final
      norm is replicated.
    * Stages: the first PP stage holds the embedding, the last the final norm and the LM head. With a
      tied LM head and PP=1 the head is the embedding (nothing added); with PP>1 the last stage holds
      its own copy of the embedding matrix for the head, counted in ``last_stage_bytes``.
    * KV cache, exact: the bytes per layer and token the engine reported for the fingerprint (its
      KV cache divided by its layers and context), times the context. Without that report, the
      formula ``2 * kv_heads * context * (head_dim * kv_bytes + scale_bytes) / TP`` (fp16: 2 bytes,
      no scale; int8: 1 byte plus a 16-bit scale per head and position).
    * Everything else comes from the fingerprints: for each measurement, ``peak - weights - kv_cache``
      (the fingerprint's exact weights as above, the KV-cache bytes the engine reports holding) is
      the non-weight, non-KV memory. Its per-layer term (activations that grow with depth) is the
      least-squares slope over the fingerprints' layer counts of the torch allocator's view (exact
      and repeatable); its "other" term, one GPU's runtime (CUDA context where the peak includes
      it), allocator cache and activation workspace, is the median over the fingerprints of what
      the chosen peak leaves after weights, KV cache and the per-layer term. Both are clamped at 0
      (noise cannot make memory negative). (A line through NVML peaks alone multiplied their
      noise, e.g. load temporaries left cached, by the layer count: +84-203% for int4 on the
      first H100 run.) Because the same exact weight
      formula is subtracted from the fingerprints and added for the full model, an engine that
      stores a layer slightly differently than the formula says still extrapolates correctly: the
      difference lands in the per-layer term.
    * Peak: ``memory_source="max"`` (default) takes the larger of the allocator peak and the NVML
      process peak of each measurement (NVML sees the CUDA context and the allocator's reserve, which
      a deployment needs too); "allocator" and "nvml" take one of them. A measurement of a TP>1
      variant reports one rank's peak (the largest).
    * Per GPU of a stage with ``n`` layers: ``gpu_overhead + n * layer_bytes (+ first) (+ last)``, as in
      :class:`~iserve.messages.ConfigEstimate`; activations are not split by TP (each rank holds
      them, the paper's ``(N_TP - 1) * A``) and every stage pays the overhead (the paper's
      ``N_PP * A_p``). ``total_bytes`` sums all ``TP * PP`` GPUs; it does not depend on how the
      layers are split, so it holds for the even split and for any other.

Other GPU types (:func:`translate_map`, the brief's item 6)
    A map measured on one GPU type can be predicted for another from their published peak memory
    bandwidth and dense 16-bit tensor throughput (:data:`GPU_SPECS`): device-time terms that do not
    grow with the prompt (decode steps, TTFT base) scale with the bandwidth ratio, TTFT's per-token
    terms with the compute ratio, host bounds stay; memory is unchanged. Marked "predicted" in the
    map's ``device`` so nobody mistakes it for a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import msgspec
import numpy as np

from iserve.checkpoint import layer_tensor_shapes
from iserve.messages import (
    ArchSpec,
    ConfigEstimate,
    Configuration,
    ConfigurationMap,
    ExcludedConfig,
    FingerprintMeasurement,
    ProfileVariant,
    ProfilingCost,
    WeightBreakdown,
)

WEIGHT_QUANTS: tuple[str, ...] = ("fp16", "int8", "int4")
KV_QUANTS: tuple[str, ...] = ("fp16", "int8")
PRUNINGS: tuple[str, ...] = ("none", "2:4", "structured")

SERVE_BYTES = 2  # fp16/bf16: the element size of every unquantized tensor when served
KV_BYTES = {"fp16": 2, "int8": 1}
KV_SCALE_BYTES = {"fp16": 0, "int8": 2}  # per head and position (and K/V)
INT4_GROUP = 128  # input elements per int4 scale/zero group
NCCL_BUFFER_BYTES = 256 * 2**20  # per rank of a modeled TP variant: NCCL's communicator buffers

MemorySource = Literal["max", "allocator", "nvml"]


@dataclass(frozen=True)
class CommModel:
    """Cost of one collective of ``m`` bytes over ``t`` ranks: ``alpha_us + 2 (t-1)/t * m / beta``."""

    alpha_us: float
    bus_gbps: float
    source: str = "default"  # "measured" or "default"

    def collective_ms(self, nbytes: float, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        return (self.alpha_us + 2.0 * (ranks - 1) / ranks * nbytes / (self.bus_gbps * 1e3)) / 1000.0

    def describe(self) -> str:
        return f"collective = {self.alpha_us:.1f} us + 2(t-1)/t * bytes / {self.bus_gbps:.0f} GB/s ({self.source})"


# Intra-host collective defaults by GPU family: NVLink parts vs PCIe (small messages: NCCL latency).
COMM_DEFAULTS: dict[str, CommModel] = {
    "nvlink": CommModel(alpha_us=12.0, bus_gbps=300.0),
    "pcie": CommModel(alpha_us=20.0, bus_gbps=20.0),
}


def default_comm(gpu_type: str) -> CommModel:
    """The default :class:`CommModel` for a GPU type (NVLink for SXM-class H100/H200/A100/B200)."""
    t = gpu_type.upper()
    nvlink = any(k in t for k in ("H100", "H200", "A100", "B200", "GH200")) and "PCIE" not in t
    return COMM_DEFAULTS["nvlink" if nvlink else "pcie"]


# Peak HBM bandwidth (GB/s) and dense 16-bit tensor throughput (TFLOP/s) by product name fragment.
GPU_SPECS: dict[str, tuple[float, float]] = {
    "H200": (4800.0, 989.0),
    "H100 80GB HBM3": (3350.0, 989.0),
    "H100 PCIE": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100 80GB PCIE": (1935.0, 312.0),
    "A100": (1555.0, 312.0),
    "L40S": (864.0, 362.0),
    "A6000": (768.0, 155.0),
    "L4": (300.0, 121.0),
}

_KNOB_WORDS = {
    "weight_quant": "{} weight quantization",
    "kv_quant": "{} KV-cache quantization",
    "pruning": {"2:4": "2:4 sparsity pruning", "structured": "structured pruning"},
    "tp": "tensor parallelism of degree {}",
    "pp": "pipeline parallelism of degree {}",
}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# configurations


def enumerate_configurations(arch: ArchSpec, max_gpus: int) -> list[Configuration]:
    """Every configuration of ``arch`` on up to ``max_gpus`` GPUs, in a stable order (TP, PP, weight
    quantization, KV quantization, pruning)."""
    if max_gpus < 1:
        raise ValueError(f"max_gpus must be at least 1, not {max_gpus}.")
    tps = []
    tp = 1
    while tp <= max_gpus:
        if arch.num_attention_heads % tp == 0 and arch.num_kv_heads % tp == 0:
            tps.append(tp)
        tp *= 2
    out = []
    for tp in tps:
        for pp in range(1, min(max_gpus, arch.num_layers) + 1):
            if tp * pp > max_gpus:
                break
            for wq in WEIGHT_QUANTS:
                for kv in KV_QUANTS:
                    for pruning in PRUNINGS:
                        out.append(Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pruning))
    return out


def variant_of(config: Configuration) -> ProfileVariant:
    """The profiling variant that gives ``config`` its measurements: the configuration less PP."""
    return ProfileVariant(weight_quant=config.weight_quant, kv_quant=config.kv_quant, pruning=config.pruning, tp=config.tp)


def variant_key(v: ProfileVariant) -> str:
    return f"tp{v.tp}-w{v.weight_quant}-kv{v.kv_quant}-p{v.pruning.replace(':', '')}"


def measurement_variants(configs: Iterable[Configuration], *, max_tp: int | None = None) -> list[ProfileVariant]:
    """The distinct variants to profile for ``configs``, in first-seen order. Fingerprints always run
    at PP=1 (the paper reuses PP=1 latency for every PP, and memory per stage follows from layers).
    Pass the supported configurations (:func:`split_supported`) so nothing is profiled in vain.
    With ``max_tp``, a TP variant above it is replaced by its TP=1 twin (its estimate then comes from
    the communication model, :func:`derive_tp_fit`)."""
    seen: dict[ProfileVariant, None] = {}
    for c in configs:
        v = variant_of(c)
        if max_tp is not None and v.tp > max_tp:
            v = replace_variant(v, tp=1)
        seen.setdefault(v, None)
    return list(seen)


def replay_depth(arch: ArchSpec, setting: int) -> int:
    """The depth the 2-layer fingerprint is replayed to when profiling (``ProfileJob.replay_depth``):
    ``setting`` -1 means the model's layer count, 0 none; a depth of 2 or less adds nothing."""
    if setting < -1:
        raise ValueError(f"replay depth must be -1 (the model's layers), 0 (none) or a layer count, not {setting}")
    depth = arch.num_layers if setting == -1 else setting
    return depth if depth > 2 else 0


def replace_variant(v: ProfileVariant, **changes: Any) -> ProfileVariant:
    return msgspec.structs.replace(v, **changes)


def _join_or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def split_supported(
    configs: Iterable[Configuration],
    capabilities: dict[str, Any],
    *,
    arch: ArchSpec | None = None,
) -> tuple[list[Configuration], list[ExcludedConfig]]:
    """Split ``configs`` into those the engine can run and the rest, each with its reason.

    ``capabilities`` is the engine's ``CAPABILITIES`` dict: lists under ``tp``, ``pp``,
    ``weight_quant``, ``kv_quant``, ``pruning`` and ``families``; a key that is absent puts no limit
    on its knob. ``capabilities["by_family"][family]`` may narrow the lists for one architecture
    family (e.g. fp16 only for a family whose layers lack quantized kernels).
    ``capabilities["engine"]`` names the engine in the reasons (default "torch").
    With ``arch``, its family is checked against ``families`` and structured-pruning configurations
    whose TP degree does not divide the pruned head counts are excluded too.
    """
    engine = str(capabilities.get("engine", "torch"))
    supported: list[Configuration] = []
    excluded: list[ExcludedConfig] = []
    families = capabilities.get("families")
    family_ok = arch is None or families is None or arch.family in families
    limits = dict(capabilities)
    if arch is not None:
        limits.update((capabilities.get("by_family") or {}).get(arch.family, {}))
    for c in configs:
        missing: list[str] = []
        if not family_ok:
            missing.append(f"the {arch.family} architecture family")
        for knob in ("tp", "pp", "weight_quant", "kv_quant", "pruning"):
            allowed = limits.get(knob)
            value = getattr(c, knob)
            if allowed is None or value in allowed:
                continue
            words = _KNOB_WORDS[knob]
            missing.append(words[value] if isinstance(words, dict) else words.format(value))
        if missing:
            fam = f" for the {arch.family} family" if arch is not None and family_ok and arch.family in (capabilities.get("by_family") or {}) else ""
            excluded.append(ExcludedConfig(config=c, reason=f"the {engine} engine does not implement {_join_or(missing)}{fam} yet"))
            continue
        problem = arch_problem(arch, c) if arch is not None else None
        if problem:
            excluded.append(ExcludedConfig(config=c, reason=problem))
            continue
        supported.append(c)
    return supported, excluded


def arch_problem(arch: ArchSpec, config: Configuration) -> str | None:
    """Why ``arch`` cannot take ``config`` at all (whatever the engine), or None."""
    if config.tp < 1 or config.pp < 1:
        return f"TP and PP must be at least 1 (got TP={config.tp}, PP={config.pp})"
    if config.pp > arch.num_layers:
        return f"PP={config.pp} exceeds the model's {arch.num_layers} hidden layers"
    shaped = pruned_arch(arch, config.pruning)
    for what, count in (("attention heads", shaped.num_attention_heads), ("KV heads", shaped.num_kv_heads)):
        if count % config.tp:
            pruned = f" after {config.pruning} pruning" if config.pruning == "structured" else ""
            return f"TP={config.tp} does not divide the model's {count} {what}{pruned}"
    return None


# ---------------------------------------------------------------------------------------------------
# exact weights and KV cache


def pruned_arch(arch: ArchSpec, pruning: str) -> ArchSpec:
    """The shapes a layer has after ``pruning`` ("structured" shrinks heads and FFN channels; 2:4 and
    none keep the dense shapes). See the module docstring for the rule."""
    if pruning != "structured":
        return arch
    kv = arch.num_kv_heads
    group = arch.num_attention_heads // kv
    if kv >= 4:
        kept_kv, kept_group = kv - kv // 4, group
    else:
        kept_kv, kept_group = kv, group - group // 4
    f = arch.intermediate_size
    return msgspec.structs.replace(
        arch,
        num_kv_heads=kept_kv,
        num_attention_heads=kept_kv * kept_group,
        intermediate_size=f - f // 4,
    )


def linear_weight_bytes(rows: int, cols: int, weight_quant: str, pruning: str = "none") -> int:
    """Bytes of one ``rows x cols`` linear weight (``rows`` output features) as the engine stores it.

    fp16: 2 bytes per value (2:4: half the values plus ``numel / 8`` metadata bytes). int8: 1 byte per
    value plus a 16-bit scale per row. int4: half a byte per value of the row padded to a multiple of
    128 columns, plus a 16-bit scale and zero per group of 128 columns of each row. Quantized 2:4
    weights are stored dense (the pruned zeros included).
    """
    numel = rows * cols
    if weight_quant == "fp16":
        if pruning == "2:4":
            return _ceil_div(numel, 2) * SERVE_BYTES + _ceil_div(numel, 8)
        return numel * SERVE_BYTES
    if weight_quant == "int8":
        return numel + rows * SERVE_BYTES
    if weight_quant == "int4":
        groups = _ceil_div(cols, INT4_GROUP)
        return rows * groups * INT4_GROUP // 2 + rows * groups * 2 * SERVE_BYTES
    raise ValueError(f"unknown weight quantization {weight_quant!r}; expected one of {', '.join(WEIGHT_QUANTS)}.")


@dataclass(frozen=True)
class LayerWeights:
    """One hidden layer's served weight bytes (all TP ranks together)."""

    linear_bytes: int  # the 2-D projections, quantized/pruned per the configuration
    other_bytes: int  # norms and biases, 16-bit, replicated on every TP rank

    def per_rank(self, tp: int) -> int:
        return _ceil_div(self.linear_bytes, tp) + self.other_bytes


def layer_weights(arch: ArchSpec, weights: WeightBreakdown, weight_quant: str, pruning: str) -> LayerWeights:
    """Exact served bytes of one hidden layer. Raises ValueError if ``weights`` does not describe
    ``arch`` (the per-tensor shapes must add up to the breakdown's element counts)."""
    dense = layer_tensor_shapes(arch)
    lin = sum(math.prod(s) for s in dense.values() if len(s) == 2)
    other = sum(math.prod(s) for s in dense.values() if len(s) != 2)
    if (lin, other) != (weights.layer_linear_params, weights.layer_other_params):
        raise ValueError(
            f"the weight breakdown ({weights.layer_linear_params} linear + {weights.layer_other_params} other elements per layer) "
            f"does not match the architecture ({lin} + {other}); rescan the checkpoint."
        )
    shapes = layer_tensor_shapes(pruned_arch(arch, pruning))
    linear_bytes = sum(
        linear_weight_bytes(s[0], s[1], weight_quant, "2:4" if pruning == "2:4" else "none") for s in shapes.values() if len(s) == 2
    )
    other_bytes = sum(math.prod(s) for s in shapes.values() if len(s) != 2) * SERVE_BYTES
    return LayerWeights(linear_bytes=linear_bytes, other_bytes=other_bytes)


def _vocab_rows(arch: ArchSpec | None, weights: WeightBreakdown, params: int, tp: int) -> int:
    """Elements of a ``[vocab, hidden]`` matrix on one rank (``ceil(vocab / tp)`` rows)."""
    if arch is None or tp == 1:
        return _ceil_div(params, tp)
    return _ceil_div(arch.vocab_size, tp) * arch.hidden_size


def first_stage_weight_bytes(weights: WeightBreakdown, tp: int, arch: ArchSpec | None = None) -> int:
    """The embedding on one rank of the first stage (vocab-parallel over TP)."""
    return _vocab_rows(arch, weights, weights.embed_params, tp) * SERVE_BYTES


def last_stage_weight_bytes(arch: ArchSpec, weights: WeightBreakdown, tp: int, pp: int) -> int:
    """Final norm (replicated) and LM head (vocab-parallel over TP) on one rank of the last stage.
    A tied head is the embedding: free at PP=1, a copy of it at PP>1."""
    head = weights.head_params
    if arch.tie_embeddings or head == 0:
        head_bytes = _vocab_rows(arch, weights, weights.embed_params, tp) * SERVE_BYTES if pp > 1 else 0
        bias = 0
    else:
        bias = head - weights.embed_params if arch.lm_head_bias else 0
        head_bytes = (_vocab_rows(arch, weights, head - bias, tp) + _ceil_div(bias, tp)) * SERVE_BYTES
    return weights.final_norm_params * SERVE_BYTES + head_bytes


def kv_cache_bytes_per_layer(arch: ArchSpec, config: Configuration, context_tokens: int) -> int:
    """One layer's KV cache on one TP rank for ``context_tokens`` tokens, by formula:
    ``2 * kv_heads * context * (head_dim * kv_bytes + scale_bytes) / TP``."""
    kv_heads = pruned_arch(arch, config.pruning).num_kv_heads
    per_token = 2 * kv_heads * (arch.head_dim * KV_BYTES[config.kv_quant] + KV_SCALE_BYTES[config.kv_quant])
    return _ceil_div(per_token * context_tokens, config.tp)


def fingerprint_weight_bytes(arch: ArchSpec, weights: WeightBreakdown, variant: ProfileVariant, num_layers: int) -> int:
    """Exact weights on one rank of a ``num_layers``-layer fingerprint run at PP=1 as ``variant``."""
    lw = layer_weights(arch, weights, variant.weight_quant, variant.pruning)
    return (
        num_layers * lw.per_rank(variant.tp)
        + first_stage_weight_bytes(weights, variant.tp, arch)
        + last_stage_weight_bytes(arch, weights, variant.tp, 1)
    )


# ---------------------------------------------------------------------------------------------------
# fitting one variant's measurements


Poly = tuple[float, float, float]  # c0 + c1 p + c2 p^2
Line = tuple[float, float]  # a + b x


@dataclass(frozen=True)
class VariantFit:
    """Per-layer and "other" terms of one variant, fitted from its fingerprints (paper L2, M2).

    Device terms (``ttft_layer``, ``ttft_other``, ``tpot_*``) include the slack in their "other"
    part; host terms are ``None`` when no device time was measured (then the device terms are the
    wall-time fit and there is one bound only).
    """

    variant: ProfileVariant
    ttft_layer: Poly  # device: base ms, ms per prompt token, ms per prompt token squared
    ttft_other: Poly
    tpot_layer_ms: float  # device step: per layer, at position 0
    tpot_other_ms: float
    activation_layer_bytes: int  # non-weight, non-KV memory that grows per layer (one rank)
    overhead_bytes: int  # non-weight, non-KV memory of one GPU whatever its layers
    fingerprint_layers: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    tpot_layer_per_position_ms: float = 0.0
    tpot_other_per_position_ms: float = 0.0
    ttft_host_layer: Poly | None = None
    ttft_host_other: Poly | None = None
    tpot_host_layer: Line | None = None
    tpot_host_other: Line | None = None
    kv_bytes_per_layer_token: float = 0.0  # per rank, from the engine's report (0: use the formula)
    method: str = "fingerprint"
    extra_gpu_bytes: int = 0  # per rank, added to the overhead (NCCL buffers of a modeled TP variant)


def _peak(m: FingerprintMeasurement, source: MemorySource) -> int:
    if source == "allocator":
        return m.peak_bytes
    if source == "nvml":
        if m.nvml_peak_bytes <= 0:
            raise ValueError("memory_source='nvml' but a measurement has no NVML peak (it ran without NVML).")
        return m.nvml_peak_bytes
    return max(m.peak_bytes, m.nvml_peak_bytes)


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = slope * x + intercept``."""
    a = np.column_stack([np.asarray(xs, dtype=float), np.ones(len(xs))])
    (slope, intercept), *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    return float(slope), float(intercept)


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0, exactly, for the few (<= 8) features used here:
    the best of the unconstrained solutions on every subset of features that comes out non-negative.
    Every latency coefficient is a cost (per layer, per token, per position), so none is negative;
    without the constraint, noise can make a fitted slope negative and an extrapolation absurd."""
    k = a.shape[1]
    if k > 8:
        raise ValueError("nnls here is for at most 8 features")
    best, best_res = np.zeros(k), float(np.sum(y**2))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sub = a[:, cols]
        coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
        if np.any(coef < 0):
            continue
        res = float(np.sum((sub @ coef - y) ** 2))
        if res < best_res - 1e-12 * max(1.0, best_res):
            best = np.zeros(k)
            best[cols] = coef
            best_res = res
    return best


def _fit_ttft(points: list[tuple[int, int, float]], degree: int, name: str) -> tuple[Poly, Poly]:
    """``T(n, p) = n * layer(p) + other(p)``, polynomials of ``degree`` in p with non-negative
    coefficients, by least squares."""
    scale = float(max(p for _, p, _ in points))
    rows, ys = [], []
    for n, p, y in points:
        q = p / scale
        powers = [q**k for k in range(degree + 1)]
        rows.append([n * w for w in powers] + powers)
        ys.append(y)
    a = np.asarray(rows, dtype=float)
    if np.linalg.matrix_rank(a) < a.shape[1]:
        raise ValueError(f"variant {name}: TTFT measurements do not determine the per-layer and other terms")
    coef = nnls(a, np.asarray(ys, dtype=float))
    unscale = [scale**-k for k in range(degree + 1)]
    layer = [float(coef[k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)
    other = [float(coef[degree + 1 + k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)
    return (layer[0], layer[1], layer[2]), (other[0], other[1], other[2])


def _fit_steps(points: list[tuple[int, int, float]]) -> tuple[Line, Line]:
    """``S(n, x) = n * (a_l + b_l x) + (a_o + b_o x)`` by non-negative least squares; ``b = 0`` when
    the points have a single position."""
    positions = {x for _, x, _ in points}
    ys = np.asarray([y for _, _, y in points], dtype=float)
    if len(positions) < 2:
        coef = nnls(np.asarray([[n, 1.0] for n, _, _ in points], dtype=float), ys)
        return (float(coef[0]), 0.0), (float(coef[1]), 0.0)
    scale = float(max(positions)) or 1.0
    a = np.asarray([[n, n * x / scale, 1.0, x / scale] for n, x, _ in points], dtype=float)
    coef = nnls(a, ys)
    return (float(coef[0]), float(coef[1]) / scale), (float(coef[2]), float(coef[3]) / scale)


def _step_points(m: FingerprintMeasurement, device: bool) -> list[tuple[int, int, float]]:
    timings = m.decode_device if device else m.decode
    if timings:
        return [(m.num_layers, t.position, t.step_ms) for t in timings]
    value = m.tpot_device_ms if device else m.tpot_ms
    return [(m.num_layers, 0, value)]


def _has_device(measurements: Sequence[FingerprintMeasurement]) -> bool:
    return all(m.ttft_device and (m.decode_device or m.tpot_device_ms > 0) for m in measurements)


def _poly_add(a: Poly, b: Poly) -> Poly:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


def fit_variant(
    arch: ArchSpec,
    weights: WeightBreakdown,
    measurements: Sequence[FingerprintMeasurement],
    *,
    gpu_memory_bytes: int | None = None,
    memory_source: MemorySource = "max",
) -> VariantFit:
    """Fit the per-layer and other latency/memory terms from one variant's measurements.

    Raises ValueError when the measurements cannot determine them: mixed variants, fewer than two
    distinct fingerprint depths, fewer than two prompt lengths per fingerprint, or a peak above
    ``gpu_memory_bytes`` (measurements from another GPU type).
    """
    if not measurements:
        raise ValueError("no measurements to fit")
    variant = measurements[0].variant
    if any(m.variant != variant for m in measurements):
        raise ValueError("fit_variant needs measurements of one variant")
    name = variant_key(variant)
    loaded = [m for m in measurements if not m.replayed_from]  # memory: only fingerprints as loaded
    depths = sorted({m.num_layers for m in loaded})
    if len(depths) < 2:
        raise ValueError(f"variant {name} was measured on fingerprints of {depths} hidden layers; two depths (1 and 2) are needed")
    timed = [m for m in measurements if m.ttft]
    lengths_by_depth = {n: {t.prompt_tokens for m in timed if m.num_layers == n for t in m.ttft} for n in depths}
    min_lengths = min(len(v) for v in lengths_by_depth.values())
    if min_lengths < 2:
        raise ValueError(f"variant {name} has TTFT at fewer than two prompt lengths on some fingerprint; TTFT per token cannot be fitted")
    degree = 2 if min_lengths >= 3 else 1

    # Wall time (the host bound, and the only one without device timing).
    wall_points = [(m.num_layers, t.prompt_tokens, t.ttft_ms) for m in timed for t in m.ttft]
    host_layer, host_other = _fit_ttft(wall_points, degree, name)
    host_step_layer, host_step_other = _fit_steps([p for m in measurements for p in _step_points(m, False)])
    # A replayed deep run's wall times are measured at the model's depth (what host and device do
    # over that many layers, the steps right after a prefill included): with one, the wall lines
    # through all three depths are the estimate (session-4 H100 runs: 0.47% / 1.86% median).
    deep = any(m.replayed_from for m in measurements)

    ttft_host_layer = ttft_host_other = tpot_host_layer = tpot_host_other = None
    if _has_device(timed) and not deep:
        # A pass's device time cannot exceed its wall time (the device part is inside it); a device
        # sample above the wall median is noise, capped so it cannot steepen the device line.
        wall_ttft = {(m.num_layers, t.prompt_tokens): t.ttft_ms for m in timed for t in m.ttft}
        dev_points = [(m.num_layers, t.prompt_tokens, min(t.ttft_ms, wall_ttft.get((m.num_layers, t.prompt_tokens), math.inf)))
                      for m in timed for t in m.ttft_device]
        dev_layer, dev_other = _fit_ttft(dev_points, degree, name)
        wall_steps = {(m.num_layers, t.position): t.step_ms for m in timed for t in m.decode}
        dev_step_points = [(n, x, min(y, wall_steps.get((n, x), math.inf))) for m in timed for n, x, y in _step_points(m, True)]
        dev_step_layer, dev_step_other = _fit_steps(dev_step_points)
        # Slack: the least wall-minus-device gap (host work before the first kernel and after the last).
        gaps = [w.ttft_ms - d.ttft_ms for m in timed for w in m.ttft for d in m.ttft_device if w.prompt_tokens == d.prompt_tokens]
        ttft_slack = max(0.0, min(gaps)) if gaps else 0.0
        step_gaps = [m.tpot_ms - m.tpot_device_ms for m in timed if m.tpot_device_ms > 0]
        step_slack = max(0.0, min(step_gaps)) if step_gaps else 0.0
        dev_other = _poly_add(dev_other, (ttft_slack, 0.0, 0.0))
        dev_step_other = (dev_step_other[0] + step_slack, dev_step_other[1])
        # A prefill captured in one graph has no per-layer host work either (see decode below): the
        # host line would only carry the fingerprints' host jitter times the layer count.
        longest = max(p for _, p, _ in wall_points)
        if not all(m.prefill_graph_tokens >= longest for m in timed):
            ttft_host_layer, ttft_host_other = host_layer, host_other
        if not all(m.decode_graphs for m in measurements):
            tpot_host_layer, tpot_host_other = host_step_layer, host_step_other
        # else: a captured decode step is one graph launch whatever the depth, so there is no
        # per-layer host bound; a wall line through the fingerprints would only carry their host
        # jitter times the layer count (+15-20% on Llama-2-7B fp16 in the third H100 run). The
        # device line plus the least wall-minus-device gap (``step_slack``) is the estimate.
    else:
        dev_layer, dev_other = host_layer, host_other
        dev_step_layer, dev_step_other = host_step_layer, host_step_other

    # Memory: what the allocator holds beyond weights and KV grows per layer by ``act_layer`` (its
    # view is exact and repeatable, so the slope comes from it); the rest of the peak (CUDA context,
    # allocator cache, library workspaces: NVML's view) is one GPU's overhead, the median over the
    # fingerprints. A line through NVML peaks alone would multiply their noise by the layer count.
    alloc_nonweight, fixed = [], []
    for m in loaded:
        peak = _peak(m, memory_source)
        if gpu_memory_bytes is not None and peak > gpu_memory_bytes:
            raise ValueError(
                f"variant {name}: a measured peak of {peak} bytes exceeds the GPU's {gpu_memory_bytes}; the measurements come from another GPU type"
            )
        own = fingerprint_weight_bytes(arch, weights, variant, m.num_layers) + m.kv_cache_bytes
        alloc_nonweight.append(m.peak_bytes - own)
        fixed.append((m.num_layers, peak - own))
    act_layer = max(0.0, _line([m.num_layers for m in loaded], alloc_nonweight)[0])
    overhead = float(np.median([v - n * act_layer for n, v in fixed]))
    # A replayed run that captured every graph the fingerprints did (the serving set) holds, at the
    # model's depth, what a served model's graphs hold beyond weights and KV; with tensor
    # parallelism that grows with depth outside the allocator (NCCL's share of every captured
    # all-reduce: two H200s, Llama-2-7B at TP=2, 7 MiB a layer). Its excess over the line above is
    # spread over the layers it has beyond the fingerprints' (never below zero: the fingerprints
    # alone stand where it is lower). A run with fewer graphs (one process captures only the
    # protocol's prompt lengths at depth) would under-report it and is not used.
    serving_graphs = max((m.graphs for m in loaded), default=0)
    deep_runs = [m for m in measurements if m.replayed_from and serving_graphs > 0 and m.graphs >= serving_graphs]
    if deep_runs:
        d = max(deep_runs, key=lambda m: m.num_layers)
        own = fingerprint_weight_bytes(arch, weights, variant, d.replayed_from) + d.kv_cache_bytes
        n_fp = float(np.median([n for n, _ in fixed]))
        excess = (_peak(d, memory_source) - own) - (overhead + d.num_layers * act_layer)
        if excess > 0 and d.num_layers > n_fp:
            grow = excess / (d.num_layers - n_fp)
            act_layer += grow
            overhead -= n_fp * grow
    kv_reports = [m.kv_cache_bytes / (m.num_layers * m.context_tokens) for m in loaded if m.context_tokens > 0 and m.kv_cache_bytes > 0]

    return VariantFit(
        variant=variant,
        ttft_layer=dev_layer,
        ttft_other=dev_other,
        tpot_layer_ms=dev_step_layer[0],
        tpot_other_ms=dev_step_other[0],
        tpot_layer_per_position_ms=dev_step_layer[1],
        tpot_other_per_position_ms=dev_step_other[1],
        ttft_host_layer=ttft_host_layer,
        ttft_host_other=ttft_host_other,
        tpot_host_layer=tpot_host_layer,
        tpot_host_other=tpot_host_other,
        activation_layer_bytes=max(0, round(act_layer)),
        overhead_bytes=max(0, round(overhead)),
        fingerprint_layers=tuple(depths),
        prompt_lengths=tuple(sorted({p for _, p, _ in wall_points})),
        kv_bytes_per_layer_token=float(np.median(kv_reports)) if kv_reports else 0.0,
    )


def derive_tp_fit(arch: ArchSpec, fit: VariantFit, tp: int, comm: CommModel) -> VariantFit:
    """A TP=``tp`` variant's fit from its TP=1 twin's and the communication model (module docstring)."""
    if fit.variant.tp != 1:
        raise ValueError(f"derive_tp_fit needs a TP=1 fit, not {variant_key(fit.variant)}")
    if tp == 1:
        return fit
    h, t = arch.hidden_size, tp
    per_token_bytes = h * SERVE_BYTES
    ar0 = comm.collective_ms(0, t)  # latency part of one collective
    ar_per_token = comm.collective_ms(per_token_bytes, t) - ar0  # bandwidth part per token
    gather_ms = comm.collective_ms(arch.vocab_size * 4 / 2, t)  # all-gather moves half an all-reduce's bytes

    def split(poly: Poly) -> Poly:
        return (poly[0] / t, poly[1] / t, poly[2] / t)

    # Per layer: two all-reduces of tokens x hidden. Other: embedding all-reduce, logits gather, token broadcast.
    ttft_layer = _poly_add(split(fit.ttft_layer), (2 * ar0, 2 * ar_per_token, 0.0))
    ttft_other = _poly_add(split(fit.ttft_other), (ar0 + gather_ms + ar0, ar_per_token, 0.0))
    step_layer = fit.tpot_layer_ms / t + 2 * (ar0 + ar_per_token)
    step_other = fit.tpot_other_ms / t + (ar0 + ar_per_token) + gather_ms + ar0
    return replace(
        fit,
        variant=replace_variant(fit.variant, tp=t),
        ttft_layer=ttft_layer,
        ttft_other=ttft_other,
        tpot_layer_ms=step_layer,
        tpot_other_ms=step_other,
        tpot_layer_per_position_ms=fit.tpot_layer_per_position_ms / t,
        tpot_other_per_position_ms=fit.tpot_other_per_position_ms / t,
        kv_bytes_per_layer_token=fit.kv_bytes_per_layer_token / t,
        method="fingerprint+comm",
        extra_gpu_bytes=NCCL_BUFFER_BYTES,
    )


def _at(layers: int, layer: Sequence[float], other: Sequence[float]) -> list[float]:
    return [layers * a + b for a, b in zip(layer, other)]


def estimate_config(
    arch: ArchSpec,
    weights: WeightBreakdown,
    fit: VariantFit,
    config: Configuration,
    *,
    context_tokens: int,
) -> ConfigEstimate:
    """The full model's estimate for ``config`` from its variant's fit (paper L2 and M2)."""
    if variant_of(config) != fit.variant:
        raise ValueError(f"{config.key()} is not of the fitted variant {variant_key(fit.variant)}")
    problem = arch_problem(arch, config)
    if problem:
        raise ValueError(problem)
    if context_tokens < 1:
        raise ValueError(f"context_tokens must be at least 1, not {context_tokens}")
    L = arch.num_layers
    lw = layer_weights(arch, weights, config.weight_quant, config.pruning)
    if fit.kv_bytes_per_layer_token > 0:
        kv = round(fit.kv_bytes_per_layer_token * context_tokens)
    else:
        kv = kv_cache_bytes_per_layer(arch, config, context_tokens)
    layer_bytes = lw.per_rank(config.tp) + kv + fit.activation_layer_bytes
    first = first_stage_weight_bytes(weights, config.tp, arch)
    last = last_stage_weight_bytes(arch, weights, config.tp, config.pp)
    overhead = fit.overhead_bytes + fit.extra_gpu_bytes
    total = config.tp * (config.pp * overhead + L * layer_bytes + first + last)
    ttft = _at(L, fit.ttft_layer, fit.ttft_other)
    est = ConfigEstimate(
        config=config,
        ttft_base_ms=ttft[0],
        ttft_per_token_ms=ttft[1],
        ttft_per_token2_ms=ttft[2],
        tpot_ms=L * fit.tpot_layer_ms + fit.tpot_other_ms,
        tpot_per_position_ms=L * fit.tpot_layer_per_position_ms + fit.tpot_other_per_position_ms,
        layer_bytes=layer_bytes,
        first_stage_bytes=first,
        last_stage_bytes=last,
        gpu_overhead_bytes=overhead,
        total_bytes=total,
        num_layers=L,
        method=fit.method,
    )
    if fit.ttft_host_layer is not None and fit.ttft_host_other is not None:
        est.ttft_host_ms = _at(L, fit.ttft_host_layer, fit.ttft_host_other)
    if fit.tpot_host_layer is not None and fit.tpot_host_other is not None:
        est.tpot_host_ms = _at(L, fit.tpot_host_layer, fit.tpot_host_other)
    return est


def fit_variants(
    arch: ArchSpec,
    weights: WeightBreakdown,
    measurements: Iterable[FingerprintMeasurement],
    *,
    gpu_memory_bytes: int | None = None,
    memory_source: MemorySource = "max",
) -> dict[ProfileVariant, VariantFit | ValueError]:
    """Fit every measured variant; a variant whose measurements cannot be fitted maps to its error."""
    by_variant: dict[ProfileVariant, list[FingerprintMeasurement]] = {}
    for m in measurements:
        by_variant.setdefault(m.variant, []).append(m)
    out: dict[ProfileVariant, VariantFit | ValueError] = {}
    for v, ms in by_variant.items():
        try:
            out[v] = fit_variant(arch, weights, ms, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source)
        except ValueError as e:
            out[v] = e
    return out


def _fit_for(fits: dict[ProfileVariant, VariantFit | ValueError], config: Configuration, arch: ArchSpec | None = None,
             comm: CommModel | None = None) -> VariantFit:
    v = variant_of(config)
    fit = fits.get(v)
    if fit is None and comm is not None and arch is not None and v.tp > 1:
        twin = fits.get(replace_variant(v, tp=1))
        if isinstance(twin, VariantFit):
            fit = derive_tp_fit(arch, twin, v.tp, comm)
            fits[v] = fit
        elif isinstance(twin, ValueError):
            fit = twin
    if fit is None:
        raise ValueError(f"variant {variant_key(v)} was not profiled, so {config.key()} cannot be estimated")
    if isinstance(fit, ValueError):
        raise ValueError(f"{config.key()} cannot be estimated: {fit}")
    return fit


def fit_estimates(
    arch: ArchSpec,
    weights: WeightBreakdown,
    measurements: list[FingerprintMeasurement],
    configs: list[Configuration],
    *,
    context_tokens: int,
    gpu_memory_bytes: int | None = None,
    memory_source: MemorySource = "max",
    comm: CommModel | None = None,
) -> list[ConfigEstimate]:
    """Estimate every configuration in ``configs`` (paper L2 and M2), in order.

    Raises ValueError if any configuration's variant was not measured (or its measurements cannot be
    fitted) and cannot be modeled (``comm`` given and a measured TP=1 twin): the caller excludes such
    configurations (see :func:`build_configuration_map`). ``gpu_memory_bytes``, when given, rejects
    measurements whose peak exceeds the GPU's memory.
    """
    fits = fit_variants(arch, weights, measurements, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source)
    return [estimate_config(arch, weights, _fit_for(fits, c, arch, comm), c, context_tokens=context_tokens) for c in configs]


# ---------------------------------------------------------------------------------------------------
# the configuration map


def build_configuration_map(
    *,
    model: str,
    gpu_type: str,
    arch: ArchSpec,
    weights: WeightBreakdown,
    measurements: list[FingerprintMeasurement],
    capabilities: dict[str, Any],
    gpu_memory_bytes: int,
    max_gpus: int,
    context_tokens: int,
    configs: list[Configuration] | None = None,
    cost: ProfilingCost | None = None,
    device: str = "",
    created_at: float = 0.0,
    memory_source: MemorySource = "max",
    comm: CommModel | None = None,
    skipped: dict[str, str] | None = None,
) -> ConfigurationMap:
    """Assemble a model's :class:`ConfigurationMap` for one GPU type.

    ``configs`` defaults to :func:`enumerate_configurations` ``(arch, max_gpus)``. Configurations the
    engine or the architecture cannot run, and those whose variant was not measured (or could not be
    fitted) and cannot be modeled, are listed in ``excluded`` with the reason; every other one gets
    an estimate. ``comm`` models TP variants that were not measured from their TP=1 twins;
    ``skipped`` (variant key -> reason, from the profiler) explains variants the engine refused.
    """
    if configs is None:
        configs = enumerate_configurations(arch, max_gpus)
    supported, excluded = split_supported(configs, capabilities, arch=arch)
    fits = fit_variants(arch, weights, measurements, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source)
    skipped = skipped or {}
    estimates: list[ConfigEstimate] = []
    for c in supported:
        key = variant_key(variant_of(c))
        try:
            estimates.append(estimate_config(arch, weights, _fit_for(fits, c, arch, comm), c, context_tokens=context_tokens))
        except ValueError as e:
            reason = f"not profiled: {skipped[key]}" if key in skipped else str(e)
            excluded.append(ExcludedConfig(config=c, reason=reason))
    if cost is not None and comm is not None and any(e.method == "fingerprint+comm" for e in estimates):
        cost = msgspec.structs.replace(cost, comm_model=comm.describe())
    return ConfigurationMap(
        model=model,
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_memory_bytes,
        max_gpus=max_gpus,
        context_tokens=context_tokens,
        estimates=estimates,
        excluded=excluded,
        cost=cost if cost is not None else ProfilingCost(),
        device=device,
        created_at=created_at,
    )


# ---------------------------------------------------------------------------------------------------
# other GPU types


def gpu_spec(gpu_type: str) -> tuple[float, float] | None:
    """``(HBM GB/s, dense 16-bit TFLOP/s)`` of a GPU product name, by the longest matching fragment."""
    t = gpu_type.upper()
    matches = [k for k in GPU_SPECS if k.upper() in t]
    if not matches:
        return None
    return GPU_SPECS[max(matches, key=len)]


def translate_map(cmap: ConfigurationMap, gpu_type: str, gpu_memory_bytes: int, *, created_at: float = 0.0) -> ConfigurationMap:
    """Predict ``cmap`` (measured on ``cmap.gpu_type``) for another GPU type (module docstring).
    Raises ValueError when either GPU type is not in :data:`GPU_SPECS`. Configurations whose
    largest stage no longer fits ``gpu_memory_bytes`` are excluded with that reason."""
    src, dst = gpu_spec(cmap.gpu_type), gpu_spec(gpu_type)
    if src is None or dst is None:
        unknown = cmap.gpu_type if src is None else gpu_type
        raise ValueError(f"no published bandwidth and throughput for {unknown!r}; profile it instead (known: {', '.join(GPU_SPECS)}).")
    bw, fl = src[0] / dst[0], src[1] / dst[1]
    estimates, excluded = [], list(cmap.excluded)
    for e in cmap.estimates:
        c = e.config
        per_stage = -(-e.num_layers // c.pp)
        if e.stage_bytes(per_stage, first=True, last=c.pp == 1) > gpu_memory_bytes:
            excluded.append(ExcludedConfig(config=c, reason=f"a stage of {per_stage} layers does not fit the {gpu_type}'s memory"))
            continue
        estimates.append(msgspec.structs.replace(
            e,
            ttft_base_ms=e.ttft_base_ms * bw,
            ttft_per_token_ms=e.ttft_per_token_ms * fl,
            ttft_per_token2_ms=e.ttft_per_token2_ms * fl,
            tpot_ms=e.tpot_ms * bw,
            tpot_per_position_ms=e.tpot_per_position_ms * bw,
            method=e.method + "+translated",
        ))
    return msgspec.structs.replace(
        cmap,
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_memory_bytes,
        estimates=estimates,
        excluded=excluded,
        device=f"predicted from {cmap.gpu_type} ({cmap.device})",
        created_at=created_at or cmap.created_at,
    )
