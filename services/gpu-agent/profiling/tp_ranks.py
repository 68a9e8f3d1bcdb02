"""Tensor-parallel measurements in spawned rank processes, one set per variant, and the all-reduce
cost (see docs/profiling.md#tensor-parallelism)."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import time
import traceback
from collections.abc import Sequence

import torch

from iserve.errors import UnsupportedModel
from iserve.gpu_agent.gpus import pin_to_gpu_cpus
from iserve.messages import FingerprintMeasurement, ProfileJob, ProfileVariant, decoder, encode

from .measure import measure_models
from .protocol import ENGINE_WARMUP_S, protocol_of_job


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_rank_main(
    rank: int, size: int, port: int, job_bytes: bytes, devices: list[str], variants_bytes: list[bytes], queue
) -> None:
    """One rank of the tensor-parallel measurements (spawned once per TP degree): measure every
    fingerprint of the job as each of the variants, rank 0 timing; send ``(rank, {variant key:
    [measurement bytes] or error text}, allreduce, fatal error)`` to ``queue``. A variant the engine
    refuses is reported by its key and the next one goes on, on every rank alike."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A hung rank shows where: the parent signals SIGUSR1 before it kills a rank that overran the
    # job's time limit, and every thread's stack goes to stderr.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def report(e: Exception) -> None:
        queue.put((rank, {}, (0.0, 0.0), f"{type(e).__name__}: {e} | {traceback.format_exc(limit=3)[-300:]}"))

    try:
        job = decoder(ProfileJob).decode(job_bytes)
        device = devices[rank]
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(torch.device(device))
            pin_to_gpu_cpus(device)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides
        report(e)
        return
    try:
        allreduce = measure_allreduce(device) if cuda else (0.0, 0.0)
        protocol = protocol_of_job(job)
        coord = dist.new_group(list(range(size)), backend="gloo")  # which engine the leader runs next
        out: dict[str, list[bytes] | str] = {}
        for vb in variants_bytes:
            variant = decoder(ProfileVariant).decode(vb)
            try:
                # The fingerprints of a variant together, timed interleaved as at TP=1.
                out[variant.key()] = [
                    encode(m)
                    for m in measure_models(
                        job.fingerprint_paths,
                        device,
                        protocol=protocol,
                        variant=variant,
                        device_timing=job.device_timing,
                        gpu_warmup_s=ENGINE_WARMUP_S,
                        tp_rank=rank,
                        tp_size=size,
                        coord=coord,
                    )
                ]
            except UnsupportedModel as e:  # raised alike on every rank, before any collective of the variant
                out[variant.key()] = e.message
        queue.put((rank, out, allreduce, ""))
    except Exception as e:  # noqa: BLE001 - reported to the parent, which decides (and kills the other ranks)
        # Reported before the group is destroyed, which can wait on a stuck peer
        # (docs/profiling.md#tensor-parallelism).
        report(e)
    finally:
        dist.destroy_process_group()


def measure_allreduce(
    device: str, sizes: Sequence[int] = (8 << 10, 256 << 10, 4 << 20, 32 << 20)
) -> tuple[float, float]:
    """All-reduce cost over the initialized default process group: ``(latency_us, bus_GBps)`` from a
    least-squares line ``t = latency + 2 (n-1)/n * bytes / bus_bandwidth`` over ``sizes``."""
    import torch.distributed as dist

    n = dist.get_world_size()
    dev = torch.device(device)
    xs, ys = [], []
    for size in sizes:
        t = torch.ones(size // 2, dtype=torch.float16, device=dev)
        for _ in range(3):
            dist.all_reduce(t)
        torch.cuda.synchronize(dev)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(t)
        torch.cuda.synchronize(dev)
        ys.append((time.perf_counter() - t0) / reps * 1e6)
        xs.append(2 * (n - 1) / n * size)
    import numpy as np

    slope, intercept = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    bus = 1e-3 / slope if slope > 0 else 0.0  # bytes per microsecond -> GB/s
    return float(max(intercept, 0.0)), float(bus)


def measure_tp(job: ProfileJob, devices: list[str], variants: list[ProfileVariant], timeout_s: float):
    """Measure ``variants`` (all of one TP degree ``t`` > 1) on ``devices[:t]``, one spawned process
    per rank for all of them. Returns ``({variant key: [measurements] or reason}, (latency_us, GB/s))``."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    size = variants[0].tp
    port = free_port()
    blobs = [encode(v) for v in variants]
    procs = [
        ctx.Process(target=_tp_rank_main, args=(r, size, port, encode(job), devices[:size], blobs, queue), daemon=True)
        for r in range(size)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _dump_stacks(procs)
                keys = ", ".join(v.key() for v in variants)
                codes = ", ".join(
                    f"rank {r} {'alive' if p.exitcode is None else f'exited {p.exitcode}'}" for r, p in enumerate(procs)
                )
                raise TimeoutError(f"tensor-parallel profiling of {keys} took longer than {timeout_s:.0f} s ({codes})")
            try:
                rank, out, allreduce, error = queue.get(timeout=min(remaining, 5.0))
            except Exception:  # queue.Empty: check that the ranks are alive
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a rank of the TP={size} measurement died with exit code {dead[0].exitcode}"
                    ) from None
                continue
            if error:
                raise RuntimeError(f"rank {rank} of the TP={size} measurement: {error}")
            results[rank] = (out, allreduce)
    finally:
        for p in procs:  # ranks that sent their results exit on their own; the others are killed
            p.join(timeout=30 if len(results) == size else 0.5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    lead, allreduce = results[0]
    merged: dict[str, list[FingerprintMeasurement] | str] = {}
    for key, value in lead.items():
        if isinstance(value, str):
            merged[key] = value
            continue
        ms = [decoder(FingerprintMeasurement).decode(b) for b in value]
        for r in range(1, size):  # memory: the largest rank's
            other = results[r][0].get(key)
            if isinstance(other, list):
                for m, b in zip(ms, other):
                    o = decoder(FingerprintMeasurement).decode(b)
                    m.peak_bytes = max(m.peak_bytes, o.peak_bytes)
                    m.nvml_peak_bytes = max(m.nvml_peak_bytes, o.nvml_peak_bytes)
                    m.reserved_peak_bytes = max(m.reserved_peak_bytes, o.reserved_peak_bytes)
        merged[key] = ms
    return merged, allreduce


def _dump_stacks(procs) -> None:
    """Ask live rank processes for their threads' stacks (on their stderr) before they are killed."""
    alive = [p for p in procs if p.is_alive() and p.pid]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except OSError:
            pass
    if alive:
        time.sleep(1.0)


def measure_tp_variant(job: ProfileJob, devices: list[str], variant: ProfileVariant, timeout_s: float):
    """One TP variant (``iserve validate`` measures full models this way): its measurements and the
    all-reduce cost. Raises ``UnsupportedModel`` when the engine refuses it."""
    merged, allreduce = measure_tp(job, devices, [variant], timeout_s)
    value = merged[variant.key()]
    if isinstance(value, str):
        raise UnsupportedModel(value)
    return value, allreduce
