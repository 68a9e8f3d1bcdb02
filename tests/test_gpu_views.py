"""The agent's and the deployer's views of the GPUs over a real nats-server: NVML readings and the busy
window the agent publishes, what the deployer makes of them, and the KV listing the services trust."""

from __future__ import annotations

import asyncio

import pytest

from iserve import bus, subjects
from iserve.deployer.config import DeployerConfig
from iserve.deployer.service import DeployerService
from iserve.gpu_agent.config import AgentConfig
from iserve.gpu_agent.gpus import SimulatedGpus
from iserve.gpu_agent.service import AgentService


async def wait_for(predicate, what: str, tries: int = 200, every: float = 0.05):
    for _ in range(tries):
        got = await predicate()
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


class ScriptedGpus(SimulatedGpus):
    """One GPU whose readings come as NVML would give them (hardware memory use and utilization),
    so the agent's NVML path runs without a GPU."""

    simulated = False

    def __init__(self):
        super().__init__([8 << 30], "H100")
        self.used = 1 << 30
        self.util = 50.0

    def read(self):
        from iserve.gpu_agent.gpus import GpuReading

        return [GpuReading(0, "H100", 8 << 30, self.used, self.util)]


async def test_agent_publishes_nvml_memory_utilization_and_the_busy_window(nats_server, nc, tmp_path):
    from iserve.messages import GpuLoad, decode

    conn = await bus.connect(nats_server.url, "agent")
    gpus = ScriptedGpus()
    cfg = AgentConfig(
        nats_url=nats_server.url,
        log_level="warning",
        log_json=True,
        agent_id="n0",
        simulate_gpus="",
        gpu_type="",
        interval_s=0.1,
        load_window_s=1.0,
        work_dir=tmp_path / "agent",
        profile_timeout_s=60,
    )
    agent = AgentService(cfg, conn, gpus)
    seen: list[GpuLoad] = []

    async def on_load(msg):
        seen.append(decode(msg.data, GpuLoad))

    sub = await nc.subscribe(subjects.gpu_load("n0", 0), cb=on_load)
    await agent.start()
    try:
        await asyncio.sleep(1.5)  # more than the 1 s window
        g = seen[-1]
        assert (g.total_bytes, g.used_bytes, g.free_bytes) == (8 << 30, 1 << 30, 7 << 30)
        assert g.util_percent == 50.0 and not g.simulated and g.window_s == 1.0
        assert g.busy_fraction == pytest.approx(0.5, abs=0.05)  # busy half of every second in the window
        assert len(seen) >= 10  # one report per interval
        gpus.util = 0.0
        await asyncio.sleep(1.5)
        assert seen[-1].busy_fraction < 0.05  # the window slid past the busy seconds
    finally:
        await sub.unsubscribe()
        await agent.close()
        await conn.drain()


async def test_deployer_sees_the_busy_window_and_memory_others_hold(nats_server, nc):
    from iserve.messages import GpuLoad, encode

    gib = 1 << 30
    conn = await bus.connect(nats_server.url, "deployer")
    cfg = DeployerConfig(nats_url=nats_server.url, log_level="warning", log_json=True, gpu_stale_s=1.0)
    svc = DeployerService(cfg, conn)
    await svc.start()

    async def report(index, free, busy, workers=()):
        g = GpuLoad(
            agent_id="h",
            gpu_index=index,
            gpu_type="T",
            total_bytes=80 * gib,
            used_bytes=80 * gib - free,
            free_bytes=free,
            busy_fraction=busy,
            window_s=120.0,
            workers=list(workers),
        )
        await nc.publish(subjects.gpu_load("h", index), encode(g))
        await nc.flush()

    try:
        await report(0, 60 * gib, 0.9, ["another-model"])
        await report(1, 80 * gib, 0.1)

        async def both():
            return len(svc.gpu_states()) == 2

        await wait_for(both, "the deployer to see both GPUs")
        states = {g.gpu_index: g for g in svc.gpu_states()}
        assert (states[0].load, states[0].free_bytes) == (0.9, 60 * gib)  # load = busy fraction of the window
        assert (states[1].load, states[1].free_bytes) == (0.1, 80 * gib)
        # a launch no report shows yet still holds its memory ...
        svc.pending["w-new"] = {("h", 1): 10 * gib}
        assert {g.gpu_index: g.free_bytes for g in svc.gpu_states()}[1] == 70 * gib
        # ... until the agent's report includes the worker (and its reservation)
        await report(1, 70 * gib, 0.1, ["w-new"])

        async def settled():
            return "w-new" not in svc.pending

        await wait_for(settled, "the pending launch to be settled")
        assert {g.gpu_index: g.free_bytes for g in svc.gpu_states()}[1] == 70 * gib
        # GPUs that stop reporting are left out of decisions
        await asyncio.sleep(1.2)
        assert svc.gpu_states() == []
    finally:
        await svc.close()
        await conn.drain()


async def test_kv_listing_reads_the_bucket_not_a_racy_watch(nc):
    """``TypedKV.values`` (the deployment list the scheduler trusts) lists every live key, leaves
    deleted ones out, and does not come back empty while keys exist, even when asked many times at
    once (nats-py's watch-based ``keys()`` can)."""
    from iserve.messages import Rejection

    kv = await bus.TypedKV.open(nc, "iserve_test_listing", Rejection)
    assert await kv.values() == []
    for i in range(5):
        await kv.put(f"k{i}", Rejection(config=f"c{i}", reason="r"))
    await kv.delete("k0")
    await kv.put("k1", Rejection(config="c1", reason="updated"))
    listings = await asyncio.gather(*(kv.values() for _ in range(20)))
    for got in listings:
        assert sorted((r.config, r.reason) for r in got) == [("c1", "updated"), ("c2", "r"), ("c3", "r"), ("c4", "r")]
