"""End to end through the real processes: the `iserve` command, an embedded nats-server, every
service as its own process, simulated GPUs, torch workers on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iserve.natsserver import free_port

pytestmark = pytest.mark.e2e

ISERVE = [sys.executable, "-c", "from iserve.cli import main; main()"]
# Two timed repeats per fingerprint run instead of seven: the flow is the same, CI's 2 CPUs finish sooner.
QUICK = {"ISERVE_REPEATS": "2"}
# The CLI flow without the quality measurement (tests/test_quality_measure.py and the demo test run it).
QUICK_NO_QUALITY = {**QUICK, "ISERVE_QUALITY_METHOD": "off"}


def iserve(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ISERVE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            pids.append(int(p.name))
    return pids


def test_demo_runs_the_whole_flow(tmp_path):
    r = iserve(
        "demo", "--data-dir", str(tmp_path / "demo"), "--max-tokens", "12", "--simulate-gpus", "2x16GB", env=QUICK
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for words in (
        "registered demo-llama",
        "configurations estimated",
        "chose tp1-",
        "why:",
        "12 tokens streamed",
        "/chat/completions ->",
    ):
        assert words in out, out
    assert not processes_mentioning(str(tmp_path / "demo")), "the demo left processes behind"


def test_up_cli_and_clean_shutdown(tmp_path):
    data = tmp_path / "stack"
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    env = {"ISERVE_NATS_URL": url, "ISERVE_NATS_CREDS": str(data / "credentials" / "client.json")}
    up = subprocess.Popen(
        [
            *ISERVE,
            "up",
            "--data-dir",
            str(data),
            "--nats-port",
            str(port),
            "--simulate-gpus",
            "2x16GB",
            "--log-level",
            "warning",
            "--http-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **QUICK_NO_QUALITY, "ISERVE_NATS_URL": ""},
    )
    try:
        model = tmp_path / "m"
        assert iserve("make-model", str(model), "--layers", "6").returncode == 0
        deadline = time.monotonic() + 60
        while True:  # services start in parallel; registering waits for the fingerprint service
            r = iserve("register", str(model), env=env)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "profiled on sim-16GB" in r.stdout
        r = iserve("profile", "show", "m", "--limit", "3", env=env)
        assert r.returncode == 0 and "tp1-pp1" in r.stdout, r.stdout + r.stderr
        r = iserve("deploy", "m", "--intent", "min-memory", env=env)
        assert r.returncode == 0 and "ready" in r.stdout, r.stdout + r.stderr
        r = iserve("generate", "m", "hi", "--max-tokens", "5", "--ignore-eos", env=env)
        assert r.returncode == 0 and "5 tokens" in r.stderr, r.stdout + r.stderr
        r = iserve("status", env=env)
        assert r.returncode == 0 and "ready" in r.stdout and "profiled" in r.stdout, r.stdout + r.stderr
        r = iserve("status", "--json", env=env)
        status = json.loads(r.stdout)
        assert [d["status"] for d in status["deployments"]["deployments"]] == ["ready"], r.stdout
        assert status["models"]["models"][0]["name"] == "m" and status["queues"]["queues"][0]["max_batch"] >= 1
        cmap = json.loads(iserve("profile", "show", "m", "--json", env=env).stdout)
        assert cmap["model"] == "m" and cmap["estimates"]
        r = iserve("deploy", "nope", env=env)
        assert r.returncode == 2 and "not_found" in r.stderr
        # the bus refuses a connection without credentials, with a sentence, in seconds
        t = time.monotonic()
        r = iserve("status", env={**env, "ISERVE_NATS_CREDS": "", "ISERVE_DATA_DIR": str(tmp_path / "elsewhere")})
        said = " ".join(r.stderr.split())  # the console wraps long lines
        assert r.returncode == 2 and "refused a connection without credentials" in said, r.stdout + r.stderr
        assert time.monotonic() - t < 15 and "Authorization Violation" not in r.stdout
    finally:
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    time.sleep(0.5)
    assert not processes_mentioning(str(data)), "iserve up left processes behind"

    # JetStream kept the registered model and its profile across a full restart
    up2 = subprocess.Popen(
        [
            *ISERVE,
            "up",
            "--data-dir",
            str(data),
            "--nats-port",
            str(port),
            "--simulate-gpus",
            "2x16GB",
            "--log-level",
            "warning",
            "--http-port",
            str(free_port()),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **QUICK, "ISERVE_NATS_URL": ""},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            r = iserve("profile", "show", "m", "--limit", "1", env=env)
            if r.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.returncode == 0 and "tp1-pp1" in r.stdout, r.stdout + r.stderr
    finally:
        up2.send_signal(signal.SIGINT)
        up2.wait(timeout=60)


def test_sigterm_stops_the_whole_stack(tmp_path):
    """What docker stop, systemd and kill send: every service and NATS stop with `iserve up`."""
    import urllib.request

    data = tmp_path / "stack"
    http = free_port()
    up = subprocess.Popen(
        [*ISERVE, "up", "--data-dir", str(data), "--nats-port", str(free_port()), "--http-port", str(http)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "ISERVE_NATS_URL": "", "ISERVE_SIMULATE_GPUS": "1x8GB"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the gateway answers once the stack is up
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway never answered"
                time.sleep(0.5)
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
        assert not processes_mentioning(str(data)), "services outlived `iserve up`"
        assert not processes_mentioning(f"--http-port {http}"), "the gateway outlived `iserve up`"
    finally:
        if up.poll() is None:
            up.kill()


def test_a_command_without_nats_fails_within_seconds_with_a_sentence():
    t0 = time.monotonic()
    r = iserve("status", "--nats-url", f"nats://127.0.0.1:{free_port()}", timeout=60)
    assert r.returncode != 0 and "cannot reach NATS" in r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
