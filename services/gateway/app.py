"""The OpenAI-compatible HTTP API (Starlette): ``/v1/models``, ``/v1/completions``,
``/v1/chat/completions`` (streamed as server-sent events or not), and ``/health``, ``/ready``,
``/metrics``. Requests go to the scheduler over NATS (``iserve.client.Client``); a client that
disconnects cancels its request. See docs/gateway.md.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from iserve import errors
from iserve.client import Client, CompletionStream
from iserve.messages import ChatMessage, Completion, GpuLoad

from .config import GatewayConfig
from .metrics import Metrics
from .model_cache import ModelCache
from .openai_types import ChatCompletionRequest, CompletionRequest, error_body
from .stops import StopMatcher

# iServe's error codes as HTTP statuses and OpenAI error types.
STATUS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "prompt_too_long": (400, "invalid_request_error"),
    "infeasible": (400, "invalid_request_error"),
    "unsupported_model": (400, "invalid_request_error"),
    "bad_checkpoint": (400, "invalid_request_error"),
    "not_found": (404, "not_found_error"),
    "conflict": (409, "invalid_request_error"),
    "timeout": (429, "rate_limit_error"),  # waited longer than its timeout: the deployment is overloaded
    "overloaded": (429, "rate_limit_error"),  # the deployment's queue is full
    "not_ready": (503, "server_error"),
    "unavailable": (503, "server_error"),
    "worker_died": (503, "server_error"),
    "cancelled": (499, "invalid_request_error"),
    "internal": (500, "server_error"),
}
CLUSTER_TIMEOUT_S = 2.0  # how long /ready and /metrics wait for each service


def error_response(status: int, kind: str, code: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code, param), status_code=status)


def iserve_error(e: errors.IServeError) -> JSONResponse:
    status, kind = STATUS.get(e.code, (500, "server_error"))
    return error_response(status, kind, e.code, e.message)


def finish_reason(done: Completion | None, stopped: bool) -> str:
    if stopped or done is None or done.finish_reason == "cancelled":
        return "stop"
    return done.finish_reason


class Gateway:
    """The routes, over one NATS client. ``gpu_loads`` is the latest report of each GPU (kept by the service)."""

    def __init__(self, client: Client, cfg: GatewayConfig, metrics: Metrics, gpu_loads: dict[tuple[str, int], GpuLoad]):
        self.client = client
        self.cfg = cfg
        self.metrics = metrics
        self.gpu_loads = gpu_loads
        self.model_cache = ModelCache(client, cfg.model_cache_s)
        self.app = Starlette(
            routes=[
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/ready", self.ready, methods=["GET"]),
                Route("/metrics", self.metrics_text, methods=["GET"]),
            ]
        )

    # -- auth and decoding -------------------------------------------------------------------------

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if self.cfg.no_auth:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
            return None
        return error_response(
            401,
            "authentication_error",
            "invalid_api_key",
            "send the gateway's API key as 'Authorization: Bearer <key>'.",
        )

    @staticmethod
    async def _decode(request: Request, kind: type) -> Any:
        try:
            return msgspec.json.decode(await request.body(), type=kind)
        except msgspec.ValidationError as e:
            raise errors.BadRequest(f"invalid request body: {e}") from None
        except msgspec.DecodeError as e:
            raise errors.BadRequest(f"the request body is not JSON: {e}") from None

    # -- /v1 -----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        try:
            models = await self.client.models()
            deployments = await self.client.deployments()
        except errors.IServeError as e:
            return iserve_error(e)
        ready = {d.model for d in deployments.deployments if d.status == "ready"}
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.registered_at),
                "owned_by": "iserve",
                "ready": m.name in ready,
            }
            for m in models.models
        ]
        return JSONResponse({"object": "list", "data": data})

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, CompletionRequest, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, ChatCompletionRequest, chat=True)

    async def _serve(self, request: Request, kind: type, *, chat: bool) -> Response:
        if (denied := self._unauthorized(request)) is not None:
            return denied
        model = "?"
        try:
            req = await self._decode(request, kind)
            model = req.model
            if getattr(req, "echo", False):  # refused, never silently ignored
                raise errors.BadRequest("echo is not supported; send the request without it and prepend the prompt.")
            record = await self.model_cache.get(req.model)  # not_found (404) before anything is queued
            if not record.has_tokenizer:
                raise errors.BadRequest(
                    f"model {req.model!r} has no tokenizer.json, so its text cannot be tokenized as it was trained; "
                    "add the model's tokenizer files to its folder and register it again."
                )
        except errors.IServeError as e:
            self.metrics.failed(model, e.code)
            return iserve_error(e)
        run = _Run(self, req, chat)
        if req.stream:
            return StreamingResponse(run.events(), media_type="text/event-stream")
        return await run.whole(request)

    # -- health and metrics ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _ask(self, what: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wait_for(what(), CLUSTER_TIMEOUT_S)
        except (errors.IServeError, asyncio.TimeoutError, OSError):
            return None

    async def ready(self, request: Request) -> Response:
        checks = {
            "nats": self.client.nc.is_connected,
            "scheduler": await self._ask(self.client.scheduler_stats) is not None,
            "deployer": await self._ask(self.client.deployments) is not None,
            "fingerprint": await self._ask(self.client.models) is not None,
        }
        ok = all(checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
        )

    async def metrics_text(self, request: Request) -> Response:
        now = time.time()
        gpus = [g for g in self.gpu_loads.values() if now - g.ts < 10.0]
        self.metrics.cluster(
            await self._ask(self.client.scheduler_stats),
            await self._ask(self.client.deployments),
            await self._ask(self.client.models),
            gpus,
        )
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


class _Run:
    """One completion request: its token stream from the scheduler, stop strings applied, as OpenAI
    objects (a stream of chunks, or one response)."""

    def __init__(self, gw: Gateway, req: Any, chat: bool):
        self.gw = gw
        self.req = req
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.stream = CompletionStream()
        self.matcher = StopMatcher(req.stops())
        self.tokens = 0  # tokens streamed up to the stop (or all)
        self.t0 = time.monotonic()

    async def _tokens(self) -> AsyncIterator[str]:
        """The text pieces to send; stops at a stop string, cancelling the rest on the worker but
        reading the stream on to its ``Completion`` (the usage's prompt tokens)."""
        req = self.req
        if self.chat:
            kw: dict[str, Any] = {
                "messages": [ChatMessage(role=m.role, content=m.text()) for m in req.messages],
                "max_tokens": req.limit(self.gw.cfg.default_max_tokens),
            }
            prompt = ""
        else:
            kw = {"max_tokens": req.max_tokens}
            prompt = req.text()
        gen = self.gw.client.generate(
            req.model,
            prompt,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            timeout_s=self.gw.cfg.request_timeout_s,
            stream=self.stream,
            **kw,
        )
        try:
            async for chunk in gen:
                if self.matcher.stopped:
                    continue  # the rest, until the worker takes the cancellation
                self.tokens += 1
                text, stopped = self.matcher.push(chunk.text)
                if text:
                    yield text
                if stopped:
                    await self.gw.client.cancel(self.stream.request_id)
            if tail := self.matcher.flush():
                yield tail
        finally:
            await gen.aclose()  # type: ignore[attr-defined]  # an async generator: closing it cancels the request

    def _usage(self) -> dict[str, int]:
        done = self.stream.completion
        prompt = done.prompt_tokens if done is not None else 0
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def _record(self, error: errors.IServeError | None) -> None:
        m = self.gw.metrics
        if error is not None:
            m.failed(self.req.model, error.code)
        elif self.stream.completion is not None:
            reason = finish_reason(self.stream.completion, self.matcher.stopped)
            m.finished(self.req.model, self.stream.completion, time.monotonic() - self.t0, reason)

    def _choice(self, text: str, reason: str | None, *, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        if delta:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}
        message = {"role": "assistant", "content": text}
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": self.id,
            "object": self._object(True),
            "created": self.created,
            "model": self.req.model,
            "choices": choices,
        }
        if usage is not None:
            body["usage"] = usage
        return "data: " + msgspec.json.encode(body).decode() + "\n\n"

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the role (chat), each piece, the finish reason, usage when asked, [DONE]."""
        error = None
        try:
            if self.chat:
                yield self._frame([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for text in self._tokens():
                yield self._frame([self._choice(text, None, delta=True)])
            reason = finish_reason(self.stream.completion, self.matcher.stopped)
            yield self._frame([self._choice("", reason, delta=True)])
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield self._frame([], self._usage())
        except errors.IServeError as e:
            error = e
            status, kind = STATUS.get(e.code, (500, "server_error"))
            yield "data: " + msgspec.json.encode(error_body(e.message, kind, e.code)).decode() + "\n\n"
        self._record(error)
        yield "data: [DONE]\n\n"

    async def whole(self, request: Request) -> Response:
        """The whole response at once; the request is cancelled if the client disconnects first."""

        async def collect() -> str:
            return "".join([t async for t in self._tokens()])

        task = asyncio.create_task(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                self.gw.metrics.failed(self.req.model, "cancelled")
                return Response(status_code=499)
        try:
            text = task.result()
        except errors.IServeError as e:
            self._record(e)
            return iserve_error(e)
        self._record(None)
        reason = finish_reason(self.stream.completion, self.matcher.stopped)
        return JSONResponse(
            {
                "id": self.id,
                "object": self._object(False),
                "created": self.created,
                "model": self.req.model,
                "choices": [self._choice(text, reason, delta=False)],
                "usage": self._usage(),
            }
        )
