"""Fingerprint service settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from iserve.settings import ServiceConfig, add_flags, from_args, option


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2 or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"give at least two positive lengths, got {text!r}")
    return values


def batch_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, got {text!r}") from None
    if any(not 1 <= v <= 1024 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes run from 1 to 1024, got {text!r}")
    return values


@dataclass
class FingerprintConfig(ServiceConfig):
    work_dir: Path = option(
        Path.home() / ".iserve" / "fingerprints",
        flag="--fingerprint-dir",
        help="where fingerprint checkpoints are written",
    )
    context_tokens: int = option(2048, help="context length the configuration maps (KV cache) are estimated for")
    prompt_lengths: list[int] = option(
        [128, 512, 1024],
        type=int_list,
        help="prompt lengths TTFT is measured at (comma-separated; 3 or more fit TTFT's quadratic term)",
    )
    output_lengths: list[int] = option(
        [16, 64], type=int_list, help="output lengths TPOT is measured over (comma-separated)"
    )
    repeats: int = option(
        7,
        help="timed repeats of each fingerprint run (medians kept; fingerprints are cheap "
        "and their differences carry the per-layer cost)",
    )
    warmup: int = option(1, help="untimed warm-up rounds of every run")
    device_timing: bool = option(
        True,
        help="also time the device alone on CUDA when there is no deep run (--replay-depth 0); see docs/fingerprint.md",
    )
    gpu_warmup_s: float = option(1.0, help="seconds to keep the GPU busy before the first timed run")
    replay_depth: int = option(
        -1,
        help="also time the 2-layer fingerprint with its layers replayed to this "
        "depth: -1 the model's layer count, 0 off (see docs/fingerprint.md, "
        "'replayed depth')",
    )
    replay_distinct: bool = option(
        False,
        help="give every replayed layer tensors of its own where the GPU has "
        "room (the model's memory footprint; an experiment, see "
        "docs/fingerprint.md)",
    )
    batch_sizes: list[int] = option(
        [1, 8, 32, 64],
        type=batch_list,
        help="also time the batching engine's decode step of each fingerprint at these batch sizes on a real "
        "GPU (comma-separated; empty: not, and batched replicas are estimated by the roofline model)",
    )
    simulated_batch_sizes: list[int] = option(
        [],
        type=batch_list,
        help="the same on simulated GPUs, whose workers run on the CPU (default none: there the batched steps "
        "cost more than the rest of the profile, and the roofline model serves a simulation)",
    )
    max_profiling_jobs: int = option(
        2, help="profiling jobs run at once across all models; more registrations wait their turn (status: queued)"
    )
    gpu_stale_s: float = option(5.0, help="ignore GPUs whose last gpu.load is older than this")
    gpu_wait_s: float = option(60.0, help="how long to wait for a GPU agent before failing a profile")
    profile_timeout_s: float = option(900.0, help="a profiling run longer than this is stopped")
    profile_reply_margin_s: float = option(
        30.0, help="how much longer than --profile-timeout-s to wait for the agent's answer before trying another GPU"
    )

    # quality (docs/quality.md)
    quality_method: Literal["auto", "fingerprint", "full", "off"] = option(
        "auto",
        help="how the lossy variants' quality cost is measured at profiling: auto (the whole model up to "
        "--quality-full-max-gib, else its fingerprints), fingerprint, full, or off (not measured)",
    )
    quality_full_max_gib: float = option(1.0, help="auto: the largest checkpoint measured whole, in GiB")
    quality_prompts: int = option(8, help="calibration prompts of the quality measurement")
    quality_tokens: int = option(48, help="tokens per calibration prompt at most")
    quality_timeout_s: float = option(1800.0, help="a quality measurement longer than this is stopped (not measured)")


def parse(argv: list[str] | None = None) -> FingerprintConfig:
    p = argparse.ArgumentParser(
        prog="iserve fingerprint", description="Registers models and profiles their fingerprints."
    )
    add_flags(p, FingerprintConfig)
    a = p.parse_args(argv)
    if max(a.prompt_lengths) + max(a.output_lengths) > a.context_tokens:
        p.error("the longest prompt plus the longest output must fit in --context-tokens")
    if a.max_profiling_jobs < 1:
        p.error("--max-profiling-jobs must be at least 1")
    return from_args(FingerprintConfig, a)
