"""How every process runs its event loop: uvloop when installed; a service's SIGINT/SIGTERM set a stop
event, its resources in an ``AsyncExitStack`` so that they close in reverse order whatever happens."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from nats.aio.client import Client as NATS

from . import bus, logs
from .service import Service

T = TypeVar("T")


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not supported
            pass


def run(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)`` on uvloop (when installed) until it returns."""

    async def _wrapped() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await main(stop)

    try:
        import uvloop

        uvloop.run(_wrapped())
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        asyncio.run(_wrapped())


def service_main(
    name: str,
    parse: Callable[[list[str] | None], Any],
    build: Callable[[Any, NATS], Awaitable[Service]],
    argv: list[str] | None = None,
) -> None:
    """The whole life of a service process: parse flags (env twins included), configure logging,
    connect to NATS, ``build(cfg, nc)`` the service, ``start()`` it, wait for SIGINT/SIGTERM, then
    ``close()`` it and drain the connection, in that order."""
    cfg = parse(argv)

    async def amain(stop: asyncio.Event) -> None:
        log = logs.configure(name, level=cfg.log_level, json=cfg.log_json)
        async with AsyncExitStack() as stack:
            nc = await bus.connect(cfg.nats_url, name, creds=cfg.nats_creds or None)
            stack.push_async_callback(nc.drain)
            service = await build(cfg, nc)
            stack.push_async_callback(service.close)
            await service.start()
            await stop.wait()
            log.info(f"{name} stopping")

    try:
        run(amain)
    except Exception as e:  # configuration or connection problems: one clear line, exit 1
        print(f"{name}: {e}", file=sys.stderr)
        sys.exit(1)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine to completion on uvloop (when installed) and return its result."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; kept for odd platforms
        return asyncio.run(coro)
    return uvloop.run(coro)
