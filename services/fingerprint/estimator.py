"""The Estimator of the Fingerprint Controller: from fingerprint measurements to a configuration map.

Pure functions, no I/O: the live fingerprint service and the trace simulator run the same code.

The paper (section 5) profiles an LLM's 1- and 2-hidden-layer *fingerprints* at PP=1 and extrapolates
linearly in the number of hidden layers. We implement its L2 latency method and its M2 memory method,
with the weights computed exactly instead of extrapolated.

Configurations (:func:`enumerate_configurations`)
    TP: powers of two dividing both ``num_attention_heads`` and ``num_kv_heads``; PP: 1 up to
    ``min(max_gpus, num_layers)`` (every integer, not only powers of two) with ``TP * PP <= max_gpus``;
    weight quantization {fp16, int8, int4}; KV-cache quantization {fp16, int8}; pruning
    {none, 2:4, structured}. A *variant* is a configuration less its PP degree: the fingerprints are
    profiled once per variant, at PP=1 (:func:`measurement_variants`).

Latency (paper L2, equations 2 and 3)
    ``TTFT(L, p) = L * TTFT_layer(p) + TTFT_other(p)`` and ``TPOT(L) = L * TPOT_layer + TPOT_other``,
    where each ``TTFT_*(p)`` is ``base + per_token * p (+ per_token2 * p**2)``. All measurements of a
    variant (any number of fingerprints, prompt lengths and repeats) are fitted together by least
    squares with the features ``[n, n*p, n*p**2, 1, p, p**2]`` (``n``: the fingerprint's hidden layers);
    the quadratic terms are used only when every fingerprint was timed at 3 or more distinct prompt
    lengths, and at least 2 lengths are required. The fitted coefficients are reported raw (no clamping).
    PP>1 reuses the PP=1 latency unchanged: with batch 1 the paper measures the pipeline hand-off at
    under 0.05% of the latency, so nothing is added for it.

Memory (paper M2, with exact weights)
    * Weights are exact, from the :class:`~iserve.messages.WeightBreakdown` and per-tensor shapes, in
      the *serving* element size of 2 bytes (fp16/bf16), whatever dtype the checkpoint stores.
    * Only the 2-D layer weights (the "linear" tensors: projections, experts, MoE router) are
      quantized or 2:4-pruned; embeddings, norms, biases and the LM head stay 16-bit.
      int8: 1 byte per element plus one fp16 scale per output row. int4: half a byte per element
      (rounded up per row) plus an fp16 scale and an fp16 zero point per group of 128 input elements
      of each output row.
    * 2:4 pruning keeps 2 of every 4 values of a linear weight plus a 2-bit position per kept value,
      i.e. ``numel/2`` stored values and ``numel/8`` metadata bytes (the layout of cuSPARSELt and
      ``torch.sparse.to_sparse_semi_structured``: fp16 2:4 costs 56.25% of dense). Combined with
      quantization the kept values are stored quantized and the scales are those of the dense matrix.
    * Structured pruning removes 25% of the FFN channels (``f - f // 4`` kept, per expert for MoE) and
      25% of the attention heads by whole KV groups (``kv - kv // 4`` KV heads kept, each with its
      query heads); with fewer than 4 KV heads it removes 25% of the query heads of each group
      instead (``g - g // 4`` of the ``g`` query heads per KV head kept). The pruned shapes give the
      exact weights and the smaller KV cache. A TP degree that does not divide the kept heads cannot
      run: :func:`split_supported` (given the architecture) excludes it with that reason.
    * Tensor parallelism: a layer's linear weights are split evenly over the TP ranks (the few scale
      bytes that row-parallel layers would duplicate are ignored), its norms and biases are replicated;
      the embedding is vocab-parallel (``/ TP``) and so is the LM head; the final norm is replicated.
    * Stages: the first PP stage holds the embedding, the last the final norm and the LM head. With a
      tied LM head and PP=1 the head is the embedding (nothing added); with PP>1 the last stage holds
      its own copy of the embedding matrix for the head, counted in ``last_stage_bytes``.
    * KV cache, exact: ``2 * kv_heads * head_dim * context_tokens * kv_bytes`` per layer (``kv_bytes``
      2 for fp16, 1 for int8; the int8 KV scales are ignored), divided by TP.
    * Everything else comes from the fingerprints: for each measurement, ``peak - weights - kv_cache``
      (the fingerprint's exact weights as above, the KV-cache bytes the engine reports holding) is
      the non-weight, non-KV memory; a least-squares line over the fingerprints' layer counts gives
      a per-layer term (activations that grow with depth) and an "other" term: the runtime (CUDA
      context, where the peak includes it), allocator slack and activation workspace of one GPU.
      Both are clamped at 0 (noise cannot make memory negative). Because the same exact weight
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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
INT4_GROUP = 128  # input elements per int4 scale/zero group

MemorySource = Literal["max", "allocator", "nvml"]

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


def measurement_variants(configs: Iterable[Configuration]) -> list[ProfileVariant]:
    """The distinct variants to profile for ``configs``, in first-seen order. Fingerprints always run
    at PP=1 (the paper reuses PP=1 latency for every PP, and memory per stage follows from layers).
    Pass the supported configurations (:func:`split_supported`) so nothing is profiled in vain."""
    seen: dict[ProfileVariant, None] = {}
    for c in configs:
        seen.setdefault(variant_of(c), None)
    return list(seen)


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
    on its knob. ``capabilities["engine"]`` names the engine in the reasons (default "torch").
    With ``arch``, its family is checked against ``families`` and structured-pruning configurations
    whose TP degree does not divide the pruned head counts are excluded too.
    """
    engine = str(capabilities.get("engine", "torch"))
    supported: list[Configuration] = []
    excluded: list[ExcludedConfig] = []
    families = capabilities.get("families")
    family_ok = arch is None or families is None or arch.family in families
    for c in configs:
        missing: list[str] = []
        if not family_ok:
            missing.append(f"the {arch.family} architecture family")
        for knob in ("tp", "pp", "weight_quant", "kv_quant", "pruning"):
            allowed = capabilities.get(knob)
            value = getattr(c, knob)
            if allowed is None or value in allowed:
                continue
            words = _KNOB_WORDS[knob]
            missing.append(words[value] if isinstance(words, dict) else words.format(value))
        if missing:
            excluded.append(ExcludedConfig(config=c, reason=f"the {engine} engine does not implement {_join_or(missing)} yet"))
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
    """Bytes of one ``rows x cols`` linear weight (``rows`` output features) when served.

    fp16: 2 bytes per value; int8: 1 byte per value plus an fp16 scale per row; int4: half a byte per
    value (rounded up per row) plus an fp16 scale and zero per group of 128 columns of each row.
    2:4 pruning stores half the values plus ``numel / 8`` metadata bytes (2 bits per kept value).
    """
    numel = rows * cols
    if pruning == "2:4":
        values, cols_kept = _ceil_div(numel, 2), _ceil_div(cols, 2)
        meta = _ceil_div(numel, 8)
    else:
        values, cols_kept, meta = numel, cols, 0
    if weight_quant == "fp16":
        return values * SERVE_BYTES + meta
    if weight_quant == "int8":
        return values + rows * SERVE_BYTES + meta
    if weight_quant == "int4":
        packed = rows * _ceil_div(cols_kept, 2)
        groups = rows * _ceil_div(cols, INT4_GROUP)
        return packed + groups * 2 * SERVE_BYTES + meta
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


