"""GPU agent settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from iserve.settings import ServiceConfig, add_flags, from_args, option


@dataclass
class AgentConfig(ServiceConfig):
    agent_id: str = option(
        socket.gethostname().split(".")[0].replace(" ", "-") or "agent", help="this agent's id (unique per host)"
    )
    simulate_gpus: str = option(
        "", help="present simulated GPUs instead of NVML ones, e.g. 8x48GB; workers then compute on the CPU"
    )
    gpu_type: str = option("", help="GPU type name for simulated GPUs (default sim-<size>GB)")
    interval_s: float = option(1.0, help="seconds between gpu.load reports")
    load_window_s: float = option(120.0, help="sliding window of the busy fraction (paper: 120 s)")
    work_dir: Path = option(Path.home() / ".iserve" / "agent", help="worker logs and job files")
    profile_timeout_s: float = option(900.0, help="a profiling run longer than this is killed")
    worker_stale_s: float = option(
        30.0, help="a serving worker whose heartbeats stop for this long is killed and reported as exited (0: never)"
    )
    pin_cpus: bool = option(
        True, help="pin tensor-parallel worker and profiling ranks to the CPUs NVML lists as close to their GPU"
    )
    verify_launches: bool = option(
        True,
        help="check each launch's model path against the model registry (the fingerprint service) before starting it",
    )


def parse(argv: list[str] | None = None) -> AgentConfig:
    p = argparse.ArgumentParser(
        prog="iserve gpu-agent", description="Reports GPU load every second and runs model workers."
    )
    add_flags(p, AgentConfig)
    return from_args(AgentConfig, p.parse_args(argv))
