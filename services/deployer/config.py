"""Deployer settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from iserve.messages import PlacementPolicy
from iserve.settings import ServiceConfig, add_flags, from_args, option

from .autoscaler import Policy

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
    # autoscaling (autoscaler.py, autoscale_loop.py)
    autoscale: bool = option(False, help="add replicas when latency breaks the intent, remove them at low load")
    autoscale_interval_s: float = option(5.0, help="seconds between autoscaling evaluations")
    autoscale_min_replicas: int = option(1, help="replicas of a model the autoscaler keeps at least")
    autoscale_max_replicas: int = option(4, help="replicas of a model the autoscaler runs at most")
    autoscale_up_windows: int = option(2, help="evaluations in a row over the latency target before adding")
    autoscale_down_windows: int = option(6, help="evaluations in a row of low load before removing")
    autoscale_dwell_s: float = option(60.0, help="no scaling action this soon after the previous one of a model")
    autoscale_latency_factor: float = option(
        2.0, help="latency target of an intent without an SLO: this times the estimate of one request alone"
    )
    autoscale_low_load: float = option(
        0.3, help="remove a replica when the others would run below this share of their capacity"
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
    try:
        autoscale_policy(from_args(DeployerConfig, a))
    except ValueError as e:
        p.error(f"autoscaling settings: {e}")
    if a.autoscale_interval_s <= 0:
        p.error("--autoscale-interval-s must be positive")
    return from_args(DeployerConfig, a)


def autoscale_policy(cfg: DeployerConfig) -> Policy:
    return Policy(
        min_replicas=cfg.autoscale_min_replicas,
        max_replicas=cfg.autoscale_max_replicas,
        up_windows=cfg.autoscale_up_windows,
        down_windows=cfg.autoscale_down_windows,
        min_dwell_s=cfg.autoscale_dwell_s,
        latency_factor=cfg.autoscale_latency_factor,
        low_load=cfg.autoscale_low_load,
    )
