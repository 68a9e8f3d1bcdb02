"""How ``Engine.generate`` times itself: CUDA events on one device, else the host clock after a sync."""

from __future__ import annotations

import time

import torch


class PerfTimer:
    """Wall-clock timer; syncs the CUDA devices in use so that queued work is counted."""

    name = "perf_counter"

    def __init__(self, cuda_devices: list[torch.device]):
        self._cuda = cuda_devices
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        for d in self._cuda:
            torch.cuda.synchronize(d)
        return (time.perf_counter() - self._t0) * 1000.0


class CudaEventTimer:
    """CUDA events on the current stream of one device."""

    name = "cuda_events"

    def __init__(self, device: torch.device):
        self._device = device
        with torch.cuda.device(device):
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        with torch.cuda.device(self._device):
            self._start.record()

    def stop(self) -> float:
        with torch.cuda.device(self._device):
            self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))
