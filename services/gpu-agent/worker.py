"""A model worker process, started by the GPU agent. Two modes:

``serve --spec LAUNCH.json``
    Load the model's pipeline stages onto the given devices, announce ``worker.ready``, then run
    ``GenerateRequest``s one at a time (in arrival order) and stream tokens to each request's inbox.
    A heartbeat every second carries the busy seconds the agent turns into GPU load.

    Tensor parallelism (``config.tp > 1``): the agent starts ``tp`` processes with the same spec,
    ``--tp-rank r --tp-size tp --dist-port P`` and each rank's devices (stage ``s`` of rank ``r`` is
    ``spec.stages[s * tp + r]``). They join one ``torch.distributed`` group (NCCL on CUDA, gloo on
    the CPU) at ``127.0.0.1:P``. Rank 0 is the worker the rest of iServe sees: it connects to NATS,
    announces ready, heartbeats and takes requests, and the engine broadcasts each request to the
    other ranks, which only load their shards and run ``Engine.follow()`` until rank 0 closes.

``profile --job JOB.json --result OUT.json``
    Measure each fingerprint checkpoint of a ``ProfileJob`` and write a ``ProfileResult``.

Torch work runs in a thread so the event loop keeps serving heartbeats and cancellations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from nats.aio.msg import Msg

from iserve import bus, errors, logs, runtime, subjects
from iserve.messages import (
    Accepted,
    CancelRequest,
    ErrorReply,
    GenerateRequest,
    LaunchWorker,
    TokenChunk,
    WorkerHeartbeat,
    WorkerReady,
    decoder,
    encode,
)
from iserve.settings import common_flags, flag

from .batch_server import BatchServer
from .gpus import pin_to_gpu_cpus
from .prompts import prompt_ids
from .serving import heartbeat_loop, send_completion

if TYPE_CHECKING:
    from iserve.gpu_agent.engine.batch import BatchEngine
    from iserve.gpu_agent.engine.protocol import InferenceEngine

log = structlog.get_logger()


class WorkerServer:
    def __init__(self, nc, spec: LaunchWorker, engine: InferenceEngine, agent_id: str, device: str):
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

    def _heartbeat(self) -> WorkerHeartbeat:
        return WorkerHeartbeat(
            worker_id=self.spec.worker_id,
            deployment_id=self.spec.deployment_id,
            state="busy" if self.busy_since is not None else "idle",
            busy_seconds=self.busy_total(),
            requests_done=self.requests_done,
            ts=time.time(),
        )

    async def heartbeat_loop(self) -> None:
        await heartbeat_loop(self.nc, self.spec.worker_id, self._heartbeat)

    async def handle_cancel(self, req: CancelRequest, _msg: Msg) -> None:
        self.cancelled.add(req.request_id)

    async def handle_generate(self, req: GenerateRequest, _msg: Msg) -> Accepted:
        r = req.request
        if r.max_tokens < 1:
            raise errors.BadRequest(f"max_tokens must be at least 1, not {r.max_tokens}.", request_id=r.request_id)
        if r.temperature < 0 or not (0 < r.top_p <= 1):
            raise errors.BadRequest("temperature must be >= 0 and top_p in (0, 1].", request_id=r.request_id)
        ids = prompt_ids(self.engine.tokenizer, r, self.engine.context_tokens)
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
                    err = ErrorReply(
                        code="internal", message=f"generation failed: {type(e).__name__}: {e}", request_id=r.request_id
                    )
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
                await self.nc.publish(
                    req.stream_to, encode(TokenChunk(request_id=r.request_id, index=index, token_id=tid, text=text))
                )
                index += 1
            result = await job
            pieces.append(decoder_.flush())  # a dangling partial character, if any
        finally:
            self.busy_seconds += time.monotonic() - (self.busy_since or time.monotonic())
            self.busy_since = None
            self.current = None
        await send_completion(self.nc, self.spec, req, result, prompt_tokens=len(ids), text="".join(pieces), started=t0)
        self.requests_done += 1


def warm_up(engine: InferenceEngine) -> None:
    """One short generation before announcing ready, so that the first real request does not pay
    for CUDA kernel loading and library initialization (docs/engine-internals.md#the-engine)."""
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


def rank_stages(spec: LaunchWorker, devices: list[str], tp_rank: int, tp_size: int) -> list[tuple[str, int, int]]:
    """This rank's pipeline stages ``(device, first_layer, num_layers)``: ``spec.stages[s * tp + r]``."""
    if tp_size < 1 or len(spec.stages) % tp_size:
        raise errors.BadRequest(
            f"{len(spec.stages)} stage entries cannot be split over tensor-parallel degree {tp_size}."
        )
    mine = spec.stages[tp_rank::tp_size]
    if len(devices) != len(mine):
        raise errors.BadRequest(f"{len(mine)} stages for rank {tp_rank} but {len(devices)} devices were given.")
    for s in range(len(mine)):
        group = spec.stages[s * tp_size : (s + 1) * tp_size]
        if any((g.first_layer, g.num_layers) != (group[0].first_layer, group[0].num_layers) for g in group):
            raise errors.BadRequest(f"the tensor-parallel ranks of stage {s} do not hold the same layers.")
    return [(devices[i], st.first_layer, st.num_layers) for i, st in enumerate(mine)]


def load_engine(spec: LaunchWorker, args: argparse.Namespace) -> InferenceEngine:
    """Load the model: on TensorRT-LLM when it is selected (``engine.trtllm.use_trtllm``; it runs its
    own ranks), else this rank's share on the torch engine, joining the tensor-parallel group first
    when ``tp > 1``."""
    from iserve.gpu_agent.engine import Engine
    from iserve.gpu_agent.engine.trtllm import TrtLlmEngine, use_trtllm

    if use_trtllm(spec.config):
        return TrtLlmEngine.load(spec.model_path, spec.config, spec.context_tokens)
    devices = args.devices.split(",")
    stages = rank_stages(spec, devices, args.tp_rank, args.tp_size)
    if args.tp_size > 1:
        import datetime

        import torch
        import torch.distributed as dist

        cuda = devices[0].startswith("cuda")
        if cuda:
            torch.cuda.set_device(devices[0])
            pin_to_gpu_cpus(devices[0])  # as profiling's ranks do (ISERVE_PIN_CPUS=0: off)
        else:  # the ranks share this host's cores; oversubscribed, gloo's collectives stall for milliseconds
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.tp_size))
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"tcp://127.0.0.1:{args.dist_port}",
            rank=args.tp_rank,
            world_size=args.tp_size,
            timeout=datetime.timedelta(seconds=600),
        )
    c = spec.config
    return Engine.load(
        spec.model_path,
        stages,
        spec.context_tokens,
        spec.seed,
        weight_quant=c.weight_quant,
        kv_quant=c.kv_quant,
        pruning=c.pruning,
        tp_rank=args.tp_rank,
        tp_size=args.tp_size,
        cuda_graphs=not batching(spec, args),  # the batch-1 graphs; the batching engine runs eagerly
    )


