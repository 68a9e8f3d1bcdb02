"""Memory of one engine as a fresh worker holding only it would show it, and the CPU's estimate.

See docs/profiling.md#memory.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch

from iserve.gpu_agent.engine.graphs import prime_streams
from iserve.messages import ArchSpec


def activation_bytes_estimate(arch: ArchSpec, prompt_tokens: int, dtype_bytes: int) -> int:
    """Bytes of temporaries alive at the peak of a prefill of ``prompt_tokens`` tokens, from shapes.

    Used on CPU, where there is no allocator to ask. Counted within one layer (temporaries are freed
    layer by layer): the residual stream and its normed copy ``[p, hidden]``; the fused q/k/v output
    and the rotated q and k; the GQA-expanded k and v and the attention output ``[p, heads*head_dim]``;
    the MLP's fused gate/up output ``[p, 2*intermediate]`` and its activation ``[p, intermediate]``
    (Mixtral: plus its router logits and the output accumulator); all in the computation dtype; plus
    the float32 norm temporaries ``[p, hidden]`` and the float32 logits of the last position. The
    attention score matrix is not counted: ``scaled_dot_product_attention`` uses fused kernels that
    do not materialize it.
    """
    p, h = prompt_tokens, arch.hidden_size
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    f = arch.intermediate_size
    elems = p * (2 * h + (q + 2 * kv) + (q + kv) + 2 * q + q + 3 * f)
    if arch.family == "mixtral":
        elems += p * (h + arch.num_experts)
    return elems * dtype_bytes + 2 * p * h * 4 + 2 * arch.vocab_size * 4


class NvmlProbe:
    """This process's memory on one GPU as NVML reports it; every call is guarded and yields 0 when
    NVML is missing or does not list the process (e.g. in a container with its own PID namespace)."""

    def __init__(self, device: torch.device):
        self._handle = None
        self._nvml: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                text = str(uuid)
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            elif not os.environ.get("CUDA_VISIBLE_DEVICES"):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self._handle = None

    def sample(self) -> int:
        if self._handle is None:
            return 0
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
        except Exception:
            return 0
        return 0

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


_FIRST_BASELINE: dict[int, tuple[int, int, int]] = {}  # per CUDA device: the process's first clean baseline


class Baseline:
    """What the process holds on the device just before an engine loads, so that the engine's peaks
    can be told apart from what others hold: another engine measured alongside, or what earlier
    engines of the process left (workspaces of their streams; the benchmark measures many in one
    process). A measurement reports its engine's own memory plus the process's first baseline (CUDA
    context and runtime workspaces, after the job's GPU warm-up), i.e. what a fresh worker process
    holding just this engine would show."""

    def __init__(self, device: torch.device, probe: "NvmlProbe"):
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.allocated = self.reserved = self.nvml = 0
        self.first = (0, 0, 0)
        if not self.cuda:
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _FIRST_BASELINE:
            prime_streams(device)  # the process's stream workspaces belong to its first baseline
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self.allocated = int(torch.cuda.memory_allocated(device))
        self.reserved = int(torch.cuda.memory_reserved(device))
        self.nvml = probe.sample()
        self.first = _FIRST_BASELINE.setdefault(index, (self.allocated, self.reserved, self.nvml))

    def own(self, allocated_peak: int, reserved_peak: int, nvml_peak: int) -> tuple[int, int, int]:
        """The engine's peaks as a fresh process holding only it would show them."""
        a = allocated_peak - self.allocated + self.first[0]
        r = reserved_peak - self.reserved + self.first[1]
        n = (
            nvml_peak - self.nvml + self.first[2]
            if nvml_peak > 0 and self.nvml > 0 and self.first[2] > 0
            else nvml_peak
        )
        return a, r, n