def first_stage_weight_bytes(weights: WeightBreakdown, tp: int) -> int:
    """The embedding on one rank of the first stage (vocab-parallel over TP)."""
    return _ceil_div(weights.embed_params * SERVE_BYTES, tp)


def last_stage_weight_bytes(arch: ArchSpec, weights: WeightBreakdown, tp: int, pp: int) -> int:
    """Final norm (replicated) and LM head (vocab-parallel over TP) on one rank of the last stage.
    A tied head is the embedding: free at PP=1, a copy of it at PP>1."""
    head = weights.head_params
    if arch.tie_embeddings or head == 0:
        head = weights.embed_params if pp > 1 else 0
    return weights.final_norm_params * SERVE_BYTES + _ceil_div(head * SERVE_BYTES, tp)


def kv_cache_bytes_per_layer(arch: ArchSpec, config: Configuration, context_tokens: int) -> int:
    """One layer's KV cache on one TP rank for ``context_tokens`` tokens:
    ``2 * kv_heads * head_dim * context * kv_bytes / TP``."""
    kv_heads = pruned_arch(arch, config.pruning).num_kv_heads
    return _ceil_div(2 * kv_heads * arch.head_dim * context_tokens * KV_BYTES[config.kv_quant], config.tp)


def fingerprint_weight_bytes(arch: ArchSpec, weights: WeightBreakdown, variant: ProfileVariant, num_layers: int) -> int:
    """Exact weights on one rank of a ``num_layers``-layer fingerprint run at PP=1 as ``variant``."""
    lw = layer_weights(arch, weights, variant.weight_quant, variant.pruning)
    return (
        num_layers * lw.per_rank(variant.tp)
        + first_stage_weight_bytes(weights, variant.tp)
        + last_stage_weight_bytes(arch, weights, variant.tp, 1)
    )


# ---------------------------------------------------------------------------------------------------
# fitting one variant's measurements


