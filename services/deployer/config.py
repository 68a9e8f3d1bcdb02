"""Deployer settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from iserve.settings import common_flags, flag


@dataclass
class DeployerConfig:
    nats_url: str
    log_level: str
    log_json: bool | None
    placement: str = "hybrid"
    theta: float = 0.5
    gpu_stale_s: float = 5.0
    launch_timeout_s: float = 30.0
    reconcile_s: float = 5.0
    replace_failed: bool = True
    max_replacements: int = 3


def parse(argv: list[str] | None = None) -> DeployerConfig:
    p = argparse.ArgumentParser(prog="iserve deployer", description="Intent- and load-aware deployment of profiled models.")
    common_flags(p)
    flag(p, "--placement", default="hybrid", choices=["hybrid", "least-loaded", "packing"], help="GPU placement policy (paper section 6)")
    flag(p, "--theta", default=0.5, type=float, help="hybrid policy: GPUs with load below theta are packable")
    flag(p, "--gpu-stale-s", default=5.0, type=float, help="ignore GPUs whose last gpu.load is older than this")
    flag(p, "--launch-timeout-s", default=30.0, type=float, help="how long an agent may take to start a worker process")
    flag(p, "--reconcile-s", default=5.0, type=float, help="seconds between checks that deployed workers still run")
    flag(p, "--replace-failed", default=True, type=bool, help="re-place a deployment whose worker died")
    flag(p, "--max-replacements", default=3, type=int, help="re-placements of one deployment allowed within 10 minutes")
    a = p.parse_args(argv)
    if not 0.0 <= a.theta <= 1.0:
        p.error("--theta must be between 0 and 1")
    return DeployerConfig(
        nats_url=a.nats_url,
        log_level=a.log_level,
        log_json=a.log_json,
        placement=a.placement,
        theta=a.theta,
        gpu_stale_s=a.gpu_stale_s,
        launch_timeout_s=a.launch_timeout_s,
        reconcile_s=a.reconcile_s,
        replace_failed=a.replace_failed,
        max_replacements=a.max_replacements,
    )
