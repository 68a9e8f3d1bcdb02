"""The lifecycle every iServe service shares: subscribe its handlers, flush, run background tasks;
on close unsubscribe first, then cancel the tasks. Subclasses keep only their handlers and hooks."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from . import bus
from .messages import Message


class Service:
    """``start()`` runs ``setup()``, ``subscribe()`` (which calls ``serve``/``listen``), flushes so the
    server holds every subscription when ``start`` returns, then ``started()``. ``close()`` unsubscribes,
    runs ``stopping()``, then cancels and awaits the tasks made with ``spawn``."""

    def __init__(self, nc: NATS):
        self.nc = nc
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ hooks

    async def setup(self) -> None:
        """What the handlers need before the first message (buckets, devices)."""

    async def subscribe(self) -> None:
        """Subscribe the service's handlers with ``serve`` and ``listen``."""

    async def started(self) -> None:
        """After the subscriptions: background tasks, resumed work, the start log line."""

    async def stopping(self) -> None:
        """After unsubscribing, before the spawned tasks are cancelled."""

    # ------------------------------------------------------------------ helpers

    async def serve(
        self,
        subject: str,
        kind: type[Message],
        handler: Callable[[Any, Msg], Awaitable[msgspec.Struct | None]],
        *,
        queue: str = "",
        concurrent: bool = True,
    ) -> None:
        """A request endpoint: ``bus.serve`` answers decode errors and ``IServeError``s as coded replies."""
        self._subs.append(await bus.serve(self.nc, subject, kind, handler, queue=queue, concurrent=concurrent))

    async def listen(self, subject: str, cb: Callable[[Msg], Awaitable[None]]) -> None:
        """A plain subscription (events; ``cb`` decodes and ignores what it cannot read)."""
        self._subs.append(await self.nc.subscribe(subject, cb=cb))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """A background task that ``close`` cancels."""
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.setup()
        await self.subscribe()
        # Subscriptions go out asynchronously; after the flush the server has them, so a request sent
        # right after start() finds this service (CI once got "no responders" without it).
        await self.nc.flush()
        await self.started()

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        self._subs.clear()
        await self.stopping()
        await self._cancel_spawned()
        await self._cancel_spawned()  # what a task spawned while it was being cancelled

    async def _cancel_spawned(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
