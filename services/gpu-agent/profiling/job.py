"""A ``ProfileJob`` end to end: every fingerprint measured as every variant (TP variants on spawned
ranks, the others in this process from the job's tensor cache), and the worker's profile mode."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
import torch

from iserve.checkpoint import scan_checkpoint
from iserve.errors import BadRequest, UnsupportedModel
from iserve.gpu_agent.engine.tensors import TensorCache
from iserve.messages import FingerprintMeasurement, ProfileJob, ProfileResult, ProfileVariant, decoder, encode

from .measure import measure_models
from .memory import Baseline, NvmlProbe
from .protocol import protocol_of_job
from .tp_ranks import measure_tp


def gpu_type_of(device: str) -> str:
    """The GPU's product name (e.g. "NVIDIA H100 80GB HBM3") for a CUDA device, else "cpu"."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def _warm_gpu(device: str, seconds: float) -> None:
    """Keep a CUDA device busy with matrix products for ``seconds`` (clocks ramp up under load)."""
    dev = torch.device(device)
    if dev.type != "cuda" or seconds <= 0:
        return
    a = torch.randn(4096, 4096, device=dev, dtype=torch.float16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize(dev)
    del a


def run_profile_job(
    job: ProfileJob, devices: Sequence[str], *, log: Callable[[str], None] | None = None
) -> ProfileResult:
    """Measure every fingerprint of ``job`` as every variant, on ``devices`` (``devices[0]`` for TP=1;
    ``devices[:tp]`` for a TP variant). A variant the engine refuses (``UnsupportedModel``), or that
    needs more devices than given, is listed in ``skipped`` with the reason; other errors propagate
    (the agent then reports the run as failed and the service retries on another GPU)."""
    devices = list(devices)
    if not devices:
        raise BadRequest("a profiling job needs at least one device.")
    if all(torch.device(d).type == "cpu" for d in devices):
        # Simulated GPUs: no deep run, one intra-op thread (docs/profiling.md#the-deep-run).
        job = msgspec.structs.replace(job, replay_depth=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run_profile_job(job, devices, log)
        finally:
            torch.set_num_threads(threads)
    return _run_profile_job(job, devices, log)


def _run_profile_job(job: ProfileJob, devices: list[str], log: Callable[[str], None] | None) -> ProfileResult:
    protocol = protocol_of_job(job)
    t0 = time.perf_counter()
    _warm_gpu(devices[0], job.gpu_warmup_s)
    measurements: list[FingerprintMeasurement] = []
    skipped: dict[str, str] = {}
    allreduce = (0.0, 0.0)
    by_tp: dict[int, list[ProfileVariant]] = {}
    for variant in job.variants:
        if variant.tp > 1:
            by_tp.setdefault(variant.tp, []).append(variant)
    for tp, variants in sorted(by_tp.items()):
        if tp > len(devices):
            skipped.update({v.key(): f"needs {tp} GPUs, the profiling job had {len(devices)}" for v in variants})
            continue
        # Fresh rank processes per variant, as a serving worker is: what NCCL keeps outside the
        # allocator stays in a process (docs/profiling.md#tensor-parallelism).
        for variant in variants:
            remaining = job.timeout_s - (time.perf_counter() - t0)  # the job's time limit covers all of them
            if remaining <= 0:
                raise TimeoutError(f"the profiling job ran out of its {job.timeout_s:.0f} s before {variant.key()}")
            if log:
                log(f"measuring the fingerprints as {variant.key()} on {', '.join(devices[:tp])}")
            merged, ar = measure_tp(job, devices, [variant], remaining)
            if ar[1] > 0:
                allreduce = ar
            for key, value in merged.items():
                if isinstance(value, str):
                    skipped[key] = value
                else:
                    measurements += value
    one_gpu = [v for v in job.variants if v.tp == 1]
    cache = _fingerprint_cache(job.fingerprint_paths, devices[0]) if one_gpu else None
    try:
        for variant in one_gpu:
            key = variant.key()
            try:
                ms = measure_models(
                    job.fingerprint_paths,
                    devices[0],
                    protocol=protocol,
                    variant=variant,
                    device_timing=job.device_timing,
                    seed=0,
                    tensors=cache,
                )
            except UnsupportedModel as e:
                skipped[key] = e.message
                continue
            measurements += ms
            if log:
                for path, m in zip(job.fingerprint_paths, ms):
                    log(
                        f"measured {Path(path).name} as {key}: TPOT {m.tpot_ms:.3f} ms "
                        f"(device {m.tpot_device_ms:.3f} ms)"
                    )
    finally:
        cache_bytes = cache.nbytes if cache is not None else 0
        if cache is not None:
            cache.clear()
            torch.cuda.empty_cache()
    wall = time.perf_counter() - t0
    # The first device is held throughout; a TP measurement also holds tp - 1 more for its duration.
    extra = sum(m.gpu_seconds * (m.tp - 1) / m.tp for m in measurements if m.tp > 1)
    return ProfileResult(
        job_id=job.job_id,
        device=devices[0],
        gpu_type=gpu_type_of(devices[0]),
        measurements=measurements,
        gpu_seconds=wall + extra,
        wall_seconds=wall,
        peak_bytes=max((m.peak_bytes for m in measurements), default=0) + cache_bytes,
        skipped=skipped,
        allreduce_latency_us=allreduce[0],
        allreduce_bus_gbps=allreduce[1],
        nvml_peak_bytes=max((m.nvml_peak_bytes for m in measurements), default=0) + cache_bytes,
    )


CACHE_ROOM = 4  # hold the fingerprints' tensors on the GPU only when it has this many times their size free


def _fingerprint_cache(paths: Sequence[str], device: str) -> TensorCache | None:
    """The job's fingerprint tensors read once onto ``device`` (``TensorCache``): every variant
    builds its engines from copies of them instead of reading the files again. None on a CPU or
    without room. The process's first memory baseline is taken before, so that the cache is
    counted as another's memory, not as the engines' (``Baseline``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    cks = [scan_checkpoint(p) for p in paths]
    free, _ = torch.cuda.mem_get_info(dev)
    if CACHE_ROOM * sum(ck.data_bytes for ck in cks) > free:
        return None
    probe = NvmlProbe(dev)
    try:
        Baseline(dev, probe)
    finally:
        probe.close()
    cache = TensorCache(str(dev))
    for ck in cks:
        cache.add(ck)
    return cache


def run_profile_job_file(
    job_path: str | Path, result_path: str | Path, devices: Sequence[str], log: Callable[[str], None] | None = None
) -> ProfileResult:
    """The worker's profile mode: read a ``ProfileJob``, run it, write the ``ProfileResult``
    atomically. Errors propagate for the worker to report."""
    job = decoder(ProfileJob).decode(Path(job_path).read_bytes())
    result = run_profile_job(job, devices, log=log)
    out = Path(result_path)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(encode(result))
    os.replace(tmp, out)
    return result
