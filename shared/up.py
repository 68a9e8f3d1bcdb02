"""``iserve up``: start NATS (embedded, authenticated) and every service in the foreground; Ctrl-C or
SIGTERM stops them all. The supervision itself is ``stack.Stack``; this module is its command line."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from . import auth
from .messages import PLACEMENT_POLICIES
from .settings import flag
from .stack import Stack, StackOptions, api_key_of

console = Console()
err_console = Console(stderr=True)


def default_data_dir() -> Path:
    return Path(os.environ.get("ISERVE_DATA_DIR", str(Path.home() / ".iserve")))


def add_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--nats-url",
        default="",
        help="use this NATS server instead of an embedded one",
    )
    s.add_argument(
        "--nats-port",
        type=int,
        default=4222,
        help="port of the embedded NATS server",
    )
    s.add_argument(
        "--data-dir", default=str(default_data_dir()), help="JetStream data, fingerprints, logs [env ISERVE_DATA_DIR]"
    )
    flag(
        s,
        "--nats-auth",
        default=True,
        type=bool,
        help="the embedded NATS server refuses connections without the credentials it writes in <data dir>/credentials",
    )
    flag(s, "--nats-tls-cert", default="", help="the embedded NATS server speaks TLS with this certificate (PEM)")
    flag(s, "--nats-tls-key", default="", help="the private key of --nats-tls-cert (PEM)")
    s.add_argument(
        "--simulate-gpus",
        default="",
        help="e.g. 8x48GB: simulated GPUs whose workers compute on the CPU",
    )
    s.add_argument("--gpu-type", default="", help="type name of the simulated GPUs")
    s.add_argument(
        "--placement",
        default="hybrid",
        choices=PLACEMENT_POLICIES,
        help="the deployer's GPU placement policy",
    )
    s.add_argument(
        "--theta",
        type=float,
        default=0.5,
        help="hybrid placement: GPUs with load below theta are packable",
    )
    flag(
        s,
        "--autoscale",
        default=False,
        type=bool,
        help="the deployer adds replicas when latency breaks the intent and removes them at low load "
        "(its --autoscale-* settings read ISERVE_AUTOSCALE_*)",
    )
    s.add_argument("--log-level", default="info")
    s.add_argument("--http-host", default="127.0.0.1", help="the HTTP API's address")
    s.add_argument("--http-port", type=int, default=8000, help="the HTTP API's port")
    s.add_argument(
        "--api-key",
        default="",
        help="the HTTP API's Bearer key (default: one made and kept in DATA_DIR/api_key)",
    )
    s.add_argument("--no-auth", action="store_true", help="serve the HTTP API without a key (loopback only)")


def run(a: argparse.Namespace) -> int:
    opts = StackOptions(
        http_host=a.http_host,
        http_port=a.http_port,
        api_key="" if a.no_auth else api_key_of(Path(a.data_dir), a.api_key),
        no_auth=a.no_auth,
        data_dir=Path(a.data_dir),
        nats_url=a.nats_url,
        nats_port=a.nats_port,
        simulate_gpus=a.simulate_gpus,
        gpu_type=a.gpu_type,
        placement=a.placement,
        theta=a.theta,
        autoscale=a.autoscale,
        log_level=a.log_level,
        nats_auth=a.nats_auth,
        nats_tls_cert=a.nats_tls_cert,
        nats_tls_key=a.nats_tls_key,
    )
    stack = Stack(opts).start()
    creds = f" {auth.CREDS_ENV}={stack.creds()}" if stack.creds() else ""
    console.print(
        f"[bold]iserve up[/]: NATS at {stack.url} (export ISERVE_NATS_URL={stack.url}{creds}); "
        f"data in {opts.data_dir}. Ctrl-C stops everything."
    )
    key = "your key" if a.api_key else f"key in {Path(a.data_dir) / 'api_key'}"
    key = "no key (--no-auth)" if a.no_auth else key
    console.print(f"OpenAI-compatible API: http://{a.http_host}:{a.http_port}/v1 ({key}); metrics at /metrics")
    try:
        stack.wait()
    finally:
        stack.stop()
    if stack.failed:
        err_console.print(f"iserve: {stack.failed}")
        return 1
    return 0
