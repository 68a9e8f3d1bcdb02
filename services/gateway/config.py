"""Gateway settings: every flag has an ISERVE_* environment twin."""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass

from iserve.errors import BadRequest
from iserve.settings import ServiceConfig, add_flags, from_args, option


@dataclass
class GatewayConfig(ServiceConfig):
    http_host: str = option("127.0.0.1", help="address the HTTP API listens on")
    http_port: int = option(8000, help="port of the HTTP API")
    api_key: str = option("", help="the Bearer key clients must send; required unless --no-auth on a loopback host")
    no_auth: bool = option(False, help="serve without an API key (refused unless --http-host is a loopback address)")
    request_timeout_s: float = option(300.0, help="how long one request may wait and run")
    default_max_tokens: int = option(256, help="max_tokens of a chat completion that sets none")
    model_cache_s: float = option(
        30.0, help="a cached model record is asked for again after this long (updates arrive at once); 0: no cache"
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(cfg: GatewayConfig) -> GatewayConfig:
    """Refuse a gateway without a key, unless explicitly so on a loopback address."""
    if cfg.no_auth and not is_loopback(cfg.http_host):
        raise BadRequest(
            f"--no-auth serves anyone who can reach {cfg.http_host}; it is allowed on a loopback address only. "
            "Set --api-key (ISERVE_API_KEY) instead."
        )
    if not cfg.api_key and not cfg.no_auth:
        raise BadRequest("set an API key with --api-key (ISERVE_API_KEY), or --no-auth on a loopback address.")
    return cfg


def parse(argv: list[str] | None = None) -> GatewayConfig:
    p = argparse.ArgumentParser(
        prog="iserve gateway", description="The OpenAI-compatible HTTP API, /metrics, /health and /ready."
    )
    add_flags(p, GatewayConfig)
    return check(from_args(GatewayConfig, p.parse_args(argv)))
