"""Scheduler settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from iserve.settings import ServiceConfig, add_flags, from_args, option


@dataclass
class SchedulerConfig(ServiceConfig):
    refresh_s: float = option(2.0, help="seconds between deployment list refreshes (events arrive in between)")
    worker_accept_timeout_s: float = option(10.0, help="how long a worker may take to accept a request")
    stream_idle_timeout_s: float = option(120.0, help="a worker silent this long mid-stream is considered dead")
    client_check_s: float = option(2.0, help="how often a running request checks that its client still listens")
    client_probe_timeout_s: float = 0.25
    max_queued: int = option(
        1000,
        help="requests waiting per replica beyond which a new one is refused with `overloaded` (HTTP 429; 0: no limit)",
    )
    keepalive_s: float = option(
        1.0, help="send each held request's client an empty keep-alive this often, so it can tell we died (0: never)"
    )
    worker_silent_s: float = option(
        5.0, help="a running request whose worker sends no heartbeat this long fails with worker_died"
    )
    publish_load_s: float = option(
        1.0, help="publish each replica's queue and recent latency (scheduler.load: autoscaling) this often (0: never)"
    )


def parse(argv: list[str] | None = None) -> SchedulerConfig:
    p = argparse.ArgumentParser(
        prog="iserve scheduler", description="FCFS request scheduling per deployment, streaming tokens back."
    )
    add_flags(p, SchedulerConfig)
    return from_args(SchedulerConfig, p.parse_args(argv))
