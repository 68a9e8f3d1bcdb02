"""``iserve up``'s supervision: a crashed nats-server comes back with its JetStream state, a crashed
service is restarted, a service stopped on purpose (exit code 0) stays stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from iserve import bus
from iserve import subjects as S
from iserve.client import Client
from iserve.stack import Stack, StackOptions


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_a_killed_nats_server_comes_back_with_its_state(tmp_path):
    with Stack(StackOptions(data_dir=tmp_path, services=())) as stack:

        async def put() -> None:
            nc = await bus.connect(stack.url, "t", creds=stack.creds("fingerprint"), give_up_after=5)
            kv = await bus.bucket(nc, S.BUCKET_MODELS)
            await kv.put("m", b"kept")
            await nc.close()

        async def get() -> bytes:
            nc = await bus.connect(stack.url, "t", creds=stack.creds("deployer"), give_up_after=5)
            kv = await bus.bucket(nc, S.BUCKET_MODELS)
            value = (await kv.get("m")).value
            await nc.close()
            return value

        asyncio.run(put())
        assert stack.nats is not None and stack.nats.proc is not None
        first = stack.nats.proc.pid
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: stack.nats.running() and stack.nats.proc.pid != first), "nats-server not restarted"
        assert asyncio.run(get()) == b"kept"
        assert not stack.failed


def test_a_crashed_service_restarts_and_a_stopped_one_stays_stopped(tmp_path):
    with Stack(StackOptions(data_dir=tmp_path, services=("scheduler",), log_to_files=True)) as stack:
        (child,) = stack.children

        def answers() -> bool:
            async def ask() -> bool:
                async with await Client.connect(stack.url, creds=stack.creds(), give_up_after=5) as c:
                    try:
                        await c.scheduler_stats()
                        return True
                    except Exception:
                        return False

            return asyncio.run(ask())

        assert _wait(answers, 60), "the scheduler never answered"
        pid = child.proc.pid
        os.kill(pid, signal.SIGKILL)
        assert _wait(lambda: child.proc is not None and child.proc.pid != pid), "a crashed service was not restarted"
        assert _wait(answers, 60)
        os.kill(child.proc.pid, signal.SIGTERM)  # what an operator's `kill` sends: a clean stop
        assert _wait(lambda: child.proc is None), "a cleanly stopped service was restarted"
        time.sleep(1.5)
        assert child.proc is None and not stack.failed
