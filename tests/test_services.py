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

from iserve import bus, errors, subjects
from iserve.client import Client, CompletionStream
from iserve.deployer.config import DeployerConfig
from iserve.deployer.service import DeployerService
from iserve.fingerprint.config import FingerprintConfig
from iserve.fingerprint.service import FingerprintService
from iserve.gpu_agent.config import AgentConfig
from iserve.gpu_agent.engine import CAPABILITIES

# The service tests profile on the CPU: measuring all of the engine's variants there takes about a
# minute per model, so they profile the fp16 variants only (the variants are covered in tests/engine).
TEST_CAPABILITIES = {**CAPABILITIES, "tp": [1], "weight_quant": ["fp16"], "kv_quant": ["fp16"], "pruning": ["none"]}
from iserve.gpu_agent.gpus import SimulatedGpus
from iserve.gpu_agent.load import parse_simulated
from iserve.gpu_agent.service import AgentService
from iserve.messages import Intent
from iserve.scheduler.config import SchedulerConfig
from iserve.scheduler.service import SchedulerService


class Cluster:
    """The services, each on its own NATS connection, in this event loop."""

    def __init__(self, url: str, tmp: Path, gpus: str = "2x24GB", context_tokens: int = 256):
        self.url = url
        self.tmp = tmp
        self.gpus = gpus
        self.context_tokens = context_tokens
        self.conns = []
        self.services: dict[str, object] = {}

    async def _conn(self, name):
        c = await bus.connect(self.url, name)
        self.conns.append(c)
        return c

    async def start_service(self, name: str):
        common = dict(nats_url=self.url, log_level="warning", log_json=True)
        if name == "agent":
            cfg = AgentConfig(
                agent_id="a0", simulate_gpus=self.gpus, gpu_type="sim-gpu", interval_s=0.25, load_window_s=120,
                work_dir=self.tmp / "agent", profile_timeout_s=300, **common,
            )
            svc = AgentService(cfg, await self._conn("agent"), SimulatedGpus(parse_simulated(self.gpus), "sim-gpu"))
        elif name == "fingerprint":
            cfg = FingerprintConfig(
                work_dir=self.tmp / "fp", context_tokens=self.context_tokens, prompt_lengths=[16, 64], output_lengths=[4, 12],
                repeats=2, warmup=1, gpu_wait_s=20, **common,
            )
            svc = FingerprintService(cfg, await self._conn("fingerprint"), TEST_CAPABILITIES)
        elif name == "deployer":
            svc = DeployerService(DeployerConfig(reconcile_s=0.5, gpu_stale_s=2.0, **common), await self._conn("deployer"))
        else:
            svc = SchedulerService(SchedulerConfig(refresh_s=0.5, client_check_s=0.2, **common), await self._conn("scheduler"))
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


@pytest.fixture
async def cluster(nats_server, tmp_path):
    async with Cluster(nats_server.url, tmp_path) as c:
        yield c


@pytest.fixture
async def client(nats_server):
    c = await Client.connect(nats_server.url)
    yield c
    await c.close()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


async def deployed(client: Client, path: Path, name: str = "", intent: Intent | None = None):
    info = await client.register(str(path), name)
    await client.wait_profiled(info.record.name, timeout=120)
    rep = await client.deploy(info.record.name, intent or Intent(kind="min-latency"))
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


async def test_fcfs_several_requests_in_order(cluster, client, tiny_model, tmp_path):
    name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))

    async def one(i):
        _, done = await collect(client, name, f"request {i}", max_tokens=6, ignore_eos=True)
        return done

    results = await asyncio.gather(*(one(i) for i in range(4)))
    assert all(r.completion_tokens == 6 for r in results)
    # one at a time: later requests waited in the queue
    assert max(r.queue_ms for r in results) > min(r.queue_ms for r in results)


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


async def test_request_of_a_vanished_client_is_cancelled(nats_server, client, nc, tiny_model, tmp_path):
    from iserve.messages import Accepted, InferRequest

    async with Cluster(nats_server.url, tmp_path, context_tokens=2048):
        name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"))
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        req = InferRequest(request_id="gone", model=name, prompt="x", max_tokens=2000, ignore_eos=True, stream_to=inbox)
        await bus.request(nc, subjects.INFER, req, Accepted)
        await sub.next_msg(timeout=30)  # the first token arrived ...
        await sub.unsubscribe()  # ... and the client vanished without a word
        for _ in range(100):
            q = (await client.scheduler_stats()).queues[0]
            if q.completed:
                break
            await asyncio.sleep(0.1)
        assert q.cancelled == 1  # stopped long before 2000 tokens


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
    for payload in (b"not json", b'{"type":"nope"}', b"[1, 2]", b'{"type":"token_chunk","request_id":"r","index":0,"token_id":1,"text":""}'):
        resp = await nc.request(subject, payload, timeout=5)
        reply = decode(resp.data, ErrorReply)
        assert reply.code == "bad_request" and subject in reply.message
    # and the service still answers a good request afterwards
    if subject == subjects.MODEL_LIST:
        from iserve.messages import ListModels, ModelList

        assert isinstance(await bus.request(nc, subject, ListModels(), ModelList), ModelList)
