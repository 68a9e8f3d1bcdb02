"""The Estimator of the Fingerprint Controller: from fingerprint measurements to a configuration map.

Pure functions, no I/O: the live fingerprint service, ``iserve validate``, the benchmark and the trace
simulator run the same code. docs/estimator.md explains how the estimate is made.

- :mod:`.configs`: the configurations a model can run, and the variants profiled for them;
- :mod:`.memory`: exact weight and KV-cache bytes, and the memory terms fitted from fingerprints (M2);
- :mod:`.latency`: TTFT and decode-step fits (L2) and the cost of TP collectives;
- :mod:`.fit`: one variant's fit, a TP variant's from its TP=1 twin, and a configuration's estimate;
- :mod:`.maps`: the ``ConfigurationMap`` of a model, and a map predicted for another GPU type;
- :mod:`.batching`: the time of one continuous-batching step, from a configuration's batch-1 estimate.
"""

from .batching import StepModel, layer_kv_bytes, map_kv_bytes, step_model
from .configs import (
    KV_QUANTS,
    PRUNINGS,
    WEIGHT_QUANTS,
    arch_problem,
    enumerate_configurations,
    measurement_variants,
    profiling_lengths,
    pruned_arch,
    replace_variant,
    replay_depth,
    split_supported,
    variant_of,
)
from .fit import VariantFit, derive_tp_fit, estimate_config, fit_variant, fit_variants
from .latency import COMM_DEFAULTS, CommModel, LatencyFit, Line, Poly, default_comm, fit_latency, nnls
from .maps import GPU_SPECS, build_configuration_map, fit_estimates, gpu_spec, repair_tp_host_floors, translate_map
from .memory import (
    INT4_GROUP,
    KV_BYTES,
    KV_SCALE_BYTES,
    NCCL_BUFFER_BYTES,
    SERVE_BYTES,
    LayerWeights,
    MemoryFit,
    MemorySource,
    fingerprint_weight_bytes,
    first_stage_weight_bytes,
    fit_memory,
    kv_cache_bytes_per_layer,
    last_stage_weight_bytes,
    layer_weights,
    linear_weight_bytes,
)

__all__ = [
    "COMM_DEFAULTS",
    "GPU_SPECS",
    "INT4_GROUP",
    "KV_BYTES",
    "KV_QUANTS",
    "KV_SCALE_BYTES",
    "NCCL_BUFFER_BYTES",
    "PRUNINGS",
    "SERVE_BYTES",
    "StepModel",
    "WEIGHT_QUANTS",
    "CommModel",
    "LatencyFit",
    "LayerWeights",
    "Line",
    "MemoryFit",
    "MemorySource",
    "Poly",
    "VariantFit",
    "arch_problem",
    "build_configuration_map",
    "default_comm",
    "derive_tp_fit",
    "enumerate_configurations",
    "estimate_config",
    "fingerprint_weight_bytes",
    "first_stage_weight_bytes",
    "fit_estimates",
    "fit_latency",
    "fit_memory",
    "fit_variant",
    "fit_variants",
    "gpu_spec",
    "kv_cache_bytes_per_layer",
    "last_stage_weight_bytes",
    "layer_kv_bytes",
    "layer_weights",
    "linear_weight_bytes",
    "map_kv_bytes",
    "measurement_variants",
    "repair_tp_host_floors",
    "profiling_lengths",
    "nnls",
    "pruned_arch",
    "replace_variant",
    "replay_depth",
    "split_supported",
    "step_model",
    "translate_map",
    "variant_of",
]
