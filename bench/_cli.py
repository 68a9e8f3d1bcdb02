"""Argument helpers shared by the bench scripts (``bench_fingerprint.py``, ``profile_maps.py``)."""

from __future__ import annotations


def int_list(text: str, default: list[int]) -> list[int]:
    """``"128,512"`` -> ``[128, 512]``; ``default`` when ``text`` is empty."""
    return [int(x) for x in text.split(",") if x.strip()] if text else default


def model_list(text: str, default: list[tuple[str, int | None, bool]]) -> list[tuple[str, int | None, bool]]:
    """``"llama-2-7b,mixtral-8x7b:8"`` -> ``[(preset, layers or None, required)]`` (every model named
    on the command line is required); ``default`` when ``text`` is empty."""
    if not text:
        return default
    out = []
    for item in text.split(","):
        name, _, layers = item.strip().partition(":")
        out.append((name, int(layers) if layers else None, True))
    return out
