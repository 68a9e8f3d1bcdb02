"""Integration tests: the four services in this process, over a real nats-server with JetStream,
with a simulated-GPU agent that starts real worker processes (torch on the CPU).

Covers the issue's bad-input list: no config.json, truncated or corrupt safetensors, unsupported
architecture, unknown model, infeasible intent, prompt longer than the context, malformed messages on
every subject; none of them crashes a service or leaves a half-registered model.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from nats.aio.client import Client as NATS

from iserve import bus, errors, subjects
from iserve.client import Client, CompletionStream
from iserve.deployer.config import DeployerConfig
from iserve.deployer.service import DeployerService
from iserve.fingerprint.config import FingerprintConfig
from iserve.fingerprint.service import FingerprintService
from iserve.gpu_agent.config import AgentConfig
from iserve.gpu_agent.engine.capabilities import CAPABILITIES
from iserve.gpu_agent.gpus import SimulatedGpus
from iserve.gpu_agent.load import parse_simulated
from iserve.gpu_agent.service import AgentService
from iserve.messages import Intent
from iserve.scheduler.config import SchedulerConfig
from iserve.scheduler.service import SchedulerService
from iserve.service import Service

# The service tests profile on the CPU: measuring all of the engine's variants there takes about a
# minute per model, so they profile the fp16 variants only (the variants are covered in tests/engine).
TEST_CAPABILITIES = {**CAPABILITIES, "tp": [1], "weight_quant": ["fp16"], "kv_quant": ["fp16"], "pruning": ["none"]}


class Cluster:
    """The services, each on its own NATS connection, in this event loop."""

    def __init__(self, url: str, tmp: Path, gpus: str = "2x24GB", context_tokens: int = 256, **scheduler_kw):
        self.scheduler_kw = scheduler_kw
        self.url = url
        self.tmp = tmp
        self.gpus = gpus
        self.context_tokens = context_tokens
        self.conns: list[NATS] = []
        self.services: dict[str, Service] = {}

    async def _conn(self, name):
        c = await bus.connect(self.url, name)
        self.conns.append(c)
        return c

    async def start_service(self, name: str):
        common = dict(nats_url=self.url, log_level="warning", log_json=True)
        if name == "agent":
            cfg = AgentConfig(
                agent_id="a0",
                simulate_gpus=self.gpus,
                gpu_type="sim-gpu",
                interval_s=0.25,
                load_window_s=120,
                work_dir=self.tmp / "agent",
                profile_timeout_s=300,
                **common,
            )
            svc = AgentService(cfg, await self._conn("agent"), SimulatedGpus(parse_simulated(self.gpus), "sim-gpu"))
        elif name == "fingerprint":
            cfg = FingerprintConfig(
                work_dir=self.tmp / "fp",
                context_tokens=self.context_tokens,
                prompt_lengths=[16, 64],
                output_lengths=[4, 12],
                repeats=2,
                warmup=1,
                gpu_wait_s=20,
                **common,
            )
            svc = FingerprintService(cfg, await self._conn("fingerprint"), TEST_CAPABILITIES)
        elif name == "deployer":
            svc = DeployerService(
                # one request at a time unless a test asks for a batch: the paper's FCFS, exact memory
                DeployerConfig(reconcile_s=0.5, gpu_stale_s=2.0, default_max_batch=1, **common),
                await self._conn("deployer"),
            )
        else:
            svc = SchedulerService(
                SchedulerConfig(refresh_s=0.5, client_check_s=0.2, **{**common, **self.scheduler_kw}),
                await self._conn("scheduler"),
            )
        await svc.start()
        self.services[name] = svc
        return svc

    async def stop_service(self, name: str):
        await self.services.pop(name).close()

    async def __aenter__(self):
        for n in ("agent", "fingerprint", "deployer", "scheduler"):
            await self.start_service(n)
        return self

    async def __aexit__(self, *exc):
        for n in list(self.services):
            await self.stop_service(n)
        for c in self.conns:
            await c.drain()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


async def deployed(client: Client, path: Path, name: str = "", intent: Intent | None = None, **deploy_kw):
    info = await client.register(str(path), name)
    await client.wait_profiled(info.record.name, timeout=120)
    rep = await client.deploy(info.record.name, intent or Intent(kind="min-latency"), **deploy_kw)
    await client.wait_ready(rep.deployment.deployment_id, timeout=120)
    return info.record.name, rep


async def collect(client: Client, model: str, prompt: str, **kw):
    s = CompletionStream()
    chunks = [c async for c in client.generate(model, prompt, stream=s, **kw)]
    return chunks, s.completion


# ---------------------------------------------------------------------------------------------------


async def test_register_profile_deploy_generate(cluster, client, tiny_model, tmp_path):
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    cmap = await client.profile(name)
    assert cmap.estimates and all(e.num_layers == 4 for e in cmap.estimates)
    assert cmap.excluded and all(x.reason for x in cmap.excluded)  # unsupported configurations are listed, with reasons
    assert cmap.cost.gpu_seconds > 0 and len(cmap.cost.fingerprint_fraction) == 2
    d = rep.deployment
    assert sum(g.num_layers for g in d.gpus) == 4 and rep.why
    # an fp16-only engine has nothing lossy to measure: an empty report, and a lossless choice
    assert cmap.quality is not None and cmap.quality.variants == [] and not cmap.quality.error
    assert rep.quality.startswith("lossless") and rep.quality_cost is None
    chunks, done = await collect(client, name, "hello", max_tokens=8, ignore_eos=True)
    assert len(chunks) == 8 and done.completion_tokens == 8 and done.finish_reason == "length"
    assert done.ttft_ms > 0 and len(done.step_ms) == 7 and done.deployment_id == d.deployment_id
    # greedy decoding is deterministic across requests
    chunks2, _ = await collect(client, name, "hello", max_tokens=8, ignore_eos=True)
    assert [c.token_id for c in chunks2] == [c.token_id for c in chunks]
    stats = await client.scheduler_stats()
    assert stats.queues[0].completed == 2
    # the agent's load report shows the worker and its reserved memory
    loads = await client.gpu_loads(0.6)
    hosting = [g for g in loads if d.worker_id in g.workers]
    assert hosting and all(g.free_bytes < g.total_bytes for g in hosting)
    await client.undeploy(d.deployment_id)
    assert (await client.deployments()).deployments == []
    # ... and its GPUs are free again
    loads = await client.gpu_loads(0.6)
    assert loads and all(not g.workers and g.free_bytes == g.total_bytes for g in loads)


async def test_fcfs_several_requests_in_order(cluster, client, tiny_model, tmp_path):
    name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))

    async def one(i):
        _, done = await collect(client, name, f"request {i}", max_tokens=6, ignore_eos=True)
        return done

    results = await asyncio.gather(*(one(i) for i in range(4)))
    assert all(r.completion_tokens == 6 for r in results)
    # one at a time, no batching: sent together, each request waited in the queue for (about) the
    # whole run of the one before it (e2e_ms is the worker's run time, queue_ms the scheduler's wait)
    runs = sorted(results, key=lambda r: r.queue_ms)
    for before, after in zip(runs, runs[1:]):
        assert after.queue_ms >= before.queue_ms + 0.5 * before.e2e_ms, [(r.queue_ms, r.e2e_ms) for r in runs]
    # the scheduler recorded every request's timings
    q = (await client.scheduler_stats()).queues[0]
    assert q.completed == 4 and q.queue_depth == 0 and q.in_flight == 0
    assert q.ttft_ms_p50 > 0 and q.tpot_ms_p50 > 0 and q.e2e_ms_p50 >= q.ttft_ms_p50 and q.e2e_ms_p99 >= q.e2e_ms_p50


async def test_a_batch_runs_several_requests_at_once_and_a_dead_worker_fails_every_one(
    nats_server, client, tiny_model, tmp_path
):
    from iserve.fingerprint.estimator.memory import kv_cache_bytes_per_layer

    async with Cluster(nats_server.url, tmp_path, context_tokens=2048) as cluster:
        cluster.services["deployer"].cfg.replace_failed = False
        name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"), max_batch=3)
        d = rep.deployment
        # the record carries the batch and its KV pool, and the plan reserved the pool beyond one context
        assert (d.max_batch, d.context_tokens, d.kv_tokens) == (3, 2048, 3 * 2048)
        profiled = next(e for e in (await client.profile(name)).estimates if e.config == d.config)
        arch = (await client.model(name)).record.arch
        extra = kv_cache_bytes_per_layer(arch, d.config, 2 * 2048)  # two contexts beyond the one counted
        assert d.estimate.layer_bytes == profiled.layer_bytes + extra
        assert d.estimate.total_bytes == profiled.total_bytes + d.config.tp * profiled.num_layers * extra

        async def one(i):
            await collect(client, name, f"request {i}", max_tokens=1500, ignore_eos=True, request_id=f"r{i}")

        runs = [asyncio.create_task(one(i)) for i in range(4)]

        async def three_running():
            q = (await client.scheduler_stats()).queues[0]
            return q if (q.in_flight, q.queue_depth) == (3, 1) and q.kv_blocks_used > 0 else None

        q = await wait_for(three_running, "three running requests and one queued", tries=300)
        # the worker's pool: 3 contexts of 2048 tokens in blocks of 16, the running ones' blocks in use
        assert q.max_batch == 3 and q.kv_blocks_total == 3 * 2048 // 16 and q.kv_blocks_used > 0
        cluster.services["agent"].workers[d.worker_id].proc.kill()
        outcomes = await asyncio.gather(*runs, return_exceptions=True)
        codes = sorted(type(o).__name__ for o in outcomes)
        # every running request learns its worker died; the queued one that no other replica can take
        # is unavailable
        assert codes == ["Unavailable", "WorkerDied", "WorkerDied", "WorkerDied"], outcomes
        died = [o for o in outcomes if isinstance(o, errors.WorkerDied)]
        assert all("was running there" in o.message for o in died)


async def test_concurrent_requests_share_the_batch_and_keep_their_greedy_tokens(
    nats_server, client, tiny_model, tmp_path
):
    async with Cluster(nats_server.url, tmp_path) as cluster:
        cluster.services["deployer"].cfg.default_max_batch = 8
        name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
        assert rep.deployment.max_batch == 8
        prompts = [f"request number {i} " * (1 + i % 3) for i in range(8)]
        alone = []
        for p in prompts:  # one at a time: each runs in a batch of one
            chunks, done = await collect(client, name, p, max_tokens=40, ignore_eos=True)
            alone.append(([c.token_id for c in chunks], done.e2e_ms))
        t0 = asyncio.get_running_loop().time()
        together = await asyncio.gather(*(collect(client, name, p, max_tokens=40, ignore_eos=True) for p in prompts))
        wall_ms = (asyncio.get_running_loop().time() - t0) * 1000.0
        assert [[c.token_id for c in chunks] for chunks, _ in together] == [tokens for tokens, _ in alone]
        # the eight ran as one batch: far less than one after another
        assert wall_ms < 0.5 * sum(e2e for _, e2e in alone), (wall_ms, [e2e for _, e2e in alone])


async def test_register_is_idempotent_and_durable(cluster, client, tiny_model, tmp_path):
    path = copy_model(tiny_model, tmp_path / "tiny")
    first = await client.register(str(path))
    await client.wait_profiled(first.record.name, timeout=120)
    again = await client.register(str(path))
    assert first.created and not again.created and again.record.status == "profiled"
    # a restarted fingerprint service keeps the model and its profile, and does not profile again
    await cluster.stop_service("fingerprint")
    await cluster.start_service("fingerprint")
    info = await client.model(first.record.name)
    assert info.record.status == "profiled"
    assert (await client.profile(first.record.name)).estimates
    # a different checkpoint under the same name is refused
    other = copy_model(tiny_model, tmp_path / "elsewhere")
    with pytest.raises(errors.Conflict):
        await client.register(str(other), first.record.name)


async def test_unregister_is_refused_while_deployed_then_forgets_the_model(cluster, client, tiny_model, tmp_path):
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    with pytest.raises(errors.Conflict, match="undeploy it first"):
        await client.unregister(name)
    await client.undeploy(rep.deployment.deployment_id)
    gone = await client.unregister(name)
    assert gone.profiles_removed == 1
    assert (await client.models()).models == []
    with pytest.raises(errors.NotFound):
        await client.profile(name)
    with pytest.raises(errors.NotFound):
        await client.unregister(name)
    again = await client.register(str(tmp_path / "tiny"), name)  # the name is free again
    assert again.created


async def test_deployments_survive_a_deployer_restart(cluster, client, tiny_model, tmp_path):
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    await cluster.stop_service("deployer")
    await cluster.start_service("deployer")
    deps = (await client.deployments()).deployments
    assert [d.deployment_id for d in deps] == [rep.deployment.deployment_id] and deps[0].status == "ready"
    _, done = await collect(client, name, "still there", max_tokens=3, ignore_eos=True)
    assert done.completion_tokens == 3


async def wait_status(client: Client, status: str, *, worker_not: str = "", tries: int = 120):
    for _ in range(tries):
        deps = (await client.deployments()).deployments
        if deps and deps[0].status == status and deps[0].worker_id != worker_not:
            return deps[0]
        await asyncio.sleep(0.25)
    raise AssertionError(f"no deployment became {status}: {deps}")


async def test_dead_worker_is_reported_and_replaced(cluster, client, tiny_model, tmp_path):
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    agent: AgentService = cluster.services["agent"]
    old = rep.deployment.worker_id
    agent.workers[old].proc.kill()
    d = await wait_status(client, "ready", worker_not=old)
    assert d.deployment_id == rep.deployment.deployment_id  # same deployment, a new worker
    _, done = await collect(client, name, "back", max_tokens=2, ignore_eos=True)
    assert done.completion_tokens == 2


async def test_dead_worker_without_replacement_is_marked_failed(cluster, client, tiny_model, tmp_path):
    cluster.services["deployer"].cfg.replace_failed = False
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    cluster.services["agent"].workers[rep.deployment.worker_id].proc.kill()
    d = await wait_status(client, "failed")
    assert "exited" in d.reason
    with pytest.raises(errors.NotReady):
        await collect(client, name, "anyone?", max_tokens=2)


async def test_request_timeouts_cancellation_and_vanished_clients(nats_server, client, nc, tiny_model, tmp_path):
    from iserve.messages import (
        Accepted,
        CancelRequest,
        Completion,
        ErrorReply,
        InferRequest,
        StreamMessage,
        decoder,
        encode,
    )

    async with Cluster(nats_server.url, tmp_path, context_tokens=2048):
        name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        long = InferRequest(
            request_id="long", model=name, prompt="x", max_tokens=2000, ignore_eos=True, stream_to=inbox
        )
        await bus.request(nc, subjects.INFER, long, Accepted)
        await sub.next_msg(timeout=30)  # it runs
        dec = decoder(StreamMessage)

        async def next_message(sub):
            while True:
                data = (await sub.next_msg(timeout=30)).data
                if data:  # skip the scheduler's empty is-anyone-listening probes
                    return dec.decode(data)

        # queued behind it, a request with a short timeout is dropped by the scheduler (queue depth 1)
        late_inbox = nc.new_inbox()
        late_sub = await nc.subscribe(late_inbox)
        late = InferRequest(
            request_id="late", model=name, prompt="x", max_tokens=2, timeout_s=0.5, stream_to=late_inbox
        )
        accepted = await bus.request(nc, subjects.INFER, late, Accepted)
        assert accepted.queue_depth == 1
        err = await next_message(late_sub)
        assert isinstance(err, ErrorReply) and err.code == "timeout" and "waited longer than its timeout" in err.message
        await late_sub.unsubscribe()
        # a queued request cancelled before it starts is answered Cancelled
        queued = asyncio.create_task(collect(client, name, "queued", max_tokens=2, request_id="queued"))
        for _ in range(100):
            if (await client.scheduler_stats()).queues[0].queue_depth == 1:
                break
            await asyncio.sleep(0.05)
        await nc.publish(subjects.INFER_CANCEL, encode(CancelRequest(request_id="queued")))
        with pytest.raises(errors.Cancelled):
            await queued
        # an explicit cancel stops the running one early, with what it made so far
        await nc.publish(subjects.INFER_CANCEL, encode(CancelRequest(request_id="long")))
        done = None
        while not isinstance(done, Completion):
            done = await next_message(sub)
        assert done.finish_reason == "cancelled" and done.completion_tokens < 2000
        await sub.unsubscribe()
        # the replica is free again
        _, ok = await collect(client, name, "after", max_tokens=3, ignore_eos=True)
        assert ok.completion_tokens == 3
        q = (await client.scheduler_stats()).queues[0]
        # two cancelled (one running, one queued), one timed out, two completed (the cancelled run included)
        assert (q.cancelled, q.timed_out, q.failed, q.completed, q.queue_depth) == (2, 1, 1, 2, 0), q

        # a client that vanishes mid-stream without a word: the scheduler notices and cancels its request
        gone_inbox = nc.new_inbox()
        gone_sub = await nc.subscribe(gone_inbox)
        gone = InferRequest(
            request_id="gone", model=name, prompt="x", max_tokens=2000, ignore_eos=True, stream_to=gone_inbox
        )
        await bus.request(nc, subjects.INFER, gone, Accepted)
        await gone_sub.next_msg(timeout=30)  # the first token arrived ...
        await gone_sub.unsubscribe()  # ... and the client vanished
        for _ in range(100):
            q = (await client.scheduler_stats()).queues[0]
            if q.completed == 3:
                break
            await asyncio.sleep(0.1)
        assert q.cancelled == 3 and q.completed == 3  # stopped long before 2000 tokens


async def test_in_a_batch_cancel_a_vanished_client_and_a_too_long_prompt_touch_only_their_request(
    nats_server, client, nc, tiny_model, tmp_path
):
    from iserve.messages import Accepted, CancelRequest, Completion, InferRequest, StreamMessage, decoder, encode

    async with Cluster(nats_server.url, tmp_path, context_tokens=2048) as cluster:
        cluster.services["deployer"].cfg.default_max_batch = 4
        name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
        dec = decoder(StreamMessage)

        async def start(request_id: str, max_tokens: int):
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            req = InferRequest(
                request_id=request_id, model=name, prompt="x", max_tokens=max_tokens, ignore_eos=True, stream_to=inbox
            )
            await bus.request(nc, subjects.INFER, req, Accepted)
            await sub.next_msg(timeout=30)  # its first token: it runs
            return sub

        async def completion(sub) -> Completion:
            while True:
                data = (await sub.next_msg(timeout=60)).data
                if data and isinstance(m := dec.decode(data), Completion):
                    return m

        keep = asyncio.create_task(collect(client, name, "keep going", max_tokens=200, ignore_eos=True))
        cancelled = await start("cancelled", 2000)
        gone = await start("gone", 2000)
        await nc.publish(subjects.INFER_CANCEL, encode(CancelRequest(request_id="cancelled")))
        await gone.unsubscribe()  # the client vanishes mid-stream
        with pytest.raises(errors.PromptTooLong):  # refused with its code; the batch goes on
            await collect(client, name, "x", max_tokens=2000, prompt_tokens=1000)
        done = await completion(cancelled)
        assert done.finish_reason == "cancelled" and done.completion_tokens < 2000
        chunks, kept = await keep
        assert kept.completion_tokens == 200 and kept.finish_reason == "length"
        alone, _ = await collect(client, name, "keep going", max_tokens=200, ignore_eos=True)
        assert [c.token_id for c in alone] == [c.token_id for c in chunks]

        async def all_done():
            q = (await client.scheduler_stats()).queues[0]
            return q if q.cancelled == 2 and q.in_flight == 0 and q.kv_blocks_total and not q.kv_blocks_used else None

        q = await wait_for(all_done, "both stopped requests cancelled and every KV block free", tries=300)
        assert q.max_batch == 4


# --- bad input ---------------------------------------------------------------------------------------


async def test_bad_checkpoints_get_clear_errors_and_nothing_is_stored(cluster, client, tiny_model, tmp_path):
    no_config = copy_model(tiny_model, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    truncated = copy_model(tiny_model, tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    corrupt = copy_model(tiny_model, tmp_path / "corrupt")
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 8 + shard.read_bytes()[8:])
    encoder = copy_model(tiny_model, tmp_path / "encoder")
    cfg = json.loads((encoder / "config.json").read_text())
    cfg.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (encoder / "config.json").write_text(json.dumps(cfg))
    cases = [
        (no_config, errors.CheckpointError, "config.json"),
        (truncated, errors.CheckpointError, "truncated"),
        (corrupt, errors.CheckpointError, "corrupt"),
        (encoder, errors.UnsupportedModel, "decoder-only"),
        (tmp_path / "does-not-exist", errors.CheckpointError, "not a directory"),
    ]
    for path, exc, words in cases:
        with pytest.raises(exc, match=words):
            await client.register(str(path))
    with pytest.raises(errors.BadRequest, match="name"):
        await client.register(str(no_config), "bad name!")
    assert (await client.models()).models == []  # nothing half-registered


async def test_unknown_model_infeasible_intent_and_long_prompt(cluster, client, tiny_model, tmp_path):
    with pytest.raises(errors.NotFound, match="not registered"):
        await client.deploy("ghost")
    with pytest.raises(errors.NotFound, match="not registered"):
        await collect(client, "ghost", "hi")
    name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    with pytest.raises(errors.Infeasible):
        await client.deploy(name, Intent(kind="latency-slo", slo_ms=0.0001))
    with pytest.raises(errors.BadRequest, match="slo"):
        await client.deploy(name, Intent(kind="latency-slo"))
    with pytest.raises(errors.PromptTooLong, match="context"):
        await collect(client, name, "x" * 400, max_tokens=8)
    # the services are still fine
    _, done = await collect(client, name, "ok", max_tokens=2, ignore_eos=True)
    assert done.completion_tokens == 2


async def test_no_gpu_memory_is_infeasible(nats_server, client, tiny_model, tmp_path):
    async with Cluster(nats_server.url, tmp_path, gpus="2x0.02GB"):
        info = await client.register(str(copy_model(tiny_model, tmp_path / "tiny")))
        with pytest.raises(errors.IServeError, match="free"):
            await client.wait_profiled(info.record.name, timeout=60)
        assert (await client.model(info.record.name)).record.status == "failed"


@pytest.mark.parametrize(
    "subject",
    [
        subjects.MODEL_REGISTER,
        subjects.MODEL_GET,
        subjects.MODEL_LIST,
        subjects.MODEL_UNREGISTER,
        subjects.PROFILE_GET,
        subjects.DEPLOY_REQUEST,
        subjects.UNDEPLOY_REQUEST,
        subjects.DEPLOYMENT_LIST,
        subjects.INFER,
        subjects.SCHEDULER_STATS,
        subjects.agent_launch("a0"),
        subjects.agent_stop("a0"),
        subjects.agent_profile("a0"),
    ],
)
async def test_malformed_messages_get_bad_request(cluster, nc, subject):
    from iserve.messages import ErrorReply, decode

    # not JSON, an unknown message type, the wrong JSON shape, a message that belongs elsewhere
    chunk = b'{"type":"token_chunk","request_id":"r","index":0,"token_id":1,"text":""}'
    for payload in (b"not json", b'{"type":"nope"}', b"[1, 2]", chunk):
        resp = await nc.request(subject, payload, timeout=5)
        reply = decode(resp.data, ErrorReply)
        assert reply.code == "bad_request" and subject in reply.message
    # and the service still answers a good request afterwards
    if subject == subjects.MODEL_LIST:
        from iserve.messages import ListModels, ModelList

        assert isinstance(await bus.request(nc, subject, ListModels(), ModelList), ModelList)


# --- several models on shared GPUs, load balancing, workers' health, the agent's and deployer's views -


async def wait_for(predicate, what: str, tries: int = 200, every: float = 0.05):
    for _ in range(tries):
        got = await predicate()
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


async def test_models_share_gpus_with_exact_memory_accounting(cluster, client, tiny_model, tmp_path):
    """Two models on two GPUs sized so that one whole model fits a GPU: the deployer counts what the
    other models hold (its own launches before the agent reports them, then the agent's reservations),
    falls back to a pipeline over both GPUs and says why, balances a model's replicas, and an undeploy
    gives the memory back."""
    from iserve.messages import Configuration

    for name in ("model-a", "model-b"):
        await client.register(str(copy_model(tiny_model, tmp_path / name)), name)
    for name in ("model-a", "model-b"):
        await client.wait_profiled(name, timeout=120)
    ests = {e.config: e for e in (await client.profile("model-a")).estimates}
    whole, halves = ests[Configuration(tp=1, pp=1)], ests[Configuration(tp=1, pp=2)]
    half = max(halves.stage_bytes(2, first=True, last=False), halves.stage_bytes(2, first=False, last=True))
    assert half < whole.total_bytes
    size = whole.total_bytes + half  # one whole model, then room for one pipeline stage, not a second model
    cluster.services["agent"].gpus.sizes = [size, size]
    deployer: DeployerService = cluster.services["deployer"]

    async def shrunk():
        states = deployer.gpu_states()
        return len(states) == 2 and all(g.total_bytes == g.free_bytes == size for g in states)

    await wait_for(shrunk, "the deployer to see the resized GPUs")

    # back to back, before any gpu.load shows the first launch: two models, two GPUs
    mem = (whole.total_bytes + halves.total_bytes) / 2 / 2**30  # between the two: pp2 is over the budget
    a1 = await client.deploy("model-a", Intent(kind="cost-budget", cost_model="memory", budget=mem))
    b1 = await client.deploy("model-b", Intent(kind="min-memory"))
    assert a1.deployment.config == b1.deployment.config == whole.config
    assert [r.config for r in a1.filtered] == [halves.config.key()] and "exceeds the budget" in a1.filtered[0].reason
    gpu_a, gpu_b = a1.deployment.gpus[0].gpu_index, b1.deployment.gpus[0].gpu_index
    assert gpu_a != gpu_b

    # a second replica of model-a no longer fits one GPU: a 2-stage pipeline over what both have left
    a2 = await client.deploy("model-a", Intent(kind="min-memory"))
    assert a2.deployment.config == halves.config
    assert [r.config for r in a2.rejected] == [whole.config.key()]
    assert "needs 1 GPU" in a2.rejected[0].reason and "did not fit" in a2.why
    assert sorted(g.gpu_index for g in a2.deployment.gpus) == [0, 1]
    assert sum(g.num_layers for g in a2.deployment.gpus) == 4 and a2.deployment.gpus[0].first_layer == 0
    assert a2.latency_ms > 0 and a2.cost > 0 and a2.deployment.estimate.total_bytes == halves.total_bytes
    # and now nothing else fits
    with pytest.raises(errors.Infeasible, match="free"):
        await client.deploy("model-b", Intent(kind="min-memory"))

    # the agent accounts every worker on its GPU
    for rep in (a1, b1, a2):
        await client.wait_ready(rep.deployment.deployment_id, timeout=120)
    loads = {g.gpu_index: g for g in await client.gpu_loads(0.6)}
    assert set(loads[gpu_a].workers) == {a1.deployment.worker_id, a2.deployment.worker_id}
    assert set(loads[gpu_b].workers) == {b1.deployment.worker_id, a2.deployment.worker_id}
    assert all(g.free_bytes < size - whole.total_bytes + 1 for g in loads.values())

    # model-a's two replicas share its requests
    async def one(i):
        _, done = await collect(client, "model-a", f"request {i}", max_tokens=12, ignore_eos=True)
        return done.deployment_id

    served = await asyncio.gather(*(one(i) for i in range(4)))
    assert sorted(served) == sorted([a1.deployment.deployment_id, a2.deployment.deployment_id] * 2)

    # undeploy gives model-b's GPU back; model-b fits again there (with a shorter context, as asked)
    await client.undeploy(b1.deployment.deployment_id)

    async def freed():
        loads = {g.gpu_index: g for g in await client.gpu_loads(0.3)}
        g = loads.get(gpu_b)
        return g is not None and b1.deployment.worker_id not in g.workers and g.free_bytes >= whole.total_bytes

    await wait_for(freed, "the undeployed model's GPU to be free", tries=40)
    b2 = await client.deploy("model-b", Intent(kind="min-memory"), context_tokens=128)
    assert b2.deployment.config == whole.config and b2.deployment.gpus[0].gpu_index == gpu_b
    assert b2.deployment.context_tokens == 128
    with pytest.raises(errors.BadRequest, match="profiled for"):
        await client.deploy("model-b", context_tokens=100_000)


async def test_a_hung_worker_is_killed_and_a_deployment_that_cannot_be_re_placed_fails_with_the_reason(
    cluster, client, tiny_model, tmp_path
):
    import os
    import signal

    agent: AgentService = cluster.services["agent"]
    agent.cfg.worker_stale_s = 3.0
    name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
    w = agent.workers[rep.deployment.worker_id]
    for _ in range(80):  # the agent watches a worker's heartbeats only once it has heard one
        if w.serving:
            break
        await asyncio.sleep(0.05)
    agent.gpus.sizes = [1 << 20, 1 << 20]  # the GPUs shrink to 1 MiB: nowhere to re-place it
    os.kill(w.proc.pid, signal.SIGSTOP)  # alive but silent: no heartbeats, no answers
    for _ in range(120):
        d = (await client.deployments()).deployments[0]
        if "could not re-place" in d.reason:
            break
        await asyncio.sleep(0.25)
    assert d.status == "failed" and d.worker_id == rep.deployment.worker_id
    assert "no heartbeat" in d.reason and "killed" in d.reason  # why the worker went
    assert "could not re-place" in d.reason and "fit" in d.reason  # why it stays failed
    assert rep.deployment.worker_id not in agent.workers
    with pytest.raises(errors.NotReady):
        await collect(client, name, "anyone?", max_tokens=2)


async def test_a_deploy_with_a_load_launches_the_replicas_it_needs(cluster, client, tiny_model, tmp_path):
    """An intent with an expected load above what one replica serves gets several replicas, each its
    own ready deployment of the same configuration, and the reply says how many and why; the
    scheduler spreads requests over them."""
    info = await client.register(str(copy_model(tiny_model, tmp_path / "tiny")), "")
    name = info.record.name
    await client.wait_profiled(name, timeout=120)
    cmap = await client.profile(name)
    # one request at a time (the test deployer's batch): a replica completes 1000 / latency req/s;
    # 1.2x the fastest one's most at 80% busy needs at least 2 of any configuration
    fastest = max(1000.0 / e.latency_ms(16, 8) for e in cmap.estimates)
    intent = Intent(kind="min-cost", prompt_tokens=16, output_tokens=8, rate=1.2 * 0.8 * fastest)
    rep = await client.deploy(name, intent)
    assert rep.replicas >= 2 and len(rep.others) == rep.replicas - 1
    assert f"{rep.replicas} replicas: at " in rep.replicas_why and rep.replicas_why in rep.why
    ids = [rep.deployment.deployment_id] + [o.deployment_id for o in rep.others]
    assert len(set(ids)) == len(ids) and all(o.config == rep.deployment.config for o in rep.others)
    for dep_id in ids:
        await client.wait_ready(dep_id, timeout=120)
    listed = (await client.deployments(name)).deployments
    assert sorted(d.deployment_id for d in listed) == sorted(ids)
    results = await asyncio.gather(*(collect(client, name, f"r{i}", max_tokens=4) for i in range(2 * len(ids))))
    assert all(done.completion_tokens >= 1 for _, done in results)
    served = {q.deployment_id for q in (await client.scheduler_stats()).queues if q.completed}
    assert len(served) >= 2, "the scheduler sent every request to one replica"