def batching(spec: LaunchWorker, args: argparse.Namespace) -> bool:
    """Whether this worker serves with continuous batching: ``max_batch > 1`` on the torch engine
    (TensorRT-LLM workers serve one request at a time; its own batching is not wired in)."""
    from iserve.gpu_agent.engine.trtllm import use_trtllm

    return spec.max_batch > 1 and not use_trtllm(spec.config)


def batch_engine(engine: InferenceEngine, spec: LaunchWorker) -> BatchEngine:
    """Hand ``engine`` to a ``BatchEngine`` sized by the spec (every tensor-parallel rank does)."""
    from iserve.gpu_agent.engine import Engine
    from iserve.gpu_agent.engine.batch import BatchEngine

    assert isinstance(engine, Engine)  # batching(): the torch engine
    return BatchEngine(engine, max_batch=spec.max_batch, kv_tokens=spec.kv_tokens)


def start_batching(engine: InferenceEngine, spec: LaunchWorker) -> BatchEngine:
    """``batch_engine``, warmed up with one request."""
    batch = batch_engine(engine, spec)
    ids = engine.tokenizer.encode("warm up", add_bos=True)
    batch.submit("warm-up", ids, max_tokens=min(4, engine.context_tokens - len(ids)), ignore_eos=True)
    batch.run_until_idle()
    return batch


def follower_main(args: argparse.Namespace) -> None:
    """Ranks 1..tp-1 of a tensor-parallel worker: load the shard, then follow rank 0 until it closes."""
    import threading

    from iserve.gpu_agent.engine import Engine

    spec = decoder(LaunchWorker).decode(Path(args.spec).read_bytes())
    structlog.contextvars.bind_contextvars(
        worker_id=spec.worker_id, deployment_id=spec.deployment_id, tp_rank=args.tp_rank
    )
    parent = os.getppid()

    def watchdog() -> None:  # blocked in a collective, the main thread cannot notice its agent dying
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("agent process is gone; stopping")
        os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    engine = load_engine(spec, args)
    if not isinstance(engine, Engine):  # TensorRT-LLM runs its own ranks: a follower holds the torch engine
        raise RuntimeError("a tensor-parallel follower rank needs the torch engine, not TensorRT-LLM")
    log.info("tensor-parallel rank loaded", devices=args.devices)
    if batching(spec, args):
        steps = batch_engine(engine, spec).follow()
        log.info("tensor-parallel rank released by rank 0", steps=steps)
        return
    runs = engine.follow()
    log.info("tensor-parallel rank released by rank 0", generations=runs)


