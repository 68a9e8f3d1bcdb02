"""The fingerprint service (paper section 5): registers models and profiles them.

``model.register``
    Validate the checkpoint (headers only), store a ``ModelRecord`` in the ``iserve_models`` bucket,
    announce ``model.registered`` and start profiling in the background. Registering the same
    checkpoint again is a no-op that returns the existing record; a different checkpoint under a taken
    name is a conflict. Nothing is stored unless the checkpoint is valid.

Profiling (one task per model, resumed after a restart)
    For each GPU type the agents report and the model has no profile for yet: write the 1- and
    2-layer fingerprints from the real tensors (``generator``), run them on the least-loaded GPU of
    that type with enough free memory through the agent's profile path (retried once on another GPU),
    fit every configuration (``estimator``), store the ``ConfigurationMap`` in ``iserve_profiles`` and
    announce ``profile.done``. Tensor-parallel variants are measured on as many GPUs of that agent as
    have room (``ProfileJob.gpu_indices``); those above that are estimated from their TP=1 twin and
    the communication model (measured by the profiler when it had several GPUs, else the GPU type's
    default). On simulated GPUs TP configurations are excluded, with that reason. Any failure marks the
    model failed with the reason and publishes ``profile.done`` (status "failed"); a map is stored only
    when complete. Before it is stored, the quality cost of the map's lossy variants is measured once
    per checkpoint in a subprocess (``quality_run``, docs/quality.md); a failure there is recorded in
    the map (those variants are "not measured"), it does not fail profiling.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, checkpoint, errors, subjects
from iserve.messages import (
    ConfigurationMap,
    DeploymentRecord,
    GetModel,
    GetProfile,
    GpuLoad,
    ListModels,
    ModelInfo,
    ModelList,
    ModelRecord,
    ModelRegistered,
    ProfileDone,
    ProfileJob,
    ProfileResult,
    ProfilingCost,
    QualityReport,
    RegisterModel,
    UnregisterModel,
    UnregisterReply,
    decoder,
    encode,
    now,
)
from iserve.service import Service

from . import estimator, generator, quality_run
from .config import FingerprintConfig

log = structlog.get_logger()

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SIMULATED_TP = (
    "tensor parallelism is not profiled on simulated GPUs (their workers compute on the CPU, "
    "where TP timings say nothing about GPUs)"
)


@dataclass
class SeenGpu:
    load: GpuLoad
    at: float


def model_name_for(path: str, name: str) -> str:
    n = name or Path(path).resolve().name
    if not NAME_RE.match(n):
        raise errors.BadRequest(
            f"model name {n!r} is not usable: use letters, digits, '.', '_' or '-' (at most 128, starting with a "
            "letter or digit); pass --name."
        )
    return n


class FingerprintService(Service):
    def __init__(self, cfg: FingerprintConfig, nc: NATS, capabilities: dict):
        super().__init__(nc)
        self.cfg = cfg
        self.capabilities = capabilities
        self.gpus: dict[tuple[str, int], SeenGpu] = {}
        self.profiling: dict[str, asyncio.Task] = {}
        self._profile_slots = asyncio.Semaphore(cfg.max_profiling_jobs)
        self.register_lock = asyncio.Lock()
        self._quality: dict[tuple, QualityReport] = {}  # by checkpoint digest and variants: measured once

    async def setup(self) -> None:
        self.models = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_MODELS, ModelRecord, replicas=self.cfg.kv_replicas
        )
        self.profiles = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_PROFILES, ConfigurationMap, replicas=self.cfg.kv_replicas
        )
        self.deployments = await bus.TypedKV.open(
            self.nc, subjects.BUCKET_DEPLOYMENTS, DeploymentRecord, replicas=self.cfg.kv_replicas
        )

    async def subscribe(self) -> None:
        await self.serve(subjects.MODEL_REGISTER, RegisterModel, self.handle_register, queue="fingerprint")
        await self.serve(subjects.MODEL_GET, GetModel, self.handle_get, queue="fingerprint")
        await self.serve(subjects.MODEL_LIST, ListModels, self.handle_list, queue="fingerprint")
        await self.serve(subjects.MODEL_UNREGISTER, UnregisterModel, self.handle_unregister, queue="fingerprint")
        await self.serve(subjects.PROFILE_GET, GetProfile, self.handle_get_profile, queue="fingerprint")
        await self.listen(subjects.GPU_LOAD_ALL, self._on_gpu_load)

    async def started(self) -> None:
        # resume work a previous run did not finish
        for rec in await self.models.values():
            if rec.status in ("registered", "profiling"):
                self._start_profiling(rec.name)
        log.info("fingerprint service started", models=len(await self.models.keys()))

    async def stopping(self) -> None:
        for t in self.profiling.values():
            t.cancel()
        await asyncio.gather(*self.profiling.values(), return_exceptions=True)

    async def _on_gpu_load(self, msg: Msg) -> None:
        try:
            g = decoder(GpuLoad).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        self.gpus[(g.agent_id, g.gpu_index)] = SeenGpu(g, time.monotonic())

    def fresh_gpus(self) -> list[GpuLoad]:
        cutoff = time.monotonic() - self.cfg.gpu_stale_s
        return [s.load for s in self.gpus.values() if s.at >= cutoff]

    # ------------------------------------------------------------------ requests

    async def handle_register(self, req: RegisterModel, _msg: Msg) -> ModelInfo:
        if not req.path:
            raise errors.BadRequest(
                "RegisterModel.path is empty; give the checkpoint folder (config.json + *.safetensors)."
            )
        name = model_name_for(req.path, req.name)
        with structlog.contextvars.bound_contextvars(model=name):
            ck = await asyncio.to_thread(checkpoint.scan_checkpoint, req.path)
            async with self.register_lock:
                existing = await self.models.get(name)
                if existing is not None:
                    # identity: same folder and same structure (config + shard headers)
                    if existing.digest != ck.digest or existing.path != ck.path:
                        raise errors.Conflict(
                            f"a different checkpoint is already registered as {name!r} (from {existing.path}); "
                            "register this one under another --name."
                        )
                    if existing.status == "failed":  # a second try after a failure profiles again
                        existing.status = "registered"
                        existing.status_reason = ""
                        existing.updated_at = now()
                        await self.models.put(name, existing)
                    if existing.status != "profiled":
                        self._start_profiling(name)
                    return ModelInfo(record=existing, created=False)
                ts = now()
                record = ModelRecord(
                    name=name,
                    path=ck.path,
                    arch=ck.arch,
                    weights=checkpoint.weight_breakdown(ck),
                    digest=ck.digest,
                    has_tokenizer=ck.has_tokenizer,
                    registered_at=ts,
                    updated_at=ts,
                )
                if not await self.models.create(name, record):  # lost a race with another replica
                    return ModelInfo(record=await self.models.get(name) or record, created=False)
            await self.nc.publish(subjects.MODEL_REGISTERED, encode(ModelRegistered(record=record)))
            log.info("model registered", path=ck.path, layers=ck.arch.num_layers, gib=round(ck.data_bytes / 2**30, 3))
            self._start_profiling(name)
            return ModelInfo(record=record, created=True)

    async def handle_get(self, req: GetModel, _msg: Msg) -> ModelInfo:
        rec = await self.models.get(req.name)
        if rec is None:
            raise errors.NotFound(f"model {req.name!r} is not registered; see `iserve status` for registered models.")
        return ModelInfo(record=rec, created=False)

    async def handle_list(self, _req: ListModels, _msg: Msg) -> ModelList:
        return ModelList(models=sorted(await self.models.values(), key=lambda r: r.name))

    async def handle_unregister(self, req: UnregisterModel, _msg: Msg) -> UnregisterReply:
        rec = await self.models.get(req.name)
        if rec is None:
            raise errors.NotFound(f"model {req.name!r} is not registered; see `iserve status` for registered models.")
        live = [
            d.deployment_id
            for d in await self.deployments.values()
            if d.model == req.name and d.status in ("launching", "ready")
        ]
        if live:
            raise errors.Conflict(
                f"model {req.name!r} is deployed ({', '.join(sorted(live))}); undeploy it first (`iserve undeploy ID`)."
            )
        task = self.profiling.get(req.name)
        if task is not None and not task.done():
            task.cancel()  # profiling a model nobody wants any more
        removed = 0
        for gpu_type in rec.profiled_gpu_types:
            if await self.profiles.get(bus.kv_key(req.name, gpu_type)) is not None:
                await self.profiles.delete(bus.kv_key(req.name, gpu_type))
                removed += 1
        await self.models.delete(req.name)
        log.info("model unregistered", model=req.name, profiles=removed)
        return UnregisterReply(name=req.name, profiles_removed=removed)

    async def handle_get_profile(self, req: GetProfile, _msg: Msg) -> ConfigurationMap:
        rec = await self.models.get(req.model)
        if rec is None:
            raise errors.NotFound(f"model {req.model!r} is not registered.")
        types = rec.profiled_gpu_types if not req.gpu_type else [req.gpu_type]
        for t in types:
            cmap = await self.profiles.get(bus.kv_key(req.model, t))
            if cmap is not None:
                return cmap
        if req.gpu_type and rec.status == "profiled":
            raise errors.NotFound(
                f"model {req.model!r} has no profile for GPU type {req.gpu_type!r}; profiled: "
                f"{', '.join(rec.profiled_gpu_types)}."
            )
        raise errors.NotReady(
            f"model {req.model!r} has no profile{' for ' + req.gpu_type if req.gpu_type else ''} yet (status: "
            f"{rec.status})."
        )

    # ------------------------------------------------------------------ profiling

    def _start_profiling(self, name: str) -> None:
        t = self.profiling.get(name)
        if t is not None and not t.done():
            return
        self.profiling[name] = asyncio.create_task(self._profile_model(name))

    async def _update(self, name: str, **fields) -> ModelRecord | None:
        rec = await self.models.get(name)
        if rec is None:
            return None
        for k, v in fields.items():
            setattr(rec, k, v)
        rec.updated_at = now()
        await self.models.put(name, rec)
        return rec

    async def _profile_model(self, name: str) -> None:
        with structlog.contextvars.bound_contextvars(model=name):
            current = ""
            try:
                await self._step(name, "", "waiting for a GPU agent")
                types = await self._wait_for_gpu_types()
                rec = await self.models.get(name)
                if rec is None:
                    return
                todo = [t for t in types if t not in rec.profiled_gpu_types]
                steps = {k: v for k, v in rec.profiling.items() if k}
                rec = await self._update(name, profiling={**steps, **{t: "queued" for t in todo}})
                for gpu_type in types:
                    assert rec is not None  # None only if the record vanished: the run fails, as before
                    if await self.profiles.get(bus.kv_key(name, gpu_type)) is not None:
                        if gpu_type not in rec.profiled_gpu_types:
                            rec = await self._update(
                                name, profiled_gpu_types=sorted({*rec.profiled_gpu_types, gpu_type}), status="profiled"
                            )
                        continue
                    rec = await self._update(name, status="profiling", status_reason="")
                    assert rec is not None  # None only if the record vanished: the run fails, as before
                    current = gpu_type
                    async with self._profile_slots:  # bounded: a flood of registrations queues here
                        cmap = await self._profile_on(rec, gpu_type)
                    # the map first, then the record that points to it: a crash in between only redoes work
                    await self.profiles.put(bus.kv_key(name, gpu_type), cmap)
                    rec = await self._update(
                        name, status="profiled", profiled_gpu_types=sorted({*rec.profiled_gpu_types, gpu_type})
                    )
                    rec = await self._step(name, gpu_type, f"done: {len(cmap.estimates)} configurations")
                    done = ProfileDone(
                        model=name,
                        gpu_type=gpu_type,
                        status="ok",
                        configurations=len(cmap.estimates),
                        excluded=len(cmap.excluded),
                    )
                    await self.nc.publish(subjects.PROFILE_DONE, encode(done))
                    log.info(
                        "profile done",
                        gpu_type=gpu_type,
                        configurations=len(cmap.estimates),
                        excluded=len(cmap.excluded),
                        gpu_seconds=round(cmap.cost.gpu_seconds, 2),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                reason = e.message if isinstance(e, errors.IServeError) else f"{type(e).__name__}: {e}"
                log.error("profiling failed", error=reason)
                await self._step(name, current, "failed")
                await self._update(name, status="failed", status_reason=reason)
                await self.nc.publish(
                    subjects.PROFILE_DONE, encode(ProfileDone(model=name, gpu_type="", status="failed", reason=reason))
                )

    async def _step(self, name: str, gpu_type: str, text: str) -> ModelRecord | None:
        """Record what the profiling job of ``gpu_type`` ("": of the model, before the types are known) does now."""
        rec = await self.models.get(name)
        if rec is None:
            return None
        steps = {k: v for k, v in rec.profiling.items() if k or not gpu_type}
        return await self._update(name, profiling={**steps, gpu_type: text})

    async def _wait_for_gpu_types(self) -> list[str]:
        deadline = time.monotonic() + self.cfg.gpu_wait_s
        while True:
            types = sorted({g.gpu_type for g in self.fresh_gpus()})
            if types:
                return types
            if time.monotonic() > deadline:
                raise errors.Unavailable(
                    f"no GPU agent reported in {self.cfg.gpu_wait_s:.0f} s, so the model cannot be profiled; start "
                    "one (`iserve up` does)."
                )
            await asyncio.sleep(0.5)

    def _candidates(self, gpu_type: str, need_bytes: int) -> list[GpuLoad]:
        """GPUs to harvest for profiling: enough free memory, least loaded first (paper 8.6)."""
        gpus = [g for g in self.fresh_gpus() if g.gpu_type == gpu_type and g.free_bytes >= need_bytes]
        return sorted(gpus, key=lambda g: (round(g.busy_fraction, 2), -g.free_bytes, g.agent_id, g.gpu_index))

    async def _profile_on(self, rec: ModelRecord, gpu_type: str) -> ConfigurationMap:
        await self._step(rec.name, gpu_type, "writing fingerprints")
        ck = await asyncio.to_thread(checkpoint.scan_checkpoint, rec.path)
        if ck.digest != rec.digest:
            raise errors.CheckpointError(
                f"the checkpoint at {rec.path} changed since it was registered; register it again."
            )
        infos = await asyncio.to_thread(generator.make_fingerprints, ck, self.cfg.work_dir)
        same_type = [g for g in self.fresh_gpus() if g.gpu_type == gpu_type]
        per_host: dict[str, int] = {}
        for g in same_type:
            per_host[g.agent_id] = per_host.get(g.agent_id, 0) + 1
        max_gpus = max(per_host.values())
        gpu_bytes = max(g.total_bytes for g in same_type)
        configs = estimator.enumerate_configurations(rec.arch, max_gpus)
        supported, excluded = estimator.split_supported(configs, self.capabilities, arch=rec.arch)
        if not supported:
            why = excluded[0].reason if excluded else "no configuration"
            raise errors.UnsupportedModel(
                f"the engine can run none of {rec.name}'s configurations on {gpu_type}: {why}."
            )
        # A fingerprint needs its weights, a KV cache and working memory; ask for twice its size.
        need = 2 * max(i.bytes for i in infos) + 256 * 2**20
        cands = self._candidates(gpu_type, need)
        if not cands:
            raise errors.Infeasible(
                f"no {gpu_type} GPU has {need / 2**30:.2f} GiB free to profile {rec.name}'s fingerprints; free some "
                "memory."
            )
        job = ProfileJob(
            job_id=uuid.uuid4().hex[:12],
            model=rec.name,
            fingerprint_paths=[i.path for i in infos],
            gpu_index=cands[0].gpu_index,
            variants=[],
            prompt_lengths=self.cfg.prompt_lengths,
            output_lengths=self.cfg.output_lengths,
            repeats=self.cfg.repeats,
            warmup=self.cfg.warmup,
            context_tokens=self.cfg.context_tokens,
            timeout_s=self.cfg.profile_timeout_s,
            device_timing=self.cfg.device_timing,
            gpu_warmup_s=self.cfg.gpu_warmup_s,
            replay_depth=estimator.replay_depth(rec.arch, self.cfg.replay_depth),
            replay_distinct=self.cfg.replay_distinct,
            batch_sizes=self.cfg.simulated_batch_sizes if cands[0].simulated else self.cfg.batch_sizes,
        )
        # the model cannot attend further than its position embeddings reach
        job.context_tokens = min(self.cfg.context_tokens, rec.arch.max_position)
        # a short-context model is measured at lengths that fit it
        job.prompt_lengths, job.output_lengths = estimator.profiling_lengths(
            self.cfg.prompt_lengths, self.cfg.output_lengths, job.context_tokens
        )
        t0 = time.monotonic()
        result: ProfileResult | None = None
        attempts: list[str] = []
        for gpu in cands[:2]:  # one retry, on another GPU
            job.gpu_index = gpu.gpu_index
            job.gpu_indices = self._tp_gpus(gpu, cands)
            job.variants = estimator.measurement_variants(supported, max_tp=len(job.gpu_indices))
            log.info(
                "profiling",
                gpu_type=gpu_type,
                agent=gpu.agent_id,
                gpu=gpu.gpu_index,
                gpus=job.gpu_indices,
                variants=len(job.variants),
            )
            await self._step(
                rec.name, gpu_type, f"measuring {len(job.variants)} variants on {gpu.agent_id}/GPU {gpu.gpu_index}"
            )
            try:
                result = await bus.request(
                    self.nc,
                    subjects.agent_profile(gpu.agent_id),
                    job,
                    ProfileResult,
                    timeout=job.timeout_s + self.cfg.profile_reply_margin_s,
                )
                break
            except errors.IServeError as e:
                attempts.append(f"{gpu.agent_id}/GPU {gpu.gpu_index}: {e.message}")
                log.warning("profiling attempt failed", agent=gpu.agent_id, gpu=gpu.gpu_index, error=e.message)
        if result is None:
            raise errors.WorkerDied("profiling failed on every GPU tried: " + "; ".join(attempts))
        if not result.measurements:
            why = "; ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items())) or "nothing was measured"
            raise errors.UnsupportedModel(f"the profiler could measure no variant of {rec.name} on {gpu_type}: {why}")
        await self._step(rec.name, gpu_type, "fitting the configurations")
        sizes, fractions = generator.fingerprint_cost_fields(infos)
        cost = ProfilingCost(
            gpu_seconds=result.gpu_seconds,
            wall_seconds=time.monotonic() - t0,
            peak_bytes=result.peak_bytes,
            fingerprint_bytes=sizes,
            fingerprint_fraction=fractions,
            nvml_peak_bytes=result.nvml_peak_bytes,
            measured_variants=len({m.variant for m in result.measurements}),
        )
        skipped = dict(result.skipped)
        if gpu.simulated:
            # CPU timings say nothing about GPU tensor parallelism, measured or modeled.
            comm = None
            for v in estimator.measurement_variants(supported):
                if v.tp > 1:
                    skipped.setdefault(v.key(), SIMULATED_TP)
        elif result.allreduce_bus_gbps > 0:
            comm = estimator.CommModel(result.allreduce_latency_us, result.allreduce_bus_gbps, source="measured")
        else:
            comm = estimator.default_comm(gpu_type)
        cmap = estimator.build_configuration_map(
            model=rec.name,
            gpu_type=gpu_type,
            arch=rec.arch,
            weights=rec.weights,
            measurements=result.measurements,
            capabilities=self.capabilities,
            gpu_memory_bytes=gpu_bytes,
            max_gpus=max_gpus,
            context_tokens=job.context_tokens,
            configs=configs,
            cost=cost,
            device=f"{result.device}:{result.gpu_type}",
            created_at=now(),
            comm=comm,
            skipped=skipped,
        )
        variants = quality_run.lossy_variants(e.config for e in cmap.estimates)
        cmap.quality = await self._measure_quality(rec, gpu_type, [i.path for i in infos], variants)
        return cmap

    async def _measure_quality(
        self, rec: ModelRecord, gpu_type: str, fingerprints: list[str], variants: list[str]
    ) -> QualityReport | None:
        """The quality cost of the model's lossy variants (docs/quality.md), measured once per checkpoint
        in a subprocess; None when ``--quality-method off``."""
        cfg = self.cfg
        method = quality_run.choose_method(
            cfg.quality_method, rec.weights.checkpoint_bytes, int(cfg.quality_full_max_gib * 2**30)
        )
        if not method:
            return None
        if not variants:  # nothing lossy to measure
            return QualityReport(method=method)  # type: ignore[arg-type]
        key = (rec.digest, method, tuple(variants))
        if key not in self._quality:
            await self._step(rec.name, gpu_type, f"measuring quality ({method} method)")

            async def progress(text: str) -> None:
                await self._step(rec.name, gpu_type, text)

            cmd = quality_run.command(rec.path, method, fingerprints, variants, cfg.quality_prompts, cfg.quality_tokens)
            report = await quality_run.run(cmd, timeout_s=cfg.quality_timeout_s, method=method, on_progress=progress)
            log.info("quality measured", method=method, variants=len(report.variants), error=report.error or None)
            self._quality[key] = report
        return self._quality[key]

    def _tp_gpus(self, first: GpuLoad, cands: list[GpuLoad]) -> list[int]:
        """``first`` and the other GPUs of its agent that have room for a fingerprint, up to the
        largest power of two: tensor-parallel variants up to that degree are measured on them.
        Simulated GPUs compute on the CPU, where TP timings mean nothing: their TP is modeled."""
        if first.simulated:
            return [first.gpu_index]
        same = [g.gpu_index for g in cands if g.agent_id == first.agent_id and g.gpu_index != first.gpu_index]
        out = [first.gpu_index] + same
        n = 1
        while n * 2 <= len(out):
            n *= 2
        return out[:n]
