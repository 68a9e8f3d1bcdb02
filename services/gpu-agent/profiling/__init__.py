"""Measuring a model on a device: a 1- or 2-layer fingerprint for the fingerprint service, or the
full model for ``iserve validate``. How and why: docs/profiling.md."""

from __future__ import annotations

from .job import gpu_type_of, run_profile_job, run_profile_job_file
from .measure import load_engine, measure_fingerprint, measure_model, measure_models, variant_kwargs
from .memory import activation_bytes_estimate
from .protocol import ENGINE_WARMUP_S, Protocol, protocol_of_job
from .timing import DeviceClock
from .tp_ranks import measure_allreduce, measure_tp_variant

__all__ = [
    "ENGINE_WARMUP_S",
    "DeviceClock",
    "Protocol",
    "activation_bytes_estimate",
    "gpu_type_of",
    "load_engine",
    "measure_allreduce",
    "measure_fingerprint",
    "measure_model",
    "measure_models",
    "measure_tp_variant",
    "protocol_of_job",
    "run_profile_job",
    "run_profile_job_file",
    "variant_kwargs",
]
