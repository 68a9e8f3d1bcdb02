"""Deployer settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from iserve.messages import PlacementPolicy
from iserve.settings import ServiceConfig, add_flags, from_args, option

DEFAULT_MAX_BATCH = 8  # requests a replica runs at once unless a deploy asks otherwise


@dataclass
class DeployerConfig(ServiceConfig):
    placement: PlacementPolicy = option("hybrid", help="GPU placement policy (paper section 6)")
    theta: float = option(0.5, help="hybrid policy: GPUs with load below theta are packable")
    gpu_stale_s: float = option(5.0, help="ignore GPUs whose last gpu.load is older than this")
    launch_timeout_s: float = option(30.0, help="how long an agent may take to start a worker process")
    reconcile_s: float = option(5.0, help="seconds between checks that deployed workers still run")
    replace_failed: bool = option(True, help="re-place a deployment whose worker died")
    max_replacements: int = option(3, help="re-placements of one deployment allowed within 10 minutes")
    default_max_batch: int = option(
        DEFAULT_MAX_BATCH,
        help="requests a replica runs at once (continuous batching) when a deploy asks for 0; 1: one at a time",
    )


def parse(argv: list[str] | None = None) -> DeployerConfig:
    p = argparse.ArgumentParser(
        prog="iserve deployer", description="Intent- and load-aware deployment of profiled models."
    )
    add_flags(p, DeployerConfig)
    a = p.parse_args(argv)
    if not 0.0 <= a.theta <= 1.0:
        p.error("--theta must be between 0 and 1")
    if a.default_max_batch < 1:
        p.error("--default-max-batch must be at least 1")
    return from_args(DeployerConfig, a)
