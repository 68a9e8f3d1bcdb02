"""The memory model (paper M2 with exact weights): the bytes a configuration's weights and KV cache
take on one GPU, and the per-layer and per-GPU terms fitted from the fingerprints' peaks.
See docs/estimator.md#memory-m2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from iserve.checkpoint import layer_tensor_shapes
from iserve.messages import ArchSpec, Configuration, FingerprintMeasurement, ProfileVariant, WeightBreakdown

from .configs import WEIGHT_QUANTS, pruned_arch

SERVE_BYTES = 2  # fp16/bf16: the element size of every unquantized tensor when served
KV_BYTES = {"fp16": 2, "int8": 1}
KV_SCALE_BYTES = {"fp16": 0, "int8": 2}  # per head and position (and K/V)
INT4_GROUP = 128  # input elements per int4 scale/zero group
NCCL_BUFFER_BYTES = 256 * 2**20  # per rank of a modeled TP variant: NCCL's communicator buffers

MemorySource = Literal["max", "allocator", "nvml"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# exact weights and KV cache


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
            f"the weight breakdown ({weights.layer_linear_params} linear + {weights.layer_other_params} other "
            f"elements per layer) does not match the architecture ({lin} + {other}); rescan the checkpoint."
        )
    shapes = layer_tensor_shapes(pruned_arch(arch, pruning))
    linear_bytes = sum(
        linear_weight_bytes(s[0], s[1], weight_quant, "2:4" if pruning == "2:4" else "none")
        for s in shapes.values()
        if len(s) == 2
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
# fitting one variant's memory


@dataclass(frozen=True)
class MemoryFit:
    """One variant's non-weight memory terms on one rank (paper M2), from its fingerprints."""

    activation_layer_bytes: int  # non-weight, non-KV memory that grows per layer
    overhead_bytes: int  # non-weight, non-KV memory of one GPU whatever its layers
    kv_bytes_per_layer_token: float  # from the engine's report (0: use the formula)


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


def fit_memory(
    arch: ArchSpec,
    weights: WeightBreakdown,
    variant: ProfileVariant,
    measurements: Sequence[FingerprintMeasurement],
    *,
    gpu_memory_bytes: int | None = None,
    memory_source: MemorySource = "max",
) -> MemoryFit:
    """The per-layer and per-GPU terms of ``peak - weights - KV`` over one variant's fingerprints.
    Raises ValueError for a peak above ``gpu_memory_bytes`` (measurements from another GPU type)."""
    name = variant.key()
    loaded = [m for m in measurements if not m.replayed_from]  # only fingerprints as loaded
    # Per-layer slope from the allocator's view (exact); the rest of the peak is one GPU's overhead,
    # the median over the fingerprints. See docs/estimator.md#memory-m2.
    alloc_nonweight, fixed = [], []
    for m in loaded:
        peak = _peak(m, memory_source)
        if gpu_memory_bytes is not None and peak > gpu_memory_bytes:
            raise ValueError(
                f"variant {name}: a measured peak of {peak} bytes exceeds the GPU's {gpu_memory_bytes}; "
                "the measurements come from another GPU type"
            )
        own = fingerprint_weight_bytes(arch, weights, variant, m.num_layers) + m.kv_cache_bytes
        alloc_nonweight.append(m.peak_bytes - own)
        fixed.append((m.num_layers, peak - own))
    act_layer = max(0.0, _line([m.num_layers for m in loaded], alloc_nonweight)[0])
    overhead = float(np.median([v - n * act_layer for n, v in fixed]))
    # A deep run that captured every serving graph adds the growth per layer outside the allocator
    # (never below zero). See docs/estimator.md#deep-runs-and-memory.
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
    kv_reports = [
        m.kv_cache_bytes / (m.num_layers * m.context_tokens)
        for m in loaded
        if m.context_tokens > 0 and m.kv_cache_bytes > 0
    ]
    return MemoryFit(
        activation_layer_bytes=max(0, round(act_layer)),
        overhead_bytes=max(0, round(overhead)),
        kv_bytes_per_layer_token=float(np.median(kv_reports)) if kv_reports else 0.0,
    )
