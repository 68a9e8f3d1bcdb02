"""GPU agent settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from iserve.settings import common_flags, flag


@dataclass
class AgentConfig:
    nats_url: str
    log_level: str
    log_json: bool | None
    agent_id: str
    simulate_gpus: str
    gpu_type: str
    interval_s: float
    load_window_s: float
    work_dir: Path
    profile_timeout_s: float
    worker_stale_s: float = 30.0
    pin_cpus: bool = True


def parse(argv: list[str] | None = None) -> AgentConfig:
    p = argparse.ArgumentParser(prog="iserve gpu-agent", description="Reports GPU load every second and runs model workers.")
    common_flags(p)
    flag(p, "--agent-id", default=socket.gethostname().split(".")[0].replace(" ", "-") or "agent", help="this agent's id (unique per host)")
    flag(p, "--simulate-gpus", default="", help="present simulated GPUs instead of NVML ones, e.g. 8x48GB; workers then compute on the CPU")
    flag(p, "--gpu-type", default="", help="GPU type name for simulated GPUs (default sim-<size>GB)")
    flag(p, "--interval-s", default=1.0, type=float, help="seconds between gpu.load reports")
    flag(p, "--load-window-s", default=120.0, type=float, help="sliding window of the busy fraction (paper: 120 s)")
    flag(p, "--work-dir", default=str(Path.home() / ".iserve" / "agent"), help="worker logs and job files")
    flag(p, "--profile-timeout-s", default=900.0, type=float, help="a profiling run longer than this is killed")
    flag(p, "--worker-stale-s", default=30.0, type=float,
         help="a serving worker whose heartbeats stop for this long is killed and reported as exited (0: never)")
    flag(p, "--pin-cpus", default=True, type=bool,
         help="pin tensor-parallel worker and profiling ranks to the CPUs NVML lists as close to their GPU")
    a = p.parse_args(argv)
    return AgentConfig(
        nats_url=a.nats_url,
        log_level=a.log_level,
        log_json=a.log_json,
        agent_id=a.agent_id,
        simulate_gpus=a.simulate_gpus,
        gpu_type=a.gpu_type,
        interval_s=a.interval_s,
        load_window_s=a.load_window_s,
        work_dir=Path(a.work_dir),
        profile_timeout_s=a.profile_timeout_s,
        worker_stale_s=a.worker_stale_s,
        pin_cpus=a.pin_cpus,
    )
