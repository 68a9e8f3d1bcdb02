"""A model worker process, started by the GPU agent. Two modes:

``serve --spec LAUNCH.json``
    Load the model's pipeline stages onto the given devices, announce ``worker.ready``, then run
    ``GenerateRequest``s one at a time (in arrival order) and stream tokens to each request's inbox.
    A heartbeat every second carries the busy seconds the agent turns into GPU load.

``profile --job JOB.json --result OUT.json``
    Measure each fingerprint checkpoint of a ``ProfileJob`` and write a ``ProfileResult``.

Torch work runs in a thread so the event loop keeps serving heartbeats and cancellations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import structlog
from nats.aio.msg import Msg

from iserve import bus, errors, logs, runtime, subjects
from iserve.messages import (
    Accepted,
    CancelRequest,
    Completion,
    ErrorReply,
    GenerateRequest,
    LaunchWorker,
    ProfileJob,
    ProfileResult,
    TokenChunk,
    WorkerHeartbeat,
    WorkerReady,
    decoder,
    encode,
)
from iserve.settings import common_flags, flag

log = structlog.get_logger()


def fit_prompt(ids: list[int], n: int, *, keep_first: bool) -> list[int]:
    """Pad (by repeating the prompt's own tokens) or truncate ``ids`` to exactly ``n`` tokens, as the
    trace replay asks for ``ContextTokens``. The first token (BOS) stays first when ``keep_first``."""
    if n <= 0 or len(ids) == n:
        return list(ids)
    if len(ids) > n:
        return list(ids[:n])
    head = ids[:1] if keep_first and ids else []
    body = ids[len(head):] or ids or [0]
    out = list(head)
    while len(out) < n:
        out.extend(body[: n - len(out)])
    return out


class WorkerServer:
    def __init__(self, nc, spec: LaunchWorker, engine, agent_id: str, device: str):
        self.nc = nc
        self.spec = spec
        self.engine = engine
        self.agent_id = agent_id
        self.device = device
        self.lock = asyncio.Lock()  # FIFO: requests run in the order they arrived
        self.busy_seconds = 0.0
        self.busy_since: float | None = None
        self.requests_done = 0
        self.cancelled: set[str] = set()
        self.current: str | None = None
        self._tasks: set[asyncio.Task] = set()

    def busy_total(self) -> float:
        extra = time.monotonic() - self.busy_since if self.busy_since is not None else 0.0
        return self.busy_seconds + extra

    async def heartbeat_loop(self) -> None:
        while True:
            state = "busy" if self.busy_since is not None else "idle"
            hb = WorkerHeartbeat(
                worker_id=self.spec.worker_id,
                deployment_id=self.spec.deployment_id,
                state=state,
                busy_seconds=self.busy_total(),
                requests_done=self.requests_done,
                ts=time.time(),
            )
            try:
                await self.nc.publish(subjects.worker_heartbeat(self.spec.worker_id), encode(hb))
            except Exception:
                pass
            await asyncio.sleep(1.0)

    async def handle_cancel(self, req: CancelRequest, _msg: Msg) -> None:
        self.cancelled.add(req.request_id)

    async def handle_generate(self, req: GenerateRequest, _msg: Msg) -> Accepted:
        r = req.request
        if r.max_tokens < 1:
            raise errors.BadRequest(f"max_tokens must be at least 1, not {r.max_tokens}.", request_id=r.request_id)
        if r.temperature < 0 or not (0 < r.top_p <= 1):
            raise errors.BadRequest("temperature must be >= 0 and top_p in (0, 1].", request_id=r.request_id)
        tok = self.engine.tokenizer
        ids = tok.encode(r.prompt, add_bos=True)
        ids = fit_prompt(ids, r.prompt_tokens, keep_first=tok.bos_id is not None)
        ctx = self.engine.context_tokens
        if len(ids) + r.max_tokens > ctx:
            raise errors.PromptTooLong(
                f"prompt of {len(ids)} tokens plus max_tokens {r.max_tokens} exceeds this deployment's context of {ctx} tokens; shorten the prompt or ask for fewer tokens.",
                request_id=r.request_id,
            )
        t = asyncio.create_task(self.run(req, ids))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return Accepted(request_id=r.request_id, deployment_id=self.spec.deployment_id)

    async def run(self, req: GenerateRequest, ids: list[int]) -> None:
        r = req.request
        async with self.lock:
            with structlog.contextvars.bound_contextvars(request_id=r.request_id):
                try:
                    await self._generate(req, ids)
                except errors.IServeError as e:
                    await self.nc.publish(req.stream_to, encode(e.to_reply()))
                except Exception as e:
                    log.exception("generation failed")
                    err = ErrorReply(code="internal", message=f"generation failed: {type(e).__name__}: {e}", request_id=r.request_id)
                    await self.nc.publish(req.stream_to, encode(err))
                finally:
                    self.cancelled.discard(r.request_id)

    async def _generate(self, req: GenerateRequest, ids: list[int]) -> None:
        r = req.request
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        decoder_ = self.engine.tokenizer.stream_decoder()
        t0 = time.perf_counter()
        self.busy_since = time.monotonic()
        self.current = r.request_id

        def on_token(tid: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, tid)

        def should_stop() -> bool:
            return r.request_id in self.cancelled

        job = asyncio.create_task(
            asyncio.to_thread(
                self.engine.generate,
                ids,
                max_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed,
                ignore_eos=r.ignore_eos,
                on_token=on_token,
                should_stop=should_stop,
            )
        )
        job.add_done_callback(lambda _t: loop.call_soon_threadsafe(tokens.put_nowait, None))
        index = 0
        pieces: list[str] = []
        try:
            while True:
                tid = await tokens.get()
                if tid is None:
                    break
                text = decoder_.push(tid)
                pieces.append(text)
                await self.nc.publish(req.stream_to, encode(TokenChunk(request_id=r.request_id, index=index, token_id=tid, text=text)))
                index += 1
            result = await job
            pieces.append(decoder_.flush())  # a dangling partial character, if any
        finally:
            self.busy_seconds += time.monotonic() - (self.busy_since or time.monotonic())
            self.busy_since = None
            self.current = None
        e2e = (time.perf_counter() - t0) * 1000.0
        steps = list(result.step_ms)
        done = Completion(
            request_id=r.request_id,
            finish_reason=result.finish_reason,
            prompt_tokens=len(ids),
            completion_tokens=len(result.tokens),
            text="".join(pieces),
            ttft_ms=result.ttft_ms,
            tpot_ms=(sum(steps) / len(steps)) if steps else 0.0,
            e2e_ms=e2e,
            queue_ms=req.queue_ms,
            step_ms=steps,
            worker_id=self.spec.worker_id,
            deployment_id=self.spec.deployment_id,
        )
        await self.nc.publish(req.stream_to, encode(done))
        self.requests_done += 1
        log.info(
            "request done",
            prompt_tokens=len(ids),
            completion_tokens=len(result.tokens),
            ttft_ms=round(result.ttft_ms, 2),
            tpot_ms=round(done.tpot_ms, 3),
            e2e_ms=round(e2e, 2),
            finish=result.finish_reason,
        )


def warm_up(engine) -> None:
    """One short generation before announcing ready, so that the first real request does not pay
    for CUDA kernel loading and library initialization (measured: ~200 ms of TTFT on an H100)."""
    ids = engine.tokenizer.encode("warm up", add_bos=True)
    engine.generate(ids, max_tokens=min(4, engine.context_tokens - len(ids)), ignore_eos=True)


async def exit_with_parent(stop: asyncio.Event) -> None:
    """A worker outlives nothing: when its agent dies (even by SIGKILL), it stops too."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if os.getppid() != parent:
            log.warning("agent process is gone; stopping")
            stop.set()


async def serve_main(args: argparse.Namespace, stop: asyncio.Event) -> None:
    from iserve.gpu_agent.engine import Engine

    spec = decoder(LaunchWorker).decode(Path(args.spec).read_bytes())
    structlog.contextvars.bind_contextvars(worker_id=spec.worker_id, deployment_id=spec.deployment_id)
    devices = args.devices.split(",")
    if len(devices) != len(spec.stages):
        raise errors.BadRequest(f"{len(spec.stages)} stages but {len(devices)} devices were given.")
    nc = await bus.connect(args.nats_url, f"worker-{spec.worker_id}")
    try:
        server = None
        t0 = time.monotonic()
        hb = WorkerHeartbeat(worker_id=spec.worker_id, deployment_id=spec.deployment_id, state="loading", busy_seconds=0.0, ts=time.time())
        await nc.publish(subjects.worker_heartbeat(spec.worker_id), encode(hb))
        stages = [(devices[i], s.first_layer, s.num_layers) for i, s in enumerate(spec.stages)]
        engine = await asyncio.to_thread(Engine.load, spec.model_path, stages, spec.context_tokens, spec.seed)
        await asyncio.to_thread(warm_up, engine)
        load_s = time.monotonic() - t0
        server = WorkerServer(nc, spec, engine, args.agent_id, ",".join(devices))
        subs = [
            await bus.serve(nc, subjects.worker_generate(spec.worker_id), GenerateRequest, server.handle_generate),
            await bus.serve(nc, subjects.worker_cancel(spec.worker_id), CancelRequest, server.handle_cancel),
        ]
        hb_task = asyncio.create_task(server.heartbeat_loop())
        watchdog = asyncio.create_task(exit_with_parent(stop))
        ready = WorkerReady(
            worker_id=spec.worker_id,
            deployment_id=spec.deployment_id,
            agent_id=args.agent_id,
            model=spec.model,
            context_tokens=engine.context_tokens,
            device=",".join(devices),
            memory_bytes=[int(b) for b in engine.memory_bytes()],
            load_seconds=load_s,
        )
        await nc.publish(subjects.WORKER_READY, encode(ready))
        log.info("worker ready", load_s=round(load_s, 2), devices=devices, stages=[(s.first_layer, s.num_layers) for s in spec.stages])
        await stop.wait()
        hb_task.cancel()
        watchdog.cancel()
        for s in subs:
            await s.unsubscribe()
    finally:
        await nc.drain()


def profile_main(args: argparse.Namespace) -> None:
    from iserve.gpu_agent.engine import gpu_type_of, measure_fingerprint

    job = decoder(ProfileJob).decode(Path(args.job).read_bytes())
    device = args.devices.split(",")[0]
    t0 = time.monotonic()
    measurements = []
    for variant in job.variants:
        for path in job.fingerprint_paths:
            layers = json.loads((Path(path) / "config.json").read_text())["num_hidden_layers"]
            m = measure_fingerprint(
                path,
                device,
                num_layers=layers,
                prompt_lengths=job.prompt_lengths,
                output_lengths=job.output_lengths,
                repeats=job.repeats,
                warmup=job.warmup,
                context_tokens=job.context_tokens,
            )
            m.variant = variant
            measurements.append(m)
            log.info("fingerprint measured", layers=layers, tpot_ms=round(m.tpot_ms, 3), peak_mib=round(m.peak_bytes / 2**20, 1))
    wall = time.monotonic() - t0
    result = ProfileResult(
        job_id=job.job_id,
        device=device,
        gpu_type=gpu_type_of(device),
        measurements=measurements,
        gpu_seconds=wall,
        wall_seconds=wall,
        peak_bytes=max((m.peak_bytes for m in measurements), default=0),
    )
    out = Path(args.result)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(encode(result))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m iserve.gpu_agent.worker", description="A model worker (started by the GPU agent).")
    p.add_argument("mode", choices=["serve", "profile"])
    common_flags(p)
    flag(p, "--agent-id", default="", help="the agent that started this worker")
    flag(p, "--devices", default="cpu", help="torch device of each stage, comma-separated")
    p.add_argument("--spec", help="LaunchWorker JSON (serve mode)")
    p.add_argument("--job", help="ProfileJob JSON (profile mode)")
    p.add_argument("--result", help="where to write the ProfileResult (profile mode)")
    p.add_argument("--error-file", help="where to write one line saying why the worker failed")
    args = p.parse_args(argv)
    logs.configure("worker", level=args.log_level, json=True if args.log_json is None else args.log_json)
    try:
        if args.mode == "profile":
            profile_main(args)
        else:
            runtime.run(lambda stop: serve_main(args, stop))
    except Exception as e:
        code = e.code if isinstance(e, errors.IServeError) else "internal"
        text = e.message if isinstance(e, errors.IServeError) else f"{type(e).__name__}: {e}"
        log.error("worker failed", code=code, error=text, exc_info=not isinstance(e, errors.IServeError))
        if args.error_file:
            Path(args.error_file).write_text(f"[{code}] {text}")
        sys.exit(2)


if __name__ == "__main__":
    main()
