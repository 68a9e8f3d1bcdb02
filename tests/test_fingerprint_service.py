"""The fingerprint service's profiling path against stand-in GPU agents on a real nats-server:
a run that dies or times out is retried once on another GPU, then reported; nothing partial is
stored; TP variants go to as many GPUs as the agent has room on, the rest are modeled; variants
the engine refused are explained in the map."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from iserve import bus, errors, subjects
from iserve.client import Client
from iserve.fingerprint.config import FingerprintConfig
from iserve.fingerprint.service import FingerprintService
from iserve.messages import (
    DecodeTiming,
    FingerprintMeasurement,
    GpuLoad,
    ProfileJob,
    ProfileResult,
    PromptTiming,
    encode,
)

CAPS = {"tp": [1, 2], "weight_quant": ["fp16"], "kv_quant": ["fp16"], "pruning": ["none"], "families": ["llama"]}
GPU_TYPE = "Fake GPU 24GB"


def synthetic_result(job: ProfileJob, *, skip_tp: bool = False) -> ProfileResult:
    """What a profiler would report for the job: a linear ground truth per variant."""
    ms = []
    skipped = {}
    for v in job.variants:
        if skip_tp and v.tp > 1:
            skipped[f"tp{v.tp}-w{v.weight_quant}-kv{v.kv_quant}-p{v.pruning}"] = "this engine build has no NCCL"
            continue
        for n in (1, 2):
            ms.append(
                FingerprintMeasurement(
                    num_layers=n,
                    variant=v,
                    tpot_ms=0.5 * n / v.tp + 1.0,
                    decode_steps=10,
                    peak_bytes=(300 + 20 * n) * 2**20,
                    ttft=[PromptTiming(prompt_tokens=p, ttft_ms=n * (1 + 0.01 * p) + 2) for p in job.prompt_lengths],
                    decode=[DecodeTiming(position=x, step_ms=0.5 * n / v.tp + 1.0) for x in (16, 17, 64)],
                )
            )
    return ProfileResult(
        job_id=job.job_id,
        device="cuda:0",
        gpu_type=GPU_TYPE,
        measurements=ms,
        gpu_seconds=3.0,
        wall_seconds=3.0,
        peak_bytes=340 * 2**20,
        skipped=skipped,
    )


class FakeAgent:
    """Publishes gpu.load for its GPUs and answers agent.<id>.profile with ``behave(job)``."""

    def __init__(
        self,
        agent_id: str,
        gpus: int,
        behave: Callable[[ProfileJob], Awaitable[ProfileResult]],
        simulated: bool = False,
    ):
        self.agent_id = agent_id
        self.gpus = gpus
        self.behave = behave
        self.simulated = simulated
        self.jobs: list[ProfileJob] = []

    async def start(self, url: str) -> None:
        self.nc = await bus.connect(url, f"fake-{self.agent_id}")
        self.sub = await bus.serve(self.nc, subjects.agent_profile(self.agent_id), ProfileJob, self._handle)
        self.task = asyncio.create_task(self._loads())

    async def _handle(self, job: ProfileJob, _msg) -> ProfileResult:
        self.jobs.append(job)
        return await self.behave(job)

    async def _loads(self) -> None:
        while True:
            for i in range(self.gpus):
                load = GpuLoad(
                    agent_id=self.agent_id,
                    gpu_index=i,
                    gpu_type=GPU_TYPE,
                    total_bytes=24 * 2**30,
                    used_bytes=0,
                    free_bytes=24 * 2**30 - i,
                    busy_fraction=0.0,
                    window_s=60,
                    simulated=self.simulated,
                )
                await self.nc.publish(subjects.gpu_load(self.agent_id, i), encode(load))
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        self.task.cancel()
        await self.sub.unsubscribe()
        await self.nc.drain()


async def _service(url: str, tmp: Path, caps: dict | None = None, **cfg) -> FingerprintService:
    """A started fingerprint service with short profiling settings (``cfg`` overrides them)."""
    settings: dict = dict(
        nats_url=url,
        log_level="warning",
        log_json=True,
        work_dir=tmp / "fp",
        context_tokens=256,
        prompt_lengths=[16, 32, 64],
        output_lengths=[4, 12],
        repeats=1,
        warmup=0,
        gpu_wait_s=10,
        profile_timeout_s=1.0,
        profile_reply_margin_s=0.5,
    )
    conf = FingerprintConfig(**{**settings, **cfg})
    svc = FingerprintService(conf, await bus.connect(url, "fingerprint"), CAPS if caps is None else caps)
    await svc.start()
    return svc


async def _run(nats_server, tmp_path, tiny_model, behave, *, gpus=2, name="tiny", simulated=False):
    agent = FakeAgent("a0", gpus, behave, simulated)
    await agent.start(nats_server.url)
    svc = await _service(nats_server.url, tmp_path)
    client = await Client.connect(nats_server.url)
    try:
        model = shutil.copytree(tiny_model, tmp_path / name)
        await client.register(str(model))
        outcome: object
        try:
            outcome = await client.wait_profiled(name, timeout=30)
        except errors.IServeError as e:
            outcome = e
        info = await client.model(name)
        try:
            cmap = await client.profile(name)
        except errors.NotReady:
            cmap = None
        return outcome, info.record, cmap, agent.jobs
    finally:
        await client.close()
        await svc.close()
        await svc.nc.drain()
        await agent.close()


async def test_a_failed_run_is_retried_once_on_another_gpu(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        if job.gpu_index == 0:
            raise errors.WorkerDied("the profiling worker for tiny exited with code -9: killed")
        return synthetic_result(job)

    done, rec, cmap, jobs = await _run(nats_server, tmp_path, tiny_model, behave)
    assert done.status == "ok" and rec.status == "profiled" and rec.profiled_gpu_types == [GPU_TYPE]
    assert [j.gpu_index for j in jobs] == [0, 1]
    # TP=2 measured on the agent's two GPUs; every 4-layer configuration on 2 GPUs is estimated
    assert jobs[1].gpu_indices == [1, 0] and {v.tp for v in jobs[1].variants} == {1, 2}
    assert cmap is not None and {e.config.key() for e in cmap.estimates} == {
        "tp1-pp1-wfp16-kvfp16-pnone",
        "tp1-pp2-wfp16-kvfp16-pnone",
        "tp2-pp1-wfp16-kvfp16-pnone",
    }
    assert all(e.method == "fingerprint" for e in cmap.estimates)
    assert (
        cmap.cost.gpu_seconds == 3.0 and cmap.cost.measured_variants == 2 and len(cmap.cost.fingerprint_fraction) == 2
    )


async def test_two_failures_are_reported_and_nothing_is_stored(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        raise errors.WorkerDied(f"GPU {job.gpu_index} fell off the bus")

    outcome, rec, cmap, jobs = await _run(nats_server, tmp_path, tiny_model, behave)
    assert isinstance(outcome, errors.IServeError)
    assert "GPU 0 fell off the bus" in str(outcome) and "GPU 1 fell off the bus" in str(outcome)
    assert rec.status == "failed" and "every GPU tried" in rec.status_reason
    assert cmap is None and len(jobs) == 2


async def test_a_run_that_times_out_is_retried_then_reported(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    outcome, rec, cmap, jobs = await _run(nats_server, tmp_path, tiny_model, behave)
    assert isinstance(outcome, errors.IServeError) and "no reply" in str(outcome)
    assert rec.status == "failed" and cmap is None and [j.gpu_index for j in jobs] == [0, 1]


async def test_one_gpu_models_tp_and_explains_refused_variants(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        return synthetic_result(job)

    done, rec, cmap, jobs = await _run(nats_server, tmp_path, tiny_model, behave, gpus=1)
    assert done.status == "ok" and jobs[0].gpu_indices == [0] and {v.tp for v in jobs[0].variants} == {1}
    assert [e.config.key() for e in cmap.estimates] == ["tp1-pp1-wfp16-kvfp16-pnone"]  # max_gpus 1: no TP at all

    async def refuse_tp(job: ProfileJob) -> ProfileResult:
        return synthetic_result(job, skip_tp=True)

    done, rec, cmap, jobs = await _run(nats_server, tmp_path / "b", tiny_model, refuse_tp, name="tiny-b")
    tp2 = {e.config.key(): e for e in cmap.estimates}["tp2-pp1-wfp16-kvfp16-pnone"]
    assert tp2.method == "fingerprint+comm" and cmap.cost.comm_model  # modeled from its TP=1 twin


async def test_an_architecture_the_engine_cannot_run_fails_with_the_reason(nats_server, tmp_path):
    from iserve.modelmaker import make_checkpoint

    async def behave(job: ProfileJob) -> ProfileResult:
        return synthetic_result(job)

    neox = make_checkpoint(tmp_path / "src" / "neox", "tiny-neox", num_layers=2)
    outcome, rec, cmap, jobs = await _run(nats_server, tmp_path, neox, behave, name="neox")
    assert isinstance(outcome, errors.IServeError) and "gpt_neox architecture family" in str(outcome)
    assert rec.status == "failed" and cmap is None and jobs == []


async def test_simulated_gpus_exclude_tensor_parallelism_with_the_reason(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        return synthetic_result(job)

    done, rec, cmap, jobs = await _run(nats_server, tmp_path, tiny_model, behave, simulated=True)
    assert done.status == "ok" and jobs[0].gpu_indices == [0] and {v.tp for v in jobs[0].variants} == {1}
    assert {e.config.key() for e in cmap.estimates} == {"tp1-pp1-wfp16-kvfp16-pnone", "tp1-pp2-wfp16-kvfp16-pnone"}
    [tp2] = [x for x in cmap.excluded if x.config.key() == "tp2-pp1-wfp16-kvfp16-pnone"]
    assert tp2.reason.startswith("not profiled: tensor parallelism is not profiled on simulated GPUs")
    assert jobs[0].batch_sizes == []  # batched steps are timed on real GPUs only, by default


async def test_real_gpus_time_the_batched_steps_at_the_configured_sizes(nats_server, tmp_path, tiny_model):
    async def behave(job: ProfileJob) -> ProfileResult:
        return synthetic_result(job)

    done, _, _, jobs = await _run(nats_server, tmp_path, tiny_model, behave)
    assert done.status == "ok" and jobs[0].batch_sizes == [1, 8, 32, 64]


async def test_profiling_runs_at_most_max_profiling_jobs_at_once(nats_server, tmp_path, tiny_model):
    running, most = 0, 0

    async def behave(job: ProfileJob) -> ProfileResult:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.3)
        running -= 1
        return synthetic_result(job)

    agent = FakeAgent("a0", 4, behave)
    await agent.start(nats_server.url)
    svc = await _service(nats_server.url, tmp_path, max_profiling_jobs=1)
    client = await Client.connect(nats_server.url)
    try:
        names = [f"m{i}" for i in range(3)]
        for n in names:  # three registrations at once: each waits for the one slot
            await client.register(str(shutil.copytree(tiny_model, tmp_path / n)))
        for n in names:
            await client.wait_profiled(n, timeout=30)
        assert most == 1 and len(agent.jobs) == 3
    finally:
        await client.close()
        await svc.close()
        await svc.nc.drain()
        await agent.close()
