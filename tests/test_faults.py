"""Faults with real parts: a real nats-server, the services in this process (the scheduler also as
its own process, to kill -9), a simulated-GPU agent starting real worker processes.

* kill -9 of a worker: the running request ends with worker_died at once; the deployment is ready
  again within seconds on a new worker, and no second worker is launched.
* the agent dies (its connection cut, its workers killed as their parent watchdog does): the
  running request ends with worker_died; once an agent with that id is back, the deployment is too.
* a deployer restart launches nothing; a restart of everything on the same JetStream directory
  brings the ready deployment back.
* kill -9 of the scheduler mid-stream: the client gets ``unavailable`` within seconds; a restarted
  scheduler serves again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_services import Cluster, collect, copy_model, deployed

from iserve import errors
from iserve.client import Client, CompletionStream
from iserve.gpu_agent.service import AgentService
from iserve.messages import DeploymentRecord
from iserve.natsserver import EmbeddedNats

pytestmark = pytest.mark.timeout(240)


LONG = dict(max_tokens=1900, ignore_eos=True)  # streams for a while on the CPU (context 2048)


async def until(check, what: str, timeout: float = 60.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def record(client: Client, deployment_id: str) -> DeploymentRecord:
    return next(d for d in (await client.deployments()).deployments if d.deployment_id == deployment_id)


async def ready_with_new_worker(client: Client, deployment_id: str, old_worker: str, timeout: float = 60.0):
    async def check():
        d = await record(client, deployment_id)
        return d if d.status == "ready" and d.worker_id != old_worker else None

    return await until(check, f"{deployment_id} ready on a worker other than {old_worker}", timeout)


async def started_stream(client: Client, model: str):
    """A long request whose first token has arrived; returns (task ending in its outcome, stream)."""
    s = CompletionStream()
    first = asyncio.Event()

    async def run():
        async for _ in client.generate(model, "keep going", stream=s, **LONG):
            first.set()

    task = asyncio.create_task(run())
    await asyncio.wait_for(first.wait(), 60)
    return task, s


async def outcome(task: asyncio.Task, timeout: float) -> tuple[BaseException | None, float]:
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(task, timeout)
    except errors.IServeError as e:
        return e, time.monotonic() - t0
    return None, time.monotonic() - t0


def workers_of(agent: AgentService, deployment_id: str) -> list[str]:
    return [w.worker_id for w in agent.workers.values() if w.deployment_id == deployment_id]


async def crash(cluster: Cluster, name: str) -> None:
    """The service dies as with kill -9: its connection drops, nothing is said goodbye, nothing stopped."""
    svc = cluster.services.pop(name)
    cluster.conns.remove(svc.nc)
    await svc.nc.close()
    await svc._cancel_spawned()


async def test_killed_worker_is_relaunched_once_and_a_deployer_restart_launches_nothing(
    nats_server, client, tiny_model, tmp_path
):
    async with Cluster(nats_server.url, tmp_path, context_tokens=2048) as cluster:
        name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"), max_batch=2)
        did, old = rep.deployment.deployment_id, rep.deployment.worker_id
        agent: AgentService = cluster.services["agent"]

        # a deployer restart: the worker heartbeats, so nothing is relaunched
        await cluster.stop_service("deployer")
        await cluster.start_service("deployer")
        await asyncio.sleep(cluster.services["deployer"].cfg.startup_grace_s + 1.5)
        assert (await record(client, did)).worker_id == old and workers_of(agent, did) == [old]

        task, _ = await started_stream(client, name)
        t0 = time.monotonic()
        os.kill(agent.workers[old].proc.pid, signal.SIGKILL)
        err, _ = await outcome(task, 30)
        died_s = time.monotonic() - t0
        assert isinstance(err, errors.WorkerDied), err
        d = await ready_with_new_worker(client, did, old)
        ready_s = time.monotonic() - t0
        assert d.restarts == 1 and "exited" in d.cause and d.gpus == rep.deployment.gpus  # same GPUs
        await asyncio.sleep(2.0)  # several reconciliations later: still one worker, the same one
        assert workers_of(agent, did) == [d.worker_id] and (await record(client, did)).worker_id == d.worker_id
        _, done = await collect(client, name, "back", max_tokens=2, ignore_eos=True)
        assert done.completion_tokens == 2
        print(f"\nworker kill -9: worker_died after {died_s:.2f} s, ready again after {ready_s:.2f} s")
        assert died_s < 5 and ready_s < 30


async def test_a_dead_agent_fails_the_running_request_and_its_deployment_returns_with_it(
    nats_server, client, tiny_model, tmp_path
):
    async with Cluster(nats_server.url, tmp_path, context_tokens=2048) as cluster:
        name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"), max_batch=2)
        did, old = rep.deployment.deployment_id, rep.deployment.worker_id
        task, _ = await started_stream(client, name)
        agent: AgentService = cluster.services["agent"]
        procs = [w for w in agent.workers.values()]
        t0 = time.monotonic()
        await crash(cluster, "agent")
        for w in procs:  # what each worker's watchdog does when its agent process is gone
            w.signal(kill=True)
        err, _ = await outcome(task, 30)
        died_s = time.monotonic() - t0
        assert isinstance(err, errors.WorkerDied), err
        await cluster.start_service("agent")  # the supervisor restarts it, with the same id
        d = await ready_with_new_worker(client, did, old)
        ready_s = time.monotonic() - t0
        assert d.agent_id == "a0" and d.restarts == 1
        assert workers_of(cluster.services["agent"], did) == [d.worker_id]
        _, done = await collect(client, name, "back", max_tokens=2, ignore_eos=True)
        assert done.completion_tokens == 2
        print(f"\nagent death: worker_died after {died_s:.2f} s, ready again after {ready_s:.2f} s")
        assert died_s < 10 and ready_s < 40


async def test_a_stack_restart_on_the_same_data_dir_brings_ready_deployments_back(tiny_model, tmp_path):
    srv = EmbeddedNats(tmp_path / "nats").start()
    try:
        async with Cluster(srv.url, tmp_path) as cluster:
            async with await Client.connect(srv.url) as c:
                name, rep = await deployed(c, copy_model(tiny_model, tmp_path / "tiny"))
        # everything stopped (the agent stopped its worker), the server too; the record says ready
        assert not cluster.services
        srv.stop()
        srv = EmbeddedNats(tmp_path / "nats", port=srv.port).start()
        t0 = time.monotonic()
        async with Cluster(srv.url, tmp_path) as cluster:
            async with await Client.connect(srv.url) as c:
                d = await ready_with_new_worker(c, rep.deployment.deployment_id, rep.deployment.worker_id)
                ready_s = time.monotonic() - t0
                assert d.restarts == 1 and d.gpus == rep.deployment.gpus
                _, done = await collect(c, name, "again", max_tokens=3, ignore_eos=True)
                assert done.completion_tokens == 3
        print(f"\nstack restart: deployment ready again {ready_s:.2f} s after the services started")
        assert ready_s < 30
    finally:
        srv.stop()


def start_scheduler(url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "ISERVE_NATS_URL": url, "ISERVE_LOG_LEVEL": "warning", "ISERVE_REFRESH_S": "0.5"}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "iserve.scheduler"], env=env, stdout=out, stderr=out)


async def test_a_killed_scheduler_fails_the_stream_fast_and_a_restarted_one_serves(
    nats_server, client, tiny_model, tmp_path
):
    cluster = Cluster(nats_server.url, tmp_path, context_tokens=2048)
    for n in ("agent", "fingerprint", "deployer"):
        await cluster.start_service(n)
    proc = start_scheduler(nats_server.url, tmp_path / "scheduler.log")
    try:
        name, _ = await deployed(client, copy_model(tiny_model, tmp_path / "tiny"), max_batch=2)
        task, s = await started_stream(client, name)
        assert s.accepted is not None and s.accepted.keepalive_s == 1.0
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL)
        err, _ = await outcome(task, 30)
        gone_s = time.monotonic() - t0
        assert isinstance(err, errors.Unavailable) and "keep-alive" in err.message, err
        proc.wait(10)
        proc = start_scheduler(nats_server.url, tmp_path / "scheduler.log")

        async def served():
            try:
                return (await collect(client, name, "again", max_tokens=3, ignore_eos=True))[1]
            except (errors.Unavailable, errors.NotReady):
                return None

        done = await until(served, "a restarted scheduler to serve", timeout=60, every=0.5)
        assert done.completion_tokens == 3
        print(f"\nscheduler kill -9: unavailable after {gone_s:.2f} s")
        assert gone_s < 8
    finally:
        proc.kill()
        proc.wait(10)
        await cluster.__aexit__(None, None, None)


@pytest.mark.skipif(not os.environ.get("ISERVE_LONG_FAULTS"), reason="opt-in (ISERVE_LONG_FAULTS=1): a 35 s outage")
async def test_a_nats_outage_longer_than_30_s_ends_streams_and_the_deployment_comes_back(tiny_model, tmp_path):
    """NATS gone for 35 s with every service up: the stream in flight ends with a coded error, the
    agent stops the worker it cannot hear (--worker-stale-s 30), and once NATS is back the deployment
    is relaunched and serves, with no manual step."""
    srv = EmbeddedNats(tmp_path / "nats").start()
    try:
        async with Cluster(srv.url, tmp_path, context_tokens=2048) as cluster:
            async with await Client.connect(srv.url) as c:
                name, rep = await deployed(c, copy_model(tiny_model, tmp_path / "tiny"), max_batch=2)
                task, _ = await started_stream(c, name)
                srv.stop()
                err, after = await outcome(task, 30)
                assert isinstance(err, errors.IServeError) and err.code == "unavailable", err
                await asyncio.sleep(35 - after)
                srv = EmbeddedNats(tmp_path / "nats", port=srv.port).start()
                t0 = time.monotonic()

                async def deployer_answers() -> bool:  # the services reconnect by themselves
                    try:
                        return bool(await c.deployments())
                    except errors.Unavailable:
                        return False

                await until(deployer_answers, "the deployer to answer after NATS came back")
                await ready_with_new_worker(c, rep.deployment.deployment_id, rep.deployment.worker_id, timeout=90)
                _, done = await collect(c, name, "again", max_tokens=3, ignore_eos=True)
                assert done.completion_tokens == 3
                back = time.monotonic() - t0
                print(f"\nNATS outage of 35 s: stream ended after {after:.1f} s, serving {back:.1f} s after")
            assert cluster.services
    finally:
        srv.stop()
