"""A distributed bus: three nats-server nodes on this machine (as one would run them on three hosts),
JetStream buckets replicated three times. Losing a node loses no state, and two gpu-agents on
different nodes act as two hosts."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from iserve import bus
from iserve import subjects as S
from iserve.messages import GpuLoad, decoder
from iserve.natsserver import EmbeddedNats, free_port


@pytest.fixture
def nodes(tmp_path):
    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    nodes = [
        EmbeddedNats(tmp_path / f"n{i}", port=ports[i], name=f"n{i}", cluster_port=routes[i], routes=routes)
        for i in range(3)
    ]
    for n in nodes:
        n.start()
    yield nodes
    for n in nodes:
        n.stop()


async def _replicated_bucket(url: str):
    nc = await bus.connect(url, "test", give_up_after=10)
    deadline = time.monotonic() + 30  # the nodes elect a JetStream leader first
    while True:
        try:
            return nc, await bus.bucket(nc, S.BUCKET_MODELS, replicas=3)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_losing_a_node_loses_no_state(nodes):
    urls = ",".join(n.url for n in nodes)
    nc, kv = await _replicated_bucket(urls)
    try:
        await kv.put("m", b"kept")
        info = await nc.jetstream().stream_info(f"KV_{S.BUCKET_MODELS}")
        assert info.config.num_replicas == 3
        os.kill(nodes[0].proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the client moves to a surviving node; the stream elects a new leader
            try:
                assert (await kv.get("m")).value == b"kept"
                await kv.put("m2", b"written after the loss")
                break
            except AssertionError:
                raise
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
    survivor = await bus.connect(nodes[2].url, "other", give_up_after=10)
    try:
        kv2 = await bus.bucket(survivor, S.BUCKET_MODELS, replicas=3)
        assert (await kv2.get("m")).value == b"kept" and (await kv2.get("m2")).value == b"written after the loss"
    finally:
        await survivor.close()


async def test_two_agents_on_different_nodes_are_two_hosts(nodes, tmp_path):
    from iserve.gpu_agent.config import AgentConfig
    from iserve.gpu_agent.gpus import SimulatedGpus
    from iserve.gpu_agent.load import parse_simulated
    from iserve.gpu_agent.service import AgentService

    agents = []
    for i, node in enumerate(nodes[:2]):
        cfg = AgentConfig(
            nats_url=node.url, log_level="warning", log_json=True, agent_id=f"host{i}", simulate_gpus="1x24GB",
            gpu_type="sim", interval_s=0.2, work_dir=tmp_path / f"agent{i}",
        )  # fmt: skip
        agent = AgentService(
            cfg, await bus.connect(node.url, f"agent{i}"), SimulatedGpus(parse_simulated("1x24GB"), "sim")
        )
        await agent.start()
        agents.append(agent)
    watcher = await bus.connect(nodes[2].url, "watcher", give_up_after=10)
    seen: set[str] = set()

    async def on_load(msg) -> None:
        seen.add(decoder(GpuLoad).decode(msg.data).agent_id)

    try:
        await watcher.subscribe(S.GPU_LOAD_ALL, cb=on_load)
        deadline = time.monotonic() + 15
        while seen != {"host0", "host1"} and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert seen == {"host0", "host1"}  # the third node sees both hosts' GPUs
    finally:
        await watcher.close()
        for a in agents:
            await a.close()
            await a.nc.close()
