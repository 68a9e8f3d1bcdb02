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


def torch_device(device: str, tiny: bool) -> str:
    """``--device``, or the mode's default (cuda:0; the CPU with ``--tiny``); exits when CUDA is
    asked for on a machine without it."""
    import torch

    device = device or ("cpu" if tiny else "cuda:0")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU, or pass --tiny for the CPU check.")
    return device


def run_meta(device: str) -> dict:
    """What every result file records about where it ran: date (UTC), GPU type, device, torch, Python."""
    import datetime
    import platform

    import torch

    from iserve.gpu_agent.profiling import gpu_type_of

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu_type_of(device),
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