async def serve_main(args: argparse.Namespace, stop: asyncio.Event) -> None:
    spec = decoder(LaunchWorker).decode(Path(args.spec).read_bytes())
    structlog.contextvars.bind_contextvars(worker_id=spec.worker_id, deployment_id=spec.deployment_id)
    devices = args.devices.split(",")
    rank_stages(spec, devices, args.tp_rank, args.tp_size)  # bad specs fail before connecting
    nc = await bus.connect(args.nats_url, f"worker-{spec.worker_id}")
    engine = None
    try:
        server: WorkerServer | BatchServer | None = None
        t0 = time.monotonic()
        hb = WorkerHeartbeat(
            worker_id=spec.worker_id,
            deployment_id=spec.deployment_id,
            state="loading",
            busy_seconds=0.0,
            ts=time.time(),
        )
        await nc.publish(subjects.worker_heartbeat(spec.worker_id), encode(hb))
        engine = await asyncio.to_thread(load_engine, spec, args)
        batch: BatchEngine | None = None
        if batching(spec, args):
            batch = await asyncio.to_thread(start_batching, engine, spec)
        else:
            await asyncio.to_thread(warm_up, engine)
        load_s = time.monotonic() - t0
        if batch is not None:
            server = BatchServer(nc, spec, batch, args.agent_id, ",".join(devices))
            server.start()
        else:
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
            memory_bytes=[int(b) for b in (batch or engine).memory_bytes()],
            load_seconds=load_s,
        )
        await nc.publish(subjects.WORKER_READY, encode(ready))
        log.info(
            "worker ready",
            load_s=round(load_s, 2),
            devices=devices,
            stages=[(s.first_layer, s.num_layers) for s in spec.stages],
            tp=args.tp_size,
            kernels=engine.kernels(),
            cuda_graphs=engine.graphs_captured,
            prefill_graph_tokens=engine.prefill_graph_tokens,
            max_batch=batch.max_batch if batch is not None else 1,
            kv_pool_bytes=batch.pool_bytes if batch is not None else 0,
        )
        await stop.wait()
        hb_task.cancel()
        watchdog.cancel()
        for s in subs:
            await s.unsubscribe()
        if isinstance(server, BatchServer):
            await server.close()
    finally:
        await nc.drain()
        if engine is not None and args.tp_size > 1:
            # not in the middle of a request
            async with server.lock if isinstance(server, WorkerServer) else asyncio.Lock():
                await asyncio.to_thread(engine.close)  # releases the other ranks


def profile_main(args: argparse.Namespace) -> None:
    """Measure every fingerprint of the job as every variant (``profiling.run_profile_job_file``: each
    variant is loaded for real through ``Engine.load``; TP variants use the first ``tp`` devices)."""
    from iserve.gpu_agent.profiling import run_profile_job_file

    run_profile_job_file(args.job, args.result, args.devices.split(","), log=lambda text: log.info(text))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m iserve.gpu_agent.worker", description="A model worker (started by the GPU agent)."
    )
    p.add_argument("mode", choices=["serve", "profile"])
    common_flags(p)
    flag(p, "--agent-id", default="", help="the agent that started this worker")
    flag(p, "--devices", default="cpu", help="torch device of each stage (of this rank), comma-separated")
    p.add_argument("--tp-rank", type=int, default=0, help="this process's tensor-parallel rank (serve mode)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel degree (serve mode)")
    p.add_argument("--dist-port", type=int, default=0, help="127.0.0.1 port of the tensor-parallel rendezvous")
    p.add_argument("--spec", help="LaunchWorker JSON (serve mode)")
    p.add_argument("--job", help="ProfileJob JSON (profile mode)")
    p.add_argument("--result", help="where to write the ProfileResult (profile mode)")
    p.add_argument("--error-file", help="where to write one line saying why the worker failed")
    args = p.parse_args(argv)
    logs.configure("worker", level=args.log_level, json=True if args.log_json is None else args.log_json)
    try:
        if args.mode == "profile":
            profile_main(args)
        elif args.tp_rank > 0:
            follower_main(args)
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
