"""The live load generator against a real nats-server and the real services (in this process, as in
test_services.py), with simulated GPUs and torch workers on the CPU: a short, hard-compressed slice
of the code trace is replayed open loop, and the run directory is checked request by request; then
the command line is run as its own process and stopped with Ctrl-C."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import sys
import time

from rich.console import Console
from test_services import Cluster

from iserve.client import Client
from iserve.fingerprint.config import FingerprintConfig
from iserve.fingerprint.service import FingerprintService
from iserve.gpu_agent.engine.capabilities import CAPABILITIES
from iserve.loadgen import replay, traces
from iserve.loadgen.config import LoadgenConfig
from iserve.loadgen.records import load_run


class ReplayCluster(Cluster):
    """test_services' cluster, with a fingerprint service that profiles fp16 only: these tests are
    about replaying a trace, and the whole configuration space would take minutes on 2 CPU cores."""

    async def start_service(self, name: str):
        if name != "fingerprint":
            return await super().start_service(name)
        cfg = FingerprintConfig(
            nats_url=self.url,
            log_level="warning",
            log_json=True,
            work_dir=self.tmp / "fp",
            context_tokens=self.context_tokens,
            prompt_lengths=[16, 64],
            output_lengths=[4, 12],
            repeats=1,
            warmup=1,
            gpu_wait_s=20,
        )
        caps = {**CAPABILITIES, "tp": [1], "weight_quant": ["fp16"], "kv_quant": ["fp16"], "pruning": ["none"]}
        svc = FingerprintService(cfg, await self._conn("fingerprint"), caps)
        await svc.start()
        self.services[name] = svc
        return svc


async def test_replay_records_every_request(nats_server, tiny_model, tmp_path):
    a = shutil.copytree(tiny_model, tmp_path / "tiny-a")
    b = shutil.copytree(tiny_model, tmp_path / "tiny-b")
    cfg = LoadgenConfig(
        nats_url=nats_server.url,
        models=[str(a), str(b)],  # checkpoint folders: the replay registers them and waits for their profiles
        trace="code",
        out=tmp_path / "run",
        interval_s=60.0,
        aggregate=30,
        rate=0.1,
        duration_s=8.0,
        max_requests=24,
        seed=1,
        deploy_every_s=0,  # both models before the replay
        intent="min-latency",
        slo_ms=60_000.0,
        sample_s=0.25,
        progress=False,
        ready_timeout_s=120,
        request_timeout_s=60,
    )
    planned = replay.plan_trace(cfg)
    assert len(planned) == 24
    async with ReplayCluster(nats_server.url, tmp_path / "cluster", gpus="2x24GB", context_tokens=256):
        result = await replay.run(cfg, console=Console(file=io.StringIO()))
        async with await Client.connect(nats_server.url) as c:
            assert (await c.deployments()).deployments == []  # the run undeployed what it deployed
    assert not result.interrupted and result.summary is not None
    run = load_run(tmp_path / "run")
    m = run.meta
    assert (
        m.kind == "live"
        and m.trace == "code"
        and m.aggregate == 30
        and m.requests == 24
        and m.models == ["tiny-a", "tiny-b"]
    )
    assert (
        m.gpu_count == 2 and m.gpu_type == "sim-gpu" and m.ended_at > m.t0_unix > m.started_at > 0 and not m.interrupted
    )
    # the intent's lengths: the replayed requests' medians, fitted into the profiled context of 256
    assert (
        m.intent.kind == "min-latency" and m.intent.prompt_tokens + m.intent.output_tokens <= 256 and m.slo_ms == 60_000
    )

    # one record per request, all successful, with the exact token counts asked for
    by_index = {r.index: r for r in run.requests}
    assert len(run.requests) == 24 and set(by_index) == {r.index for r in planned}
    assert all(r.status == "ok" for r in run.requests), [
        (r.status, r.error_message) for r in run.requests if r.status != "ok"
    ]
    for req in planned:
        r = by_index[req.index]
        want = traces.fit_lengths(req.context_tokens, req.generated_tokens, max_context=1024, model_context=256)
        assert (r.prompt_tokens, r.output_tokens, r.clipped) == (want.prompt_tokens, want.output_tokens, want.clipped)
        assert (r.trace_context_tokens, r.trace_generated_tokens) == (req.context_tokens, req.generated_tokens)
        assert r.output_tokens == req.generated_tokens or r.clipped
        # open loop: sent at its trace arrival (give the event loop a little slack), timings in order
        assert r.scheduled_s == req.arrival_s and 0 <= r.arrival_s - r.scheduled_s < 1.0
        assert r.arrival_s <= r.start_s <= r.first_token_s <= r.end_s
        assert r.ttft_ms > 0 and r.e2e_ms >= r.ttft_ms and r.queue_ms >= 0 and r.worker_ttft_ms > 0
        assert r.tpot_ms > 0 or r.output_tokens == 1
        assert abs(r.e2e_ms - (r.end_s - r.arrival_s) * 1000) < 1e-6
        assert r.model in ("tiny-a", "tiny-b") and r.deployment_id and r.config.startswith("tp")
        assert r.slo_ms == 60_000 and r.slo_met is True
    # the random assignment used both models, exactly as the pure assignment function says
    assert [by_index[req.index].model for req in planned] == traces.assign_models(
        planned, ["tiny-a", "tiny-b"], cfg.seed
    )
    assert set(result.summary.per_model) == {"tiny-a", "tiny-b"} and result.summary.ok == 24

    # GPU samples over time and the deployments' lives
    assert run.gpus and {g.gpu_index for g in run.gpus} == {0, 1}
    assert any(g.used_bytes > 0 and g.workers > 0 for g in run.gpus)
    assert any(g.t_s < 0 for g in run.gpus) and any(g.t_s > 0 for g in run.gpus)  # before and during the replay
    statuses = {(e.model, e.status) for e in run.deployments}
    for model in ("tiny-a", "tiny-b"):
        assert {(model, "requested"), (model, "launching"), (model, "ready"), (model, "stopped")} <= statuses
    launching = [e for e in run.deployments if e.status == "launching"]
    assert all(e.why and e.gpus and e.total_bytes > 0 for e in launching)


async def test_cli_ctrl_c_keeps_what_was_collected(nats_server, tiny_model, tmp_path):
    out = tmp_path / "run"
    async with ReplayCluster(nats_server.url, tmp_path / "cluster", gpus="1x24GB", context_tokens=256):
        async with await Client.connect(nats_server.url) as c:
            info = await c.register(str(shutil.copytree(tiny_model, tmp_path / "tiny")))
            await c.wait_profiled(info.record.name, timeout=120)
        argv = [
            "--models", f"{info.record.name},{info.record.name}", "--trace", "conv", "--interval-s", "60",
            "--aggregate", "30", "--rate", "0.1", "--deploy-every-s", "2", "--out", str(out), "--sample-s", "0.25",
            "--progress", "true",
        ]  # fmt: skip
        env = {**os.environ, "ISERVE_NATS_URL": nats_server.url, "ISERVE_LOG_LEVEL": "warning"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "iserve.loadgen",
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:

            def progressed() -> bool:  # 5 requests done and the second replica requested (at t = 2 s)
                requests, deployments = out / "requests.jsonl", out / "deployments.jsonl"
                return (
                    requests.exists()
                    and requests.read_bytes().count(b"\n") >= 5
                    and deployments.read_bytes().count(b'"status":"requested"') >= 2
                )

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not progressed():
                await asyncio.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            text, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        output = text.decode(errors="replace")
        assert proc.returncode == 130, output
        assert "stopped early" in output and str(out) in output
        async with await Client.connect(nats_server.url) as c:
            assert (await c.deployments()).deployments == []
    run = load_run(out)
    assert run.meta.interrupted and run.meta.ended_at > 0 and run.meta.command[:2] == ["iserve", "loadgen"]
    assert run.meta.requests > len(run.requests) >= 5  # stopped long before the 10-minute slice ended
    assert {r.status for r in run.requests} <= {"ok", "cancelled"}
    done = [r for r in run.requests if r.status == "ok"]
    assert len(done) >= 5 and all(r.output_tokens == min(r.trace_generated_tokens, 255) for r in done)
    # models are deployed on schedule while the trace plays: the second replica was requested at t=2 s
    assert [e.t_s for e in run.deployments if e.status == "requested"][
        1
    ] >= 2.0 - 0.05  # --deploy-every-s 2; the two clocks may differ by a few ms
