"""The gateway service: the HTTP API (``app.Gateway``) served by uvicorn in this process's event loop,
next to a NATS subscription that keeps each GPU's latest load report for ``/metrics``."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import structlog
import uvicorn
from nats.aio.msg import Msg

from iserve import subjects
from iserve.client import Client
from iserve.messages import GpuLoad, decoder
from iserve.service import Service

from .app import Gateway
from .config import GatewayConfig
from .metrics import Metrics

log = structlog.get_logger()


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the process's stop event (``runtime``) ends it."""

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class GatewayService(Service):
    def __init__(self, cfg: GatewayConfig, nc):
        super().__init__(nc)
        self.cfg = cfg
        self.gpu_loads: dict[tuple[str, int], GpuLoad] = {}
        self.metrics = Metrics()
        self.gateway = Gateway(Client(nc), cfg, self.metrics, self.gpu_loads)
        self._server: _Server | None = None
        self._serving: asyncio.Task | None = None
        self._gpu_dec = decoder(GpuLoad)

    async def subscribe(self) -> None:
        await self.listen(subjects.GPU_LOAD_ALL, self._on_gpu_load)
        await self.listen(self.gateway.model_cache.subject, self.gateway.model_cache.on_update)

    async def _on_gpu_load(self, msg: Msg) -> None:
        try:
            g = self._gpu_dec.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.gpu_loads[(g.agent_id, g.gpu_index)] = g

    async def started(self) -> None:
        config = uvicorn.Config(
            self.gateway.app,
            host=self.cfg.http_host,
            port=self.cfg.http_port,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._server = _Server(config)
        self._serving = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._serving.done():  # the port is taken, or the address is wrong
                self._serving.result()
                raise OSError(f"the HTTP API could not listen on {self.cfg.http_host}:{self.cfg.http_port}")
            await asyncio.sleep(0.02)
        log.info(
            "gateway listening",
            url=f"http://{self.cfg.http_host}:{self.cfg.http_port}/v1",
            auth="off (loopback)" if self.cfg.no_auth else "bearer key",
        )

    async def stopping(self) -> None:
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._serving, 10.0)
