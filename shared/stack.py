"""``iserve up``: an embedded nats-server (unless a URL is given) and every service as its own
process, supervised: a service or the nats-server that dies is restarted with back-off (and the stack
stops if one keeps dying); a service that exits cleanly (code 0: someone stopped it) stays stopped;
Ctrl-C or SIGTERM stops them all, services first, then NATS.

The embedded server authenticates every connection (``auth``): each service runs as its role's user,
with credentials from ``<data dir>/credentials`` passed in its environment (``ISERVE_NATS_CREDS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import auth
from .natsserver import EmbeddedNats

SERVICES = ("gpu-agent", "fingerprint", "deployer", "scheduler", "gateway")
MAX_RESTARTS = 5  # within RESTART_WINDOW_S, then the stack gives up
RESTART_WINDOW_S = 60.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    log_path: Path | None = None


@dataclass
class StackOptions:
    data_dir: Path
    nats_url: str = ""  # empty: start an embedded server
    nats_port: int = 0
    simulate_gpus: str = ""  # empty: NVML GPUs (a simulated 24 GB GPU when there is no driver)
    gpu_type: str = ""
    agent_id: str = "agent-0"
    placement: str = "hybrid"
    theta: float = 0.5
    autoscale: bool = False  # the deployer's --autoscale (its other settings: ISERVE_AUTOSCALE_* in the environment)
    log_to_files: bool = False
    log_level: str = "info"
    extra_env: dict[str, str] = field(default_factory=dict)
    fingerprint_args: list[str] = field(default_factory=list)
    services: tuple[str, ...] = SERVICES  # which services to run (a caller may run one itself, in-process)
    http_host: str = "127.0.0.1"  # the gateway's HTTP API
    http_port: int = 8000
    api_key: str = ""  # passed to the gateway in its environment (ISERVE_API_KEY), not on its command line
    no_auth: bool = False
    nats_auth: bool = True  # the embedded server refuses connections without credentials
    nats_tls_cert: str = ""  # with nats_tls_key: the embedded server speaks TLS only
    nats_tls_key: str = ""


ROLE_OF: dict[str, auth.Role] = {
    "gpu-agent": "agent",
    "fingerprint": "fingerprint",
    "deployer": "deployer",
    "scheduler": "scheduler",
    "gateway": "gateway",
}


def api_key_of(data_dir: Path, given: str = "") -> str:
    """``given``, else the key kept in ``data_dir/api_key`` (made, readable by its owner only, on first use)."""
    if given:
        return given
    path = data_dir / "api_key"
    if path.is_file():
        return path.read_text().strip()
    import secrets

    key = "isk-" + secrets.token_urlsafe(24)
    auth.write_private(path, key + "\n")
    return key


class Stack:
    def __init__(self, opts: StackOptions):
        self.opts = opts
        self.nats: EmbeddedNats | None = None
        self.url = opts.nats_url
        self.children: list[Child] = []
        self.failed: str = ""
        self._nats_restarts: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> "Stack":
        if self._thread is not None:
            raise RuntimeError("this Stack is already started (`with Stack(...)` starts it)")
        d = self.opts.data_dir
        d.mkdir(parents=True, exist_ok=True)
        if not self.url:
            o = self.opts
            passwords = auth.ensure_credentials(d) if o.nats_auth else {}
            config = auth.server_config(passwords, tls_cert=o.nats_tls_cert, tls_key=o.nats_tls_key)
            self.nats = EmbeddedNats(d / "nats", port=o.nats_port, config=config, tls=bool(o.nats_tls_cert)).start()
            self.url = self.nats.url
        py = [sys.executable, "-m"]
        agent = py + ["iserve.gpu_agent", "--agent-id", self.opts.agent_id, "--work-dir", str(d / "agent")]
        if self.opts.simulate_gpus:
            agent += ["--simulate-gpus", self.opts.simulate_gpus]
        if self.opts.gpu_type:
            agent += ["--gpu-type", self.opts.gpu_type]
        self.children = [
            Child("gpu-agent", agent),
            Child(
                "fingerprint",
                py + ["iserve.fingerprint", "--fingerprint-dir", str(d / "fingerprints"), *self.opts.fingerprint_args],
            ),
            Child(
                "deployer",
                py
                + ["iserve.deployer", "--placement", self.opts.placement, "--theta", str(self.opts.theta)]
                + (["--autoscale"] if self.opts.autoscale else []),
            ),
            Child("scheduler", py + ["iserve.scheduler"]),
            Child(
                "gateway",
                py
                + ["iserve.gateway", "--http-host", self.opts.http_host, "--http-port", str(self.opts.http_port)]
                + (["--no-auth"] if self.opts.no_auth else []),
            ),
        ]
        self.children = [c for c in self.children if c.name in self.opts.services]
        for c in self.children:
            self._launch(c)
        self._thread = threading.Thread(target=self._supervise, name="iserve-supervisor", daemon=True)
        self._thread.start()
        return self

    @property
    def authenticated(self) -> bool:
        return self.nats is not None and self.opts.nats_auth

    def creds(self, role: auth.Role = "client") -> str:
        """The credentials file of ``role`` on the embedded server ("" when it needs none)."""
        return str(auth.creds_path(self.opts.data_dir, role)) if self.authenticated else ""

    def _env(self, c: Child) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.opts.extra_env)
        env["ISERVE_NATS_URL"] = self.url
        if self.authenticated:
            env[auth.CREDS_ENV] = self.creds(ROLE_OF[c.name])
        env["ISERVE_LOG_LEVEL"] = self.opts.log_level
        if self.opts.api_key:
            env["ISERVE_API_KEY"] = self.opts.api_key
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _launch(self, c: Child) -> None:
        if self.opts.log_to_files:
            logs = self.opts.data_dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            c.log_path = logs / f"{c.name}.log"
            out = open(c.log_path, "ab")
        else:
            out = None
        try:
            c.proc = subprocess.Popen(c.argv, env=self._env(c), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        finally:
            if out is not None:
                out.close()

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            if self.nats is not None and not self.nats.running():
                self._restart_nats()
            for c in self.children:
                if c.proc is None or c.proc.poll() is None:
                    continue
                code = c.proc.returncode
                if code == 0:  # stopped on purpose (SIGTERM/SIGINT): leave it stopped
                    print(f"iserve: {c.name} exited cleanly; not restarting it", file=sys.stderr)
                    c.proc = None
                    continue
                if not self._may_restart(c.name, c.restarts, f"last code {code}", c.log_path):
                    return
                print(f"iserve: {c.name} (pid {c.proc.pid}) exited with code {code}; restarting", file=sys.stderr)
                time.sleep(min(2 ** (len(c.restarts) - 1) * 0.25, 5.0))
                if not self._stop.is_set():
                    self._launch(c)

    def _may_restart(self, name: str, restarts: list[float], why: str, log: Path | None) -> bool:
        """Count a restart of ``name``; False (and the stack stops) when it keeps dying."""
        now = time.monotonic()
        restarts[:] = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
        if len(restarts) <= MAX_RESTARTS:
            return True
        where = f"; see {log}" if log else ""
        self.failed = f"{name} exited {len(restarts)} times within {RESTART_WINDOW_S:.0f} s ({why}){where}"
        self._stop.set()
        return False

    def _restart_nats(self) -> None:
        """The embedded server died: start it again on the same port and data (JetStream state is on
        disk); the services reconnect on their own."""
        assert self.nats is not None
        code = self.nats.proc.returncode if self.nats.proc is not None else None
        if not self._may_restart("nats-server", self._nats_restarts, f"last code {code}", self.nats.log_file):
            return
        print(f"iserve: nats-server exited with code {code}; restarting", file=sys.stderr)
        try:
            self.nats.start()
        except Exception as e:  # the port taken meanwhile, the binary gone: retried on the next tick
            print(f"iserve: nats-server did not restart: {e}", file=sys.stderr)

    def wait(self) -> None:
        """Block until Ctrl-C, SIGTERM (what ``docker stop``, systemd and ``kill`` send) or until a
        service keeps dying; the caller then ``stop()``s the services, so none is left behind."""
        import signal

        def on_term(signum, frame) -> None:
            self._stop.set()

        previous = (
            signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
        )
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        procs = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 15
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.nats is not None:
            self.nats.stop()

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
