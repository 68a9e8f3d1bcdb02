"""The worker's request loop with continuous batching (``LaunchWorker.max_batch > 1``).

An engine thread steps a ``engine.batch.BatchEngine`` while it has work; the event loop admits
requests (``submit``), relays cancellations and streams every token the steps produce, in order,
through one publisher task. A request the engine can never run is refused at once with its coded
error; a step that fails ends every sequence in the batch with an ``internal`` error and the worker
goes on. ``max_batch == 1`` keeps the one-at-a-time ``worker.WorkerServer`` (the paper's mode).
See docs/engine.md#continuous-batching.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from nats.aio.msg import Msg

from iserve import errors
from iserve.messages import (
    Accepted,
    CancelRequest,
    ErrorReply,
    GenerateRequest,
    LaunchWorker,
    TokenChunk,
    WorkerHeartbeat,
    encode,
)

from .prompts import prompt_ids
from .serving import heartbeat_loop, send_completion

if TYPE_CHECKING:
    from .engine.batch import BatchEngine, Event
    from .engine.tokenizer import StreamDecoder

log = structlog.get_logger()


@dataclass
class _Stream:
    req: GenerateRequest
    prompt_tokens: int
    decoder: StreamDecoder
    t0: float = field(default_factory=time.perf_counter)
    index: int = 0
    pieces: list[str] = field(default_factory=list)


class BatchServer:
    """Serves one deployment's requests many at a time on a ``BatchEngine``."""

    def __init__(self, nc, spec: LaunchWorker, batch: BatchEngine, agent_id: str, device: str):
        self.nc = nc
        self.spec = spec
        self.batch = batch
        self.agent_id = agent_id
        self.device = device
        self.busy_seconds = 0.0
        self.requests_done = 0
        self._streams: dict[str, _Stream] = {}
        self._out: asyncio.Queue[list[Event] | None] = asyncio.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._publisher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._publisher = asyncio.create_task(self._publish_loop())
        self._thread = threading.Thread(target=self._engine_loop, name="batch-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
        await self._out.put(None)
        if self._publisher is not None:
            await self._publisher

    # -- the engine thread -------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        assert self._loop is not None
        while not self._stop.is_set():
            if not self.batch.wait_for_work(0.1):
                continue
            t0 = time.monotonic()
            try:
                events = self.batch.step()
            except Exception as e:  # a failed step ends the batch's sequences, not the worker
                log.exception("batch step failed")
                events = self.batch.abort_all()
                message = f"generation failed: {type(e).__name__}: {e}"
                self._loop.call_soon_threadsafe(self._fail_all, [ev.seq_id for ev in events], message)
                events = []
            self.busy_seconds += time.monotonic() - t0
            if events:
                self._loop.call_soon_threadsafe(self._out.put_nowait, events)

    # -- the event loop --------------------------------------------------------------------------

    def _fail_all(self, seq_ids: list[str], message: str) -> None:
        for seq_id in seq_ids:
            stream = self._streams.pop(seq_id, None)
            if stream is not None:
                err = ErrorReply(code="internal", message=message, request_id=seq_id)
                asyncio.ensure_future(self.nc.publish(stream.req.stream_to, encode(err)))

    async def _publish_loop(self) -> None:
        while (events := await self._out.get()) is not None:
            for ev in events:
                try:
                    await self._publish(ev)
                except Exception:
                    log.exception("publishing a token failed", request_id=ev.seq_id)

    async def _publish(self, ev: Event) -> None:
        stream = self._streams.get(ev.seq_id)
        if stream is None:
            return
        r = stream.req.request
        if ev.token is not None:  # cancelled and aborted sequences end without one
            text = stream.decoder.push(ev.token)
            stream.pieces.append(text)
            chunk = TokenChunk(request_id=r.request_id, index=stream.index, token_id=ev.token, text=text)
            await self.nc.publish(stream.req.stream_to, encode(chunk))
            stream.index += 1
        if ev.result is None:
            return
        del self._streams[ev.seq_id]
        stream.pieces.append(stream.decoder.flush())
        await send_completion(
            self.nc,
            self.spec,
            stream.req,
            ev.result,
            prompt_tokens=stream.prompt_tokens,
            text="".join(stream.pieces),
            started=stream.t0,
            running=self.batch.running,
        )
        self.requests_done += 1

    async def handle_generate(self, req: GenerateRequest, _msg: Msg) -> Accepted:
        r = req.request
        if r.request_id in self._streams:
            raise errors.Conflict(f"request {r.request_id} is already running here.", request_id=r.request_id)
        ids = prompt_ids(self.batch.engine.tokenizer, r, self.batch.engine.context_tokens)
        self._streams[r.request_id] = _Stream(req, len(ids), self.batch.engine.tokenizer.stream_decoder())
        try:
            self.batch.submit(
                r.request_id,
                ids,
                max_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed,
                ignore_eos=r.ignore_eos,
            )
        except errors.IServeError as e:
            del self._streams[r.request_id]
            e.request_id = r.request_id
            raise
        return Accepted(request_id=r.request_id, deployment_id=self.spec.deployment_id)

    async def handle_cancel(self, req: CancelRequest, _msg: Msg) -> None:
        self.batch.cancel(req.request_id)

    def _heartbeat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            worker_id=self.spec.worker_id,
            deployment_id=self.spec.deployment_id,
            state="busy" if self.batch.busy else "idle",
            busy_seconds=self.busy_seconds,
            requests_done=self.requests_done,
            ts=time.time(),
            running=self.batch.running,
            waiting=self.batch.waiting,
            kv_blocks_used=self.batch.blocks_used,
            kv_blocks_total=self.batch.blocks_total,
        )

    async def heartbeat_loop(self) -> None:
        await heartbeat_loop(self.nc, self.spec.worker_id, self._heartbeat)
