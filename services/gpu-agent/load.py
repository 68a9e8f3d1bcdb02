"""GPU load as the paper defines it (section 6): the fraction of the last ``window_s`` seconds a GPU
was busy. Pure bookkeeping, fed one sample per second by the agent."""

from __future__ import annotations

from collections import deque


class BusyWindow:
    """Sliding window of (timestamp, busy seconds in the interval ending then)."""

    def __init__(self, window_s: float = 120.0):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._samples: deque[tuple[float, float, float]] = deque()  # (t_end, interval, busy seconds)

    def add(self, t_end: float, interval_s: float, busy_s: float) -> None:
        busy_s = min(max(busy_s, 0.0), interval_s)
        self._samples.append((t_end, interval_s, busy_s))
        self._trim(t_end)

    def _trim(self, now: float) -> None:
        while self._samples and self._samples[0][0] <= now - self.window_s:
            self._samples.popleft()

    def fraction(self, now: float) -> float:
        """Busy seconds in the window ``(now - window_s, now]`` over the seconds of it observed (a GPU
        just started has a shorter history; at least one second). A sample that straddles the
        window's start counts with the part of its interval inside the window (its busy seconds
        prorated), so intervals longer than planned do not inflate the fraction."""
        self._trim(now)
        if not self._samples:
            return 0.0
        start = now - self.window_s
        observed = busy = 0.0
        for t_end, interval, b in self._samples:
            inside = min(interval, t_end - start)
            if inside <= 0.0 or interval <= 0.0:
                continue
            observed += inside
            busy += b * (inside / interval)
        return min(busy / max(observed, min(1.0, self.window_s)), 1.0)


def busy_from_heartbeats(prev: dict[str, float], cur: dict[str, float], interval_s: float) -> float:
    """Busy seconds of one GPU in an interval, from the monotonic ``busy_seconds`` counters of the
    workers on it (a worker computes on all of its GPUs at once, so take the largest delta)."""
    best = 0.0
    for wid, total in cur.items():
        delta = total - prev.get(wid, total)
        best = max(best, delta)
    return min(max(best, 0.0), interval_s)


def parse_simulated(spec: str) -> list[int]:
    """``"8x48GB"`` or ``"2x80GB,4x24GB"`` -> GPU sizes in bytes (GB here means GiB)."""
    sizes: list[int] = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            count_s, size_s = part.split("x", 1)
            count = int(count_s)
            size_s = size_s.removesuffix("gib").removesuffix("gb").removesuffix("g")
            size = float(size_s)
        except ValueError:
            raise ValueError(f"cannot read simulated GPUs {spec!r}: write COUNTxSIZE, e.g. 8x48GB") from None
        if count <= 0 or size <= 0:
            raise ValueError(f"simulated GPUs {spec!r}: count and size must be positive")
        sizes += [int(size * 1024**3)] * count
    if not sizes:
        raise ValueError(f"simulated GPUs {spec!r} lists no GPU: write COUNTxSIZE, e.g. 8x48GB")
    return sizes
