"""What a worker's two request loops share (``worker.WorkerServer``, one request at a time, and
``batch_server.BatchServer``, continuous batching): the heartbeat loop and the ``Completion`` that
ends a request's stream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from iserve import subjects
from iserve.messages import Completion, GenerateRequest, LaunchWorker, WorkerHeartbeat, encode

if TYPE_CHECKING:
    from .engine.runner import GenerationResult

log = structlog.get_logger()


async def heartbeat_loop(nc, worker_id: str, snapshot: Callable[[], WorkerHeartbeat]) -> None:
    """Publish ``snapshot()`` every second; a publish that fails is skipped (the next one follows)."""
    while True:
        try:
            await nc.publish(subjects.worker_heartbeat(worker_id), encode(snapshot()))
        except Exception:
            pass
        await asyncio.sleep(1.0)


async def send_completion(
    nc,
    spec: LaunchWorker,
    req: GenerateRequest,
    result: GenerationResult,
    *,
    prompt_tokens: int,
    text: str,
    started: float,
    **log_fields: Any,
) -> Completion:
    """Publish the request's ``Completion`` (``started``: its ``time.perf_counter()`` at arrival) to its
    stream, log it, and return it."""
    e2e = (time.perf_counter() - started) * 1000.0
    done = Completion(
        request_id=req.request.request_id,
        finish_reason=result.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(result.tokens),
        text=text,
        ttft_ms=result.ttft_ms,
        tpot_ms=result.tpot_ms,
        e2e_ms=e2e,
        queue_ms=req.queue_ms,
        step_ms=list(result.step_ms),
        worker_id=spec.worker_id,
        deployment_id=spec.deployment_id,
    )
    await nc.publish(req.stream_to, encode(done))
    log.info(
        "request done",
        request_id=done.request_id,
        prompt_tokens=prompt_tokens,
        completion_tokens=done.completion_tokens,
        ttft_ms=round(done.ttft_ms, 2),
        tpot_ms=round(done.tpot_ms, 3),
        e2e_ms=round(e2e, 2),
        finish=done.finish_reason,
        **log_fields,
    )
    return done
