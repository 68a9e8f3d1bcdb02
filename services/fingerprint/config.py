"""Fingerprint service settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from iserve.settings import common_flags, flag


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(values) < 2 or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"give at least two positive lengths, got {text!r}")
    return values


@dataclass
class FingerprintConfig:
    nats_url: str
    log_level: str
    log_json: bool | None
    work_dir: Path = Path.home() / ".iserve" / "fingerprints"
    context_tokens: int = 2048
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512, 1024])
    output_lengths: list[int] = field(default_factory=lambda: [16, 64])
    repeats: int = 7
    warmup: int = 1
    device_timing: bool = True
    gpu_warmup_s: float = 1.0
    replay_depth: int = -1
    replay_distinct: bool = False
    gpu_stale_s: float = 5.0
    gpu_wait_s: float = 60.0
    profile_timeout_s: float = 900.0
    profile_reply_margin_s: float = 30.0


def parse(argv: list[str] | None = None) -> FingerprintConfig:
    p = argparse.ArgumentParser(prog="iserve fingerprint", description="Registers models and profiles their fingerprints.")
    common_flags(p)
    flag(p, "--fingerprint-dir", default=str(Path.home() / ".iserve" / "fingerprints"), help="where fingerprint checkpoints are written")
    flag(p, "--context-tokens", default=2048, type=int, help="context length the configuration maps (KV cache) are estimated for")
    flag(p, "--prompt-lengths", default=[128, 512, 1024], type=int_list,
         help="prompt lengths TTFT is measured at (comma-separated; 3 or more fit TTFT's quadratic term)")
    flag(p, "--output-lengths", default=[16, 64], type=int_list, help="output lengths TPOT is measured over (comma-separated)")
    flag(p, "--repeats", default=7, type=int,
         help="timed repeats of each fingerprint run (medians kept; fingerprints are cheap and their differences carry the per-layer cost)")
    flag(p, "--warmup", default=1, type=int, help="untimed warm-up rounds of every run")
    flag(p, "--device-timing", default=True, type=bool,
         help="also time the device alone on CUDA when there is no deep run (--replay-depth 0); see docs/fingerprint.md")
    flag(p, "--gpu-warmup-s", default=1.0, type=float, help="seconds to keep the GPU busy before the first timed run")
    flag(p, "--replay-depth", default=-1, type=int,
         help="also time the 2-layer fingerprint with its layers replayed to this depth: -1 the model's layer count, 0 off "
              "(see docs/fingerprint.md, 'replayed depth')")
    flag(p, "--replay-distinct", default=False, type=bool,
         help="give every replayed layer tensors of its own where the GPU has room (the model's memory footprint; an experiment, "
              "see docs/fingerprint.md)")
    flag(p, "--gpu-stale-s", default=5.0, type=float, help="ignore GPUs whose last gpu.load is older than this")
    flag(p, "--gpu-wait-s", default=60.0, type=float, help="how long to wait for a GPU agent before failing a profile")
    flag(p, "--profile-timeout-s", default=900.0, type=float, help="a profiling run longer than this is stopped")
    flag(p, "--profile-reply-margin-s", default=30.0, type=float,
         help="how much longer than --profile-timeout-s to wait for the agent's answer before trying another GPU")
    a = p.parse_args(argv)
    if max(a.prompt_lengths) + max(a.output_lengths) > a.context_tokens:
        p.error("the longest prompt plus the longest output must fit in --context-tokens")
    return FingerprintConfig(
        nats_url=a.nats_url,
        log_level=a.log_level,
        log_json=a.log_json,
        work_dir=Path(a.fingerprint_dir),
        context_tokens=a.context_tokens,
        prompt_lengths=a.prompt_lengths,
        output_lengths=a.output_lengths,
        repeats=a.repeats,
        warmup=a.warmup,
        device_timing=a.device_timing,
        gpu_warmup_s=a.gpu_warmup_s,
        replay_depth=a.replay_depth,
        replay_distinct=a.replay_distinct,
        gpu_stale_s=a.gpu_stale_s,
        gpu_wait_s=a.gpu_wait_s,
        profile_timeout_s=a.profile_timeout_s,
        profile_reply_margin_s=a.profile_reply_margin_s,
    )
