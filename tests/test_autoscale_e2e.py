"""Autoscaling through the real stack (``iserve up``'s ``Stack``: a nats-server, the gpu-agent, the
deployer and the scheduler as their own processes, simulated GPUs, the workers on the CPU): a step of
concurrent requests adds a replica, the end of the step drains and removes it, and every request is
answered. The fingerprint service runs in the test's process so that it profiles the fp16 variant
only (all of the engine's variants take over a minute on the CPU)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter

import pytest
from test_services import TEST_CAPABILITIES

from iserve import bus, errors
from iserve.client import Client, CompletionStream
from iserve.fingerprint.config import FingerprintConfig
from iserve.fingerprint.service import FingerprintService
from iserve.modelmaker import make_checkpoint
from iserve.natsserver import free_port
from iserve.stack import Stack, StackOptions
from iserve.tokenizer_files import write_byte_tokenizer

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ENV = {
    "ISERVE_RECONCILE_S": "0.5",  # deployer
    "ISERVE_GPU_STALE_S": "2",  # deployer, fingerprint
    "ISERVE_INTERVAL_S": "0.25",  # gpu-agent
    "ISERVE_REFRESH_S": "0.5",  # scheduler
    "ISERVE_PUBLISH_LOAD_S": "0.25",  # scheduler
    # the deployer's autoscaling settings: short windows so that the test is short
    "ISERVE_AUTOSCALE_INTERVAL_S": "0.5",
    "ISERVE_AUTOSCALE_UP_WINDOWS": "2",
    "ISERVE_AUTOSCALE_DOWN_WINDOWS": "4",
    "ISERVE_AUTOSCALE_DWELL_S": "2",
    "ISERVE_AUTOSCALE_MAX_REPLICAS": "2",
}
LOOPS = 8  # concurrent clients during the step, on a replica of 2 slots


class Load:
    def __init__(self, client: Client, model: str):
        self.client, self.model = client, model
        self.outcomes: Counter[str] = Counter()
        self.served_by: Counter[str] = Counter()
        self.stop = asyncio.Event()

    async def loop(self) -> None:
        while not self.stop.is_set():
            s = CompletionStream()
            try:
                async for _ in self.client.generate(
                    self.model, "hello", max_tokens=24, ignore_eos=True, timeout_s=60, stream=s
                ):
                    pass
                assert s.completion is not None
                self.outcomes["completed"] += 1
                self.served_by[s.completion.deployment_id] += 1
            except errors.IServeError as e:
                self.outcomes[e.code] += 1


async def wait_for(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


async def test_a_load_step_adds_a_replica_and_its_end_drains_and_removes_it(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", "tiny-llama", num_layers=2)
    write_byte_tokenizer(model_dir)
    opts = StackOptions(
        data_dir=tmp_path / "stack",
        simulate_gpus="2x8GB",
        gpu_type="sim-8GB",
        log_to_files=True,
        extra_env=ENV,
        autoscale=True,  # iserve up --autoscale
        http_port=free_port(),
        services=("gpu-agent", "deployer", "scheduler"),
    )
    t0 = time.monotonic()
    with Stack(opts) as stack:
        fp_cfg = FingerprintConfig(
            nats_url=stack.url,
            work_dir=tmp_path / "fp",
            context_tokens=256,
            prompt_lengths=[16, 32],
            output_lengths=[4, 8],
            repeats=1,
            warmup=0,
            replay_depth=0,
            gpu_warmup_s=0.0,
            gpu_stale_s=2.0,
            log_level="warning",
        )
        fp_nc = await bus.connect(stack.url, "fingerprint", creds=stack.creds("fingerprint"), give_up_after=30)
        fingerprint = FingerprintService(fp_cfg, fp_nc, TEST_CAPABILITIES)
        await fingerprint.start()
        client = await Client.connect(stack.url, "autoscale-test", creds=stack.creds(), give_up_after=30)
        try:
            deadline = time.monotonic() + 60
            while True:  # the services start in parallel with this
                try:
                    info = await client.register(str(model_dir), "scale-tiny")
                    break
                except errors.Unavailable:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.5)
            model = info.record.name
            await client.wait_profiled(model, timeout=120)
            rep = await client.deploy(model, max_batch=2, context_tokens=256)
            first = rep.deployment.deployment_id
            await client.wait_ready(first, timeout=60)
            t_ready = time.monotonic()

            async def ready_ids() -> list[str]:
                return [d.deployment_id for d in (await client.deployments(model)).deployments if d.status == "ready"]

            load = Load(client, model)
            loops = [asyncio.create_task(load.loop()) for _ in range(LOOPS)]
            try:
                # the step: a second replica is added, becomes ready and serves
                await wait_for("a replica added", lambda: _added(client, model, first, load), timeout=60)
                t_added = time.monotonic()
            finally:
                load.stop.set()
                await asyncio.gather(*loops)
            t_end = time.monotonic()
            # the end of the step: drained and removed, the first deployment left alone
            await wait_for("the replica removed", lambda: _only(ready_ids, first), timeout=60)
            t_removed = time.monotonic()
            listing = await client.deployments(model)
            (state,) = listing.autoscaling
            assert state.last_action == "remove" and "low load" in state.last_reason, state
            assert state.added == [] and state.draining == [] and state.replicas == 1, state
            status = subprocess.run(
                [sys.executable, "-c", "from iserve.cli import main; main()", "status"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "ISERVE_NATS_URL": stack.url, "ISERVE_NATS_CREDS": stack.creds(), "COLUMNS": "200"},
            )
            assert status.returncode == 0 and "Autoscaling" in status.stdout, status.stdout + status.stderr
            assert "remove" in status.stdout and "low load" in status.stdout, status.stdout
        finally:
            await client.close()
            await fingerprint.close()
            await fp_nc.drain()
    print(
        f"\nready after {t_ready - t0:.1f} s; replica added and serving {t_added - t_ready:.1f} s into the step; "
        f"removed {t_removed - t_end:.1f} s after it; outcomes {dict(load.outcomes)}; served by {dict(load.served_by)}"
    )
    assert set(load.outcomes) == {"completed"}, load.outcomes  # every request answered, none failed
    assert len(load.served_by) == 2 and first in load.served_by, load.served_by


async def _added(client: Client, model: str, first: str, load: Load) -> bool:
    """A replica other than ``first`` is ready and has served requests of the step."""
    deps = (await client.deployments(model)).deployments
    others = [d.deployment_id for d in deps if d.deployment_id != first and d.status == "ready"]
    return any(load.served_by[i] >= 2 for i in others)


async def _only(ready_ids, first: str) -> bool:
    return await ready_ids() == [first]
