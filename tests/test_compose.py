"""Check statically that the compose file only names things that exist: every service command is an
`iserve` sub-command whose flags parse, every Dockerfile COPY source exists, the GPU agent reserves
NVIDIA devices (and compose.cpu.yaml takes that back), NATS runs with JetStream on a volume, and the
base images are variables whose defaults are the public images. The stack itself runs, with podman on
the CPU, in deploy/compose/test-local.sh (the opt-in test at the end: ISERVE_COMPOSE_TEST=1)."""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "deploy" / "compose" / "compose.yaml"
CPU_OVERRIDE = ROOT / "deploy" / "compose" / "compose.cpu.yaml"
LOCAL_TEST = ROOT / "deploy" / "compose" / "test-local.sh"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` tag (an override file drops what the base file set)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": True})


def _default(value: str) -> str:
    """The default of a `${VAR:-default}` value (a Docker host without the variable gets this)."""
    m = re.fullmatch(r"\$\{ISERVE_[A-Z_]+:-([^}]+)\}", value)
    assert m, value
    return m.group(1)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["iserve"] == "iserve.cli:main"
    importlib.import_module("iserve.cli").build_parser()


def test_every_service_command_exists_and_parses(compose, monkeypatch):
    from iserve.cli import SERVICES, build_parser

    for name, svc in compose["services"].items():
        if name in ("nats", "nats-config"):  # nats-config writes files and talks to no NATS (tested below)
            continue
        cmd = svc["command"]
        for key, value in svc.get("environment", {}).items():  # as the container sees them (unexpanded)
            monkeypatch.setenv(key, str(value))
        if cmd[0] in SERVICES:
            mod = importlib.import_module(SERVICES[cmd[0]].removesuffix(".__main__") + ".config")
            mod.parse(cmd[1:])  # raises SystemExit on an unknown flag
        else:
            build_parser().parse_args(cmd)
        env = {**svc.get("environment", {})}
        assert env.get("ISERVE_NATS_URL") == "nats://nats:4222", name


def test_gpu_agent_reserves_gpus_and_nats_has_jetstream(compose):
    devices = compose["services"]["gpu-agent"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    nats = compose["services"]["nats"]
    assert "-js" in nats["command"] and any(v.endswith(":/data") for v in nats["volumes"])


def test_dockerfiles_copy_existing_paths(compose):
    files = {svc["build"]["dockerfile"] for svc in compose["services"].values() if "build" in svc}
    assert files
    for f in files:
        text = (ROOT / f).read_text()
        assert re.search(r'ENTRYPOINT \["iserve"\]', text), f
        for src in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
            for s in src.split():
                assert (ROOT / s).exists(), f"{f} copies {s}, which does not exist"


def test_the_gateway_is_published_on_the_host_only_with_a_key_and_a_health_check(compose):
    gw = compose["services"]["gateway"]
    assert gw["ports"] == ["127.0.0.1:${ISERVE_HTTP_PORT:-8000}:8000"]
    assert gw["environment"]["ISERVE_API_KEY"].startswith("${ISERVE_API_KEY:?")  # compose refuses to start without one
    assert "/health" in " ".join(gw["healthcheck"]["test"])


def test_images_are_pinned_nats_stays_on_the_host_and_nccl_gets_shared_memory(compose):
    services = compose["services"]
    assert services["nats"]["ports"] == ["127.0.0.1:${ISERVE_NATS_PORT:-4222}:4222"]
    assert re.fullmatch(r"nats:\d+\.\d+\.\d+-alpine", _default(services["nats"]["image"]))
    assert services["gpu-agent"]["ipc"] == "host"
    base = ROOT / "deploy" / "compose"
    cpu, gpu = (base / "Dockerfile").read_text(), (base / "Dockerfile.gpu").read_text()
    assert "ARG PYTHON_IMAGE=python:3.12.8-slim\nFROM ${PYTHON_IMAGE}\n" in cpu
    torch_image = r"ARG TORCH_IMAGE=pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-devel"
    assert re.search(torch_image + r"\n(#.*\n)*FROM \$\{TORCH_IMAGE\}", gpu)


def test_base_images_are_variables_whose_defaults_are_the_dockerfiles(compose):
    """A Docker host without the variables builds from the public images, as before; test-local.sh sets them."""
    base = ROOT / "deploy" / "compose"
    dockerfile_args = {}
    for f in ("Dockerfile", "Dockerfile.gpu"):
        dockerfile_args[f] = dict(re.findall(r"^ARG (\w+)=(\S+)$", (base / f).read_text(), re.M))
    for name, svc in compose["services"].items():
        if "build" not in svc:
            continue
        args = svc["build"]["args"]
        declared = dockerfile_args[Path(svc["build"]["dockerfile"]).name]
        assert args and set(args) == set(declared), name
        for arg, value in args.items():
            assert _default(value) == declared[arg], (name, arg)
    script = LOCAL_TEST.read_text()
    for var in ("ISERVE_PYTHON_IMAGE", "ISERVE_TORCH_IMAGE", "ISERVE_NATS_IMAGE", "ISERVE_TORCH_VERSION"):
        assert f"export {var}=" in script, var


def test_the_cpu_override_drops_the_gpu_reservation_and_simulates_gpus():
    override = yaml.load(CPU_OVERRIDE.read_text(), Loader=_ComposeLoader)
    agent = override["services"]["gpu-agent"]
    assert agent["deploy"] == {"!reset": True}
    assert _default(agent["environment"]["ISERVE_SIMULATE_GPUS"]) == "2x24GB"
    from iserve.cli import SERVICES

    mod = importlib.import_module(SERVICES["gpu-agent"].removesuffix(".__main__") + ".config")
    mod.parse(["--simulate-gpus", "2x24GB"])  # the flag whose environment twin the override sets


def test_the_local_run_is_a_strict_script_that_uses_both_files():
    script = LOCAL_TEST.read_text()
    assert os.access(LOCAL_TEST, os.X_OK)
    assert "set -euo pipefail" in script
    assert '-f "$HERE/compose.yaml" -f "$HERE/compose.cpu.yaml"' in script


def test_the_build_context_leaves_out_models_venvs_and_git():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "models", "**/*.safetensors", "results"):
        assert entry in ignored, entry
    # ... but keeps what the Dockerfiles copy
    for kept in ("shared", "services", "loadgen", "pyproject.toml", "README.md"):
        assert kept not in ignored, kept


def test_nats_authenticates_every_service_with_its_own_role(compose, tmp_path):
    from iserve import auth
    from iserve.cli import build_parser

    services = compose["services"]
    init = services["nats-config"]
    assert init["command"][0] == "nats-config" and build_parser().parse_args(init["command"])
    assert services["nats"]["depends_on"]["nats-config"]["condition"] == "service_completed_successfully"
    nats_cmd = services["nats"]["command"]
    assert nats_cmd[nats_cmd.index("-c") + 1] == "/secrets/nats/nats.conf"
    roles = {"gpu-agent": "agent", "fingerprint": "fingerprint", "deployer": "deployer", "scheduler": "scheduler",
             "gateway": "gateway", "cli": "client"}  # fmt: skip
    for name, role in roles.items():
        assert services[name]["environment"]["ISERVE_NATS_CREDS"] == f"/secrets/credentials/{role}.json", name
        assert any(v.startswith("iserve-secrets:/secrets") for v in services[name]["volumes"]), name
    # what nats-config writes there: the files the services name, and a config nats-server accepts
    conf = auth.write_server_files(tmp_path)
    assert conf == tmp_path / "nats" / "nats.conf"
    assert {p.stem for p in (tmp_path / "credentials").iterdir()} == set(auth.ROLES)


@pytest.mark.compose
@pytest.mark.skipif(os.environ.get("ISERVE_COMPOSE_TEST") != "1", reason="opt-in: ISERVE_COMPOSE_TEST=1 (minutes)")
@pytest.mark.skipif(os.geteuid() != 0, reason="runs rootful podman: needs root")
@pytest.mark.skipif(shutil.which("podman") is None, reason="no podman (deploy/compose/test-local.sh installs it)")
def test_compose_up_runs_end_to_end_with_podman():
    """deploy/compose/test-local.sh: the whole stack in containers, a model registered, deployed,
    streamed over HTTP, and found again after `compose down` and `up`."""
    run = subprocess.run(["bash", str(LOCAL_TEST)], capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert run.stdout.rstrip().endswith("PASS")
