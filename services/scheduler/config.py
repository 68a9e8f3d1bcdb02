"""Scheduler settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from iserve.settings import common_flags, flag


@dataclass
class SchedulerConfig:
    nats_url: str
    log_level: str
    log_json: bool | None
    refresh_s: float = 2.0
    worker_accept_timeout_s: float = 10.0
    stream_idle_timeout_s: float = 120.0
    client_check_s: float = 2.0
    client_probe_timeout_s: float = 0.25


def parse(argv: list[str] | None = None) -> SchedulerConfig:
    p = argparse.ArgumentParser(prog="iserve scheduler", description="FCFS request scheduling per deployment, streaming tokens back.")
    common_flags(p)
    flag(p, "--refresh-s", default=2.0, type=float, help="seconds between deployment list refreshes (events arrive in between)")
    flag(p, "--worker-accept-timeout-s", default=10.0, type=float, help="how long a worker may take to accept a request")
    flag(p, "--stream-idle-timeout-s", default=120.0, type=float, help="a worker silent this long mid-stream is considered dead")
    flag(p, "--client-check-s", default=2.0, type=float, help="how often a running request checks that its client still listens")
    a = p.parse_args(argv)
    return SchedulerConfig(
        nats_url=a.nats_url,
        log_level=a.log_level,
        log_json=a.log_json,
        refresh_s=a.refresh_s,
        worker_accept_timeout_s=a.worker_accept_timeout_s,
        stream_idle_timeout_s=a.stream_idle_timeout_s,
        client_check_s=a.client_check_s,
    )