@dataclass(frozen=True)
class VariantFit:
    """Per-layer and "other" terms of one variant, fitted from its fingerprints (paper L2, M2)."""

    variant: ProfileVariant
    ttft_layer: tuple[float, float, float]  # base ms, ms per prompt token, ms per prompt token squared
    ttft_other: tuple[float, float, float]
    tpot_layer_ms: float
    tpot_other_ms: float
    activation_layer_bytes: int  # non-weight, non-KV memory that grows per layer (one rank)
    overhead_bytes: int  # non-weight, non-KV memory of one GPU whatever its layers
    fingerprint_layers: tuple[int, ...]
    prompt_lengths: tuple[int, ...]


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
    depths = sorted({m.num_layers for m in measurements})
    if len(depths) < 2:
        raise ValueError(f"variant {name} was measured on fingerprints of {depths} hidden layers; two depths (1 and 2) are needed")
    lengths_by_depth = {n: {t.prompt_tokens for m in measurements if m.num_layers == n for t in m.ttft} for n in depths}
    min_lengths = min(len(v) for v in lengths_by_depth.values())
    if min_lengths < 2:
        raise ValueError(f"variant {name} has TTFT at fewer than two prompt lengths on some fingerprint; TTFT per token cannot be fitted")
    degree = 2 if min_lengths >= 3 else 1

    # TTFT(n, p) = n * (l0 + l1 p + l2 p^2) + (o0 + o1 p + o2 p^2), least squares on scaled p.
    points = [(m.num_layers, t.prompt_tokens, t.ttft_ms) for m in measurements for t in m.ttft]
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
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    unscale = [scale**-k for k in range(degree + 1)]
    layer = [float(coef[k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)
    other = [float(coef[degree + 1 + k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)

    tpot_layer, tpot_other = _line([m.num_layers for m in measurements], [m.tpot_ms for m in measurements])

    nonweight = []
    for m in measurements:
        peak = _peak(m, memory_source)
        if gpu_memory_bytes is not None and peak > gpu_memory_bytes:
            raise ValueError(
                f"variant {name}: a measured peak of {peak} bytes exceeds the GPU's {gpu_memory_bytes}; the measurements come from another GPU type"
            )
        nonweight.append(peak - fingerprint_weight_bytes(arch, weights, variant, m.num_layers) - m.kv_cache_bytes)
    act_layer, overhead = _line([m.num_layers for m in measurements], nonweight)

    return VariantFit(
        variant=variant,
        ttft_layer=(layer[0], layer[1], layer[2]),
        ttft_other=(other[0], other[1], other[2]),
        tpot_layer_ms=tpot_layer,
        tpot_other_ms=tpot_other,
        activation_layer_bytes=max(0, round(act_layer)),
        overhead_bytes=max(0, round(overhead)),
        fingerprint_layers=tuple(depths),
        prompt_lengths=tuple(sorted({p for _, p, _ in points})),
    )


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
    layer_bytes = lw.per_rank(config.tp) + kv_cache_bytes_per_layer(arch, config, context_tokens) + fit.activation_layer_bytes
    first = first_stage_weight_bytes(weights, config.tp)
    last = last_stage_weight_bytes(arch, weights, config.tp, config.pp)
    overhead = fit.overhead_bytes
    total = config.tp * (config.pp * overhead + L * layer_bytes + first + last)
    return ConfigEstimate(
        config=config,
        ttft_base_ms=L * fit.ttft_layer[0] + fit.ttft_other[0],
        ttft_per_token_ms=L * fit.ttft_layer[1] + fit.ttft_other[1],
        ttft_per_token2_ms=L * fit.ttft_layer[2] + fit.ttft_other[2],
        tpot_ms=L * fit.tpot_layer_ms + fit.tpot_other_ms,
        layer_bytes=layer_bytes,
        first_stage_bytes=first,
        last_stage_bytes=last,
        gpu_overhead_bytes=overhead,
        total_bytes=total,
        num_layers=L,
        method="fingerprint",
    )


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


def _fit_for(fits: dict[ProfileVariant, VariantFit | ValueError], config: Configuration) -> VariantFit:
    v = variant_of(config)
    fit = fits.get(v)
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
) -> list[ConfigEstimate]:
    """Estimate every configuration in ``configs`` (paper L2 and M2), in order.

    Raises ValueError if any configuration's variant was not measured (or its measurements cannot be
    fitted): the caller excludes such configurations (see :func:`build_configuration_map`).
    ``gpu_memory_bytes``, when given, rejects measurements whose peak exceeds the GPU's memory.
    """
    fits = fit_variants(arch, weights, measurements, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source)
    return [estimate_config(arch, weights, _fit_for(fits, c), c, context_tokens=context_tokens) for c in configs]


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
) -> ConfigurationMap:
    """Assemble a model's :class:`ConfigurationMap` for one GPU type.

    ``configs`` defaults to :func:`enumerate_configurations` ``(arch, max_gpus)``. Configurations the
    engine or the architecture cannot run, and those whose variant was not measured (or could not be
    fitted), are listed in ``excluded`` with the reason; every other one gets an estimate.
    """
    if configs is None:
        configs = enumerate_configurations(arch, max_gpus)
    supported, excluded = split_supported(configs, capabilities, arch=arch)
    fits = fit_variants(arch, weights, measurements, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source)
    estimates: list[ConfigEstimate] = []
    for c in supported:
        try:
            estimates.append(estimate_config(arch, weights, _fit_for(fits, c), c, context_tokens=context_tokens))
        except ValueError as e:
            excluded.append(ExcludedConfig(config=c, reason=str(e)))
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
