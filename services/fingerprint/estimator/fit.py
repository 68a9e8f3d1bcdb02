"""One variant's fit (latency and memory terms from its fingerprints), a TP variant's fit derived
from its TP=1 twin, and the extrapolation of a fit to a configuration of the full model.
See docs/estimator.md."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from iserve.messages import (
    ArchSpec,
    ConfigEstimate,
    Configuration,
    EstimateMethod,
    FingerprintMeasurement,
    ProfileVariant,
    WeightBreakdown,
)

from .configs import arch_problem, replace_variant, variant_of
from .latency import BatchTerms, CommModel, Line, Poly, fit_batched, fit_latency, poly_add
from .memory import (
    NCCL_BUFFER_BYTES,
    SERVE_BYTES,
    MemorySource,
    first_stage_weight_bytes,
    fit_memory,
    kv_cache_bytes_per_layer,
    last_stage_weight_bytes,
    layer_weights,
)


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
    method: EstimateMethod = "fingerprint"
    extra_gpu_bytes: int = 0  # per rank, added to the overhead (NCCL buffers of a modeled TP variant)
    batch: tuple[BatchTerms, ...] = ()  # the batching engine's step per batch size (``latency.fit_batched``)


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
    name = variant.key()
    depths = sorted({m.num_layers for m in measurements if not m.replayed_from})
    if len(depths) < 2:
        raise ValueError(
            f"variant {name} was measured on fingerprints of {depths} hidden layers; two depths (1 and 2) are needed"
        )
    lat = fit_latency(measurements, depths, name)
    mem = fit_memory(
        arch, weights, variant, measurements, gpu_memory_bytes=gpu_memory_bytes, memory_source=memory_source
    )
    return VariantFit(
        variant=variant,
        ttft_layer=lat.ttft_layer,
        ttft_other=lat.ttft_other,
        tpot_layer_ms=lat.step_layer[0],
        tpot_other_ms=lat.step_other[0],
        tpot_layer_per_position_ms=lat.step_layer[1],
        tpot_other_per_position_ms=lat.step_other[1],
        ttft_host_layer=lat.ttft_host_layer,
        ttft_host_other=lat.ttft_host_other,
        tpot_host_layer=lat.step_host_layer,
        tpot_host_other=lat.step_host_other,
        activation_layer_bytes=mem.activation_layer_bytes,
        overhead_bytes=mem.overhead_bytes,
        fingerprint_layers=tuple(depths),
        prompt_lengths=lat.prompt_lengths,
        kv_bytes_per_layer_token=mem.kv_bytes_per_layer_token,
        batch=fit_batched(measurements, depths),
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


def derive_tp_fit(arch: ArchSpec, fit: VariantFit, tp: int, comm: CommModel) -> VariantFit:
    """A TP=``tp`` variant's fit from its TP=1 twin's and the communication model.
    See docs/estimator.md#tensor-parallelism-without-tp-fingerprints."""
    if fit.variant.tp != 1:
        raise ValueError(f"derive_tp_fit needs a TP=1 fit, not {fit.variant.key()}")
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
    ttft_layer = poly_add(split(fit.ttft_layer), (2 * ar0, 2 * ar_per_token, 0.0))
    ttft_other = poly_add(split(fit.ttft_other), (ar0 + gather_ms + ar0, ar_per_token, 0.0))
    step_layer = fit.tpot_layer_ms / t + 2 * (ar0 + ar_per_token)
    step_other = fit.tpot_other_ms / t + (ar0 + ar_per_token) + gather_ms + ar0
    step_layer_pos = fit.tpot_layer_per_position_ms / t
    step_other_pos = fit.tpot_other_per_position_ms / t

    # The host bound is TP=1's wall time, which holds the device work too when that was the bound.
    # A rank keeps the host work but not the device work TP removes: the floor moves by exactly the
    # device lines' change (docs/estimator.md#tensor-parallelism-without-tp-fingerprints).
    def poly_moved(host: Poly | None, before: Poly, after: Poly) -> Poly | None:
        if host is None:
            return None
        return (host[0] + after[0] - before[0], host[1] + after[1] - before[1], host[2] + after[2] - before[2])

    def line_moved(host: Line | None, before: Line, after: Line) -> Line | None:
        return None if host is None else (host[0] + after[0] - before[0], host[1] + after[1] - before[1])

    return replace(
        fit,
        variant=replace_variant(fit.variant, tp=t),
        ttft_layer=ttft_layer,
        ttft_other=ttft_other,
        tpot_layer_ms=step_layer,
        tpot_other_ms=step_other,
        tpot_layer_per_position_ms=step_layer_pos,
        tpot_other_per_position_ms=step_other_pos,
        ttft_host_layer=poly_moved(fit.ttft_host_layer, fit.ttft_layer, ttft_layer),
        ttft_host_other=poly_moved(fit.ttft_host_other, fit.ttft_other, ttft_other),
        tpot_host_layer=line_moved(
            fit.tpot_host_layer, (fit.tpot_layer_ms, fit.tpot_layer_per_position_ms), (step_layer, step_layer_pos)
        ),
        tpot_host_other=line_moved(
            fit.tpot_host_other, (fit.tpot_other_ms, fit.tpot_other_per_position_ms), (step_other, step_other_pos)
        ),
        kv_bytes_per_layer_token=fit.kv_bytes_per_layer_token / t,
        method="fingerprint+comm",
        extra_gpu_bytes=NCCL_BUFFER_BYTES,
        batch=(),  # not modelled: a derived TP variant's batched steps fall back to the roofline model
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
        raise ValueError(f"{config.key()} is not of the fitted variant {fit.variant.key()}")
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
    if fit.batch:
        est.batch_sizes = [b for b, _, _ in fit.batch]
        est.batch_step_ms = [L * layer[0] + other[0] for _, layer, other in fit.batch]
        est.batch_step_per_position_ms = [L * layer[1] + other[1] for _, layer, other in fit.batch]
    return est
