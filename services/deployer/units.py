"""Units of the planner and how its reasons print them: bytes (GiB = 2**30 bytes), costs and limits."""

from __future__ import annotations

import math

GIB = 1 << 30


def gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def gib_list(values: list[int]) -> str:
    parts = [gib(v) for v in values]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def num_up(x: float) -> str:
    """``x`` rounded UP to 3 significant digits, so a limit set to it admits ``x``."""
    if x <= 0 or not math.isfinite(x):
        return num(x)
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    up = math.ceil(x / step - 1e-9) * step
    return f"{up:.3g}" if up < 1000 else f"{up:.0f}"


def num(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
