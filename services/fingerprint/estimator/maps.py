"""Map assembly: every configuration's estimate (or the reason it has none) in a model's
``ConfigurationMap``, and a map predicted for another GPU type. See docs/estimator.md#the-map."""

from __future__ import annotations

from typing import Any

import msgspec

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

from .configs import enumerate_configurations, replace_variant, split_supported, variant_of
from .fit import VariantFit, derive_tp_fit, estimate_config, fit_variants
from .latency import CommModel
from .memory import MemorySource

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


def _fit_for(
    fits: dict[ProfileVariant, VariantFit | ValueError],
    config: Configuration,
    arch: ArchSpec | None = None,
    comm: CommModel | None = None,
) -> VariantFit:
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
        raise ValueError(f"variant {v.key()} was not profiled, so {config.key()} cannot be estimated")
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
    return [
        estimate_config(arch, weights, _fit_for(fits, c, arch, comm), c, context_tokens=context_tokens) for c in configs
    ]


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
        key = variant_of(c).key()
        try:
            fit = _fit_for(fits, c, arch, comm)
            estimates.append(estimate_config(arch, weights, fit, c, context_tokens=context_tokens))
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


def translate_map(
    cmap: ConfigurationMap, gpu_type: str, gpu_memory_bytes: int, *, created_at: float = 0.0
) -> ConfigurationMap:
    """Predict ``cmap`` (measured on ``cmap.gpu_type``) for another GPU type
    (docs/estimator.md#other-gpu-types). Raises ValueError when either GPU type is not in
    :data:`GPU_SPECS`. Configurations whose largest stage no longer fits ``gpu_memory_bytes`` are
    excluded with that reason."""
    src, dst = gpu_spec(cmap.gpu_type), gpu_spec(gpu_type)
    if src is None or dst is None:
        unknown = cmap.gpu_type if src is None else gpu_type
        raise ValueError(
            f"no published bandwidth and throughput for {unknown!r}; profile it instead "
            f"(known: {', '.join(GPU_SPECS)})."
        )
    bw, fl = src[0] / dst[0], src[1] / dst[1]
    estimates, excluded = [], list(cmap.excluded)
    for e in cmap.estimates:
        c = e.config
        per_stage = -(-e.num_layers // c.pp)
        if e.stage_bytes(per_stage, first=True, last=c.pp == 1) > gpu_memory_bytes:
            reason = f"a stage of {per_stage} layers does not fit the {gpu_type}'s memory"
            excluded.append(ExcludedConfig(config=c, reason=reason))
            continue
        estimates.append(
            msgspec.structs.replace(
                e,
                ttft_base_ms=e.ttft_base_ms * bw,
                ttft_per_token_ms=e.ttft_per_token_ms * fl,
                ttft_per_token2_ms=e.ttft_per_token2_ms * fl,
                tpot_ms=e.tpot_ms * bw,
                tpot_per_position_ms=e.tpot_per_position_ms * bw,
                batch_step_ms=[t * bw for t in e.batch_step_ms],  # memory-bound like the batch-1 step
                batch_step_per_position_ms=[t * bw for t in e.batch_step_per_position_ms],
                method=e.method if e.method.endswith("+translated") else e.method + "+translated",
            )
        )
    return msgspec.structs.replace(
        cmap,
        gpu_type=gpu_type,
        gpu_memory_bytes=gpu_memory_bytes,
        estimates=estimates,
        excluded=excluded,
        device=f"predicted from {cmap.gpu_type} ({cmap.device})",
        created_at=created_at or cmap.created_at,
    )


def repair_tp_host_floors(cmap: ConfigurationMap) -> ConfigurationMap:
    """A map made before derived tensor-parallel variants moved their host floor: each
    ``fingerprint+comm`` estimate kept its TP=1 twin's host lines, so no TP degree was faster than
    TP=1. Move each such floor by the change of the device lines from the twin (as ``derive_tp_fit``
    now does); maps made since are returned unchanged in substance (their floors already moved)."""

    def twin_key(c: Configuration) -> str:
        return msgspec.structs.replace(c, tp=1).key()

    ones = {e.config.key(): e for e in cmap.estimates if e.config.tp == 1}
    out = []
    for e in cmap.estimates:
        one = ones.get(twin_key(e.config)) if e.method == "fingerprint+comm" else None
        if one is None or e.tpot_host_ms != one.tpot_host_ms or e.ttft_host_ms != one.ttft_host_ms:
            out.append(e)  # measured, no twin, or already moved
            continue
        device_change = [
            e.ttft_base_ms - one.ttft_base_ms,
            e.ttft_per_token_ms - one.ttft_per_token_ms,
            e.ttft_per_token2_ms - one.ttft_per_token2_ms,
        ]
        fields: dict[str, Any] = {}
        if len(one.ttft_host_ms) == 3:
            fields["ttft_host_ms"] = [h + d for h, d in zip(one.ttft_host_ms, device_change)]
        if len(one.tpot_host_ms) == 2:
            fields["tpot_host_ms"] = [
                one.tpot_host_ms[0] + e.tpot_ms - one.tpot_ms,
                one.tpot_host_ms[1] + e.tpot_per_position_ms - one.tpot_per_position_ms,
            ]
        out.append(msgspec.structs.replace(e, **fields))
    return msgspec.structs.replace(cmap, estimates=out)
