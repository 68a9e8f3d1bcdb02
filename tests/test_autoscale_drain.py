"""The autoscaling loop's drain, with the services in this process over a real nats-server and real
worker processes on simulated GPUs: a replica marked draining takes no new request, finishes the ones
it holds, and only then is undeployed; the loop's state survives in JetStream."""

from __future__ import annotations

import asyncio
import time

from test_services import Cluster, collect, deployed

from iserve import subjects
from iserve.client import Client
from iserve.deployer.autoscale_loop import AutoscaleLoop
from iserve.deployer.config import DeployerConfig
from iserve.messages import AutoscaleState

LONG = dict(max_tokens=160, ignore_eos=True, timeout_s=120)


async def test_a_draining_replica_finishes_its_requests_before_it_is_undeployed(nats_server, tiny_model, tmp_path):
    async with Cluster(nats_server.url, tmp_path, publish_load_s=0.25) as c:
        client = await Client.connect(nats_server.url)
        try:
            model, rep_a = await deployed(client, tiny_model, "drain-tiny", max_batch=2)
            await client.deploy(model, rep_a.deployment.intent, max_batch=2, deployment_id="drain-tiny-b")
            await client.wait_ready("drain-tiny-b", timeout=120)
            a, b = rep_a.deployment.deployment_id, "drain-tiny-b"

            deployer = c.services["deployer"]
            cfg = DeployerConfig(nats_url=nats_server.url, autoscale=True, autoscale_max_replicas=1)
            loop = AutoscaleLoop(deployer, cfg)  # type: ignore[arg-type]
            await loop.setup()
            await deployer.nc.subscribe(subjects.SCHEDULER_LOAD, cb=loop.on_load)
            await loop._save(AutoscaleState(model=model, added=[b]))

            # 2 slots each: both replicas run two and queue four; a draining one still runs its queue
            first = [asyncio.create_task(collect(client, model, f"held {i}", **LONG)) for i in range(12)]
            deadline = time.monotonic() + 30
            while not any(q.deployment_id == b and q.in_flight for q in (await client.scheduler_stats()).queues):
                assert time.monotonic() < deadline, "no request ever ran on the second replica"
                await asyncio.sleep(0.1)
            st = await loop._drain(loop.states[model], b, "test: drain it")
            await loop._save(st)
            await asyncio.sleep(0.2)  # the scheduler has applied the drain (deploy.changed)
            later = [asyncio.create_task(collect(client, model, f"new {i}", max_tokens=8)) for i in range(3)]

            steps = 0  # undeploying it while it held a request would fail that request (worker_died)
            while any(d.deployment_id == b for d in (await client.deployments(model)).deployments):
                steps += 1
                assert steps < 200, "the drained replica was never undeployed"
                await loop.step(time.time())
                await asyncio.sleep(0.2)

            done = [(await t)[1] for t in first + later]
            assert all(x is not None for x in done)
            by = [x.deployment_id for x in done]
            assert by[:12].count(b) == 6, by  # half of the first ran on the drained replica, to the end
            assert all(x.completion_tokens == 160 for x in done[:12])
            assert by[12:] == [a, a, a], by  # nothing new went to it once it drained
            st = loop.states[model]
            assert st.added == [] and st.draining == [], st

            again = AutoscaleLoop(deployer, cfg)  # type: ignore[arg-type]
            await again.setup()  # a restarted deployer reads the state back
            assert again.states[model] == st
        finally:
            await client.close()
