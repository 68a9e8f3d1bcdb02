"""The GPUs an agent manages: real ones read through NVML, or simulated ones with a declared size.

NVML calls block, so the agent calls ``read()`` in a thread. Simulated GPUs have no hardware to
read: their used memory is what the agent has reserved for the workers placed on them, and their
busy time comes from those workers' heartbeats.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class GpuReading:
    index: int
    gpu_type: str
    total_bytes: int
    used_bytes: int  # as the hardware sees it (NVML); 0 for simulated GPUs
    util_percent: float  # NVML utilization over its last sample period; 0 for simulated GPUs


class Gpus(ABC):
    simulated = False

    @abstractmethod
    def read(self) -> list[GpuReading]:
        """One reading per GPU."""

    @abstractmethod
    def device_for(self, index: int, position: int) -> str:
        """The torch device a worker uses for the GPU ``index``, given as its ``position``-th GPU
        (workers see only their GPUs through CUDA_VISIBLE_DEVICES)."""

    @abstractmethod
    def visible_devices_env(self, indices: list[int]) -> dict[str, str]:
        """Environment that restricts a worker to the GPUs ``indices``."""

    def close(self) -> None:
        pass


class NvmlGpus(Gpus):
    def __init__(self) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            pynvml.nvmlShutdown()
            raise RuntimeError("NVML found no GPU")
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        self.names = []
        for h in self.handles:
            name = pynvml.nvmlDeviceGetName(h)
            self.names.append(name.decode() if isinstance(name, bytes) else name)

    def read(self) -> list[GpuReading]:
        out = []
        for i, h in enumerate(self.handles):
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = float(self.nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except self.nvml.NVMLError:
                util = 0.0
            out.append(GpuReading(i, self.names[i], int(mem.total), int(mem.used), util))
        return out

    def device_for(self, index: int, position: int) -> str:
        return f"cuda:{position}"

    def visible_devices_env(self, indices: list[int]) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in indices)}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


class SimulatedGpus(Gpus):
    simulated = True

    def __init__(self, sizes: list[int], gpu_type: str = ""):
        self.sizes = sizes
        self.gpu_type = gpu_type or f"sim-{round(sizes[0] / 1024**3)}GB"

    def read(self) -> list[GpuReading]:
        return [GpuReading(i, self.gpu_type, size, 0, 0.0) for i, size in enumerate(self.sizes)]

    def device_for(self, index: int, position: int) -> str:
        return "cpu"

    def visible_devices_env(self, indices: list[int]) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": ""}


def discover(simulate: str, gpu_type: str) -> Gpus:
    """Simulated GPUs when ``simulate`` is set; otherwise NVML, falling back to one simulated 24 GB
    GPU when there is no NVIDIA driver (so a laptop still runs the stack)."""
    from .load import parse_simulated

    if simulate:
        return SimulatedGpus(parse_simulated(simulate), gpu_type)
    try:
        return NvmlGpus()
    except Exception:
        return SimulatedGpus(parse_simulated("1x24GB"), gpu_type)


def cpus_of_mask(words: list[int], word_bits: int = 64) -> set[int]:
    """The CPU ids set in NVML's CPU affinity mask (word 0 holds CPUs 0..63, bit 0 first)."""
    return {w * word_bits + b for w, word in enumerate(words) for b in range(word_bits) if word >> b & 1}


def pin_to_gpu_cpus(device: str) -> list[int]:
    """Restrict this process, and the threads it starts later (NCCL's proxy threads), to the CPUs
    that NVML lists as close to the CUDA ``device`` (its NUMA node), as far as this process may
    use them. Returns the CPUs kept, or [] when nothing changed: not a CUDA device, no NVML, no
    overlap, or ``ISERVE_PIN_CPUS=0``. Tensor-parallel ranks call it before they initialize
    ``torch.distributed``: their every decode step waits on host round trips between ranks."""
    import os

    if os.environ.get("ISERVE_PIN_CPUS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    if not device.startswith("cuda") or not hasattr(os, "sched_setaffinity"):
        return []
    try:
        import pynvml
        import torch

        dev = torch.device(device)
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            words = list(pynvml.nvmlDeviceGetCpuAffinity(handle, -(-(os.cpu_count() or 1) // 64)))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []
    cpus = sorted(cpus_of_mask(words) & os.sched_getaffinity(0))
    if not cpus:
        return []
    os.sched_setaffinity(0, cpus)
    return cpus
