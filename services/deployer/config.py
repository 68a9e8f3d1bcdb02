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
    reconcile_s: float = option(2.0, help="seconds between reconciliations (deployed workers still run, else relaunch)")
    replace_failed: bool = option(True, help="relaunch or re-place a deployment whose worker or agent is gone")
    max_replacements: int = option(3, help="relaunches of one deployment allowed within 10 minutes, then it fails")
    heartbeat_stale_s: float = option(5.0, help="a worker whose heartbeats stop this long is gone (unless listed)")
    launch_grace_s: float = option(10.0, help="a worker launched this recently is not yet expected in any report")
    startup_grace_s: float = option(
        3.0, help="after starting or reconnecting, observe this long before concluding that a worker is gone"
    )
    failed_ttl_s: float = option(3600.0, help="a deployment the deployer gave up on is deleted this long after")
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
