"""Profiling fingerprints and measuring full models on this machine's devices (``iserve validate``'s
measuring side, also run by the benchmarks). Torch and the gpu-agent are imported inside functions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iserve import checkpoint
from iserve.messages import (
    Configuration,
    ConfigurationMap,
    FingerprintMeasurement,
    ProfileJob,
    ProfileResult,
    ProfilingCost,
)

from . import estimator, generator


def default_devices() -> list[str]:
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def engine_capabilities() -> dict:
    from iserve.gpu_agent.engine.capabilities import CAPABILITIES

    return dict(CAPABILITIES)


def device_memory_bytes(device: str) -> int:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class LocalProfile:
    cmap: ConfigurationMap
    result: ProfileResult
    wall_seconds: float


def profile_locally(
    model_dir: str | Path,
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    work_dir: str | Path,
    name: str = "",
    capabilities: dict | None = None,
    max_gpus: int | None = None,
    device_timing: bool = True,
    gpu_warmup_s: float = 1.0,
    replay_depth: int = -1,
    replay_distinct: bool = False,
    variants_filter: Callable[[Any], bool] | None = None,
    log: Callable[[str], None] | None = None,
    timeout_s: float = 600.0,
    batch_sizes: Sequence[int] = (),
) -> LocalProfile:
    """Generate ``model_dir``'s fingerprints under ``work_dir``, profile them on ``devices`` (the
    fingerprint service's job, run in this process) and estimate every configuration."""
    from iserve.gpu_agent.profiling import run_profile_job

    t0 = time.perf_counter()
    ck = checkpoint.scan_checkpoint(model_dir)
    infos = generator.make_fingerprints(ck, work_dir)
    caps = capabilities if capabilities is not None else engine_capabilities()
    max_gpus = max_gpus or len(devices)
    configs = estimator.enumerate_configurations(ck.arch, max_gpus)
    supported, _ = estimator.split_supported(configs, caps, arch=ck.arch)
    variants = estimator.measurement_variants(supported, max_tp=len(devices))
    if variants_filter is not None:
        variants = [v for v in variants if variants_filter(v)]
    context = min(context_tokens, ck.arch.max_position)
    job = ProfileJob(
        job_id=uuid.uuid4().hex[:12],
        model=name or Path(model_dir).name,
        fingerprint_paths=[i.path for i in infos],
        gpu_index=0,
        variants=variants,
        prompt_lengths=list(prompt_lengths),
        output_lengths=list(output_lengths),
        repeats=repeats,
        warmup=warmup,
        context_tokens=context,
        gpu_indices=list(range(len(devices))),
        device_timing=device_timing,
        gpu_warmup_s=gpu_warmup_s,
        replay_depth=estimator.replay_depth(ck.arch, replay_depth),
        replay_distinct=replay_distinct,
        timeout_s=timeout_s,
        batch_sizes=list(batch_sizes),
    )
    result = run_profile_job(job, devices, log=log)
    cmap = local_map(
        ck, infos, result, devices, name=job.model, capabilities=caps, max_gpus=max_gpus, context_tokens=context
    )
    return LocalProfile(cmap=cmap, result=result, wall_seconds=time.perf_counter() - t0)


def local_map(
    ck: checkpoint.Checkpoint,
    infos: Sequence[generator.FingerprintInfo],
    result: ProfileResult,
    devices: Sequence[str],
    *,
    name: str,
    capabilities: dict,
    max_gpus: int,
    context_tokens: int,
) -> ConfigurationMap:
    """The configuration map of ``ck`` for up to ``max_gpus`` GPUs of ``devices[0]``'s type from a
    profiling ``result`` made here (``profile_locally``'s last step; also for results merged from
    several jobs). TP degrees above what was measured come from the communication model."""
    from iserve.gpu_agent.profiling import gpu_type_of

    sizes, fractions = generator.fingerprint_cost_fields(list(infos))
    gpu_type = gpu_type_of(devices[0])
    comm = (
        estimator.CommModel(result.allreduce_latency_us, result.allreduce_bus_gbps, "measured")
        if result.allreduce_bus_gbps > 0
        else estimator.default_comm(gpu_type)
    )
    return estimator.build_configuration_map(
        model=name,
        gpu_type=gpu_type,
        arch=ck.arch,
        weights=checkpoint.weight_breakdown(ck),
        measurements=result.measurements,
        capabilities=capabilities,
        gpu_memory_bytes=device_memory_bytes(devices[0]),
        max_gpus=max_gpus,
        context_tokens=context_tokens,
        configs=estimator.enumerate_configurations(ck.arch, max_gpus),
        cost=ProfilingCost(
            gpu_seconds=result.gpu_seconds,
            wall_seconds=result.wall_seconds,
            peak_bytes=result.peak_bytes,
            fingerprint_bytes=sizes,
            fingerprint_fraction=fractions,
            nvml_peak_bytes=result.nvml_peak_bytes,
            measured_variants=len({m.variant for m in result.measurements}),
        ),
        device=f"{devices[0]}:{gpu_type}",
        created_at=time.time(),
        comm=comm,
        skipped=result.skipped,
    )


def measure_configuration(
    model_dir: str | Path,
    config: Configuration,
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    gpu_warmup_s: float | None = None,
    timeout_s: float = 900.0,
    batch_sizes: Sequence[int] = (),
) -> FingerprintMeasurement:
    """Measure the full model as ``config`` (PP=1; TP on ``devices[:tp]``) with the profiling
    protocol, wall time only, and at TP=1 its batched decode steps at ``batch_sizes``. Raises
    ``UnsupportedModel`` when the engine cannot run it."""
    from iserve.errors import BadRequest
    from iserve.gpu_agent import profiling

    if config.pp != 1:
        raise BadRequest(
            f"{config.key()}: validation measures PP=1 configurations "
            "(PP reuses PP=1 latency; see docs/fingerprint.md)."
        )
    protocol = profiling.Protocol(
        prompt_lengths=tuple(prompt_lengths),
        output_lengths=tuple(output_lengths),
        repeats=repeats,
        warmup=warmup,
        device_repeats=0,
        context_tokens=context_tokens,
        batch_sizes=tuple(batch_sizes),  # TP measurements time none (the batch sweep is for TP=1)
    )
    variant = estimator.variant_of(config)
    if config.tp == 1:
        warm = profiling.ENGINE_WARMUP_S if gpu_warmup_s is None else gpu_warmup_s  # as each fingerprint gets
        return profiling.measure_model(
            model_dir, devices[0], protocol=protocol, variant=variant, device_timing=False, gpu_warmup_s=warm
        )
    if len(devices) < config.tp:
        raise BadRequest(f"{config.key()} needs {config.tp} devices; pass --devices with {config.tp}.")
    job = ProfileJob(
        job_id="validate",
        model=Path(model_dir).name,
        fingerprint_paths=[str(model_dir)],
        gpu_index=0,
        variants=[variant],
        prompt_lengths=list(prompt_lengths),
        output_lengths=list(output_lengths),
        repeats=repeats,
        warmup=warmup,
        context_tokens=context_tokens,
        device_timing=False,
        timeout_s=timeout_s,
    )
    ms, _ = profiling.measure_tp_variant(job, list(devices), variant, timeout_s)
    return ms[0]


def decode_runs(prompt_lengths: Sequence[int], output_lengths: Sequence[int], context: int) -> list[tuple[int, int]]:
    from iserve.gpu_agent.profiling import Protocol

    return Protocol(
        prompt_lengths=tuple(prompt_lengths), output_lengths=tuple(output_lengths), context_tokens=context
    ).decode_runs()


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
