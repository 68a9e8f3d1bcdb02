"""A small async client of the iServe services, used by the CLI, the demo, loadgen and the tests.

async with Client.connect(url) as c:
    info = await c.register("/models/llama")
    done = await c.wait_profiled(info.record.name)
    rep = await c.deploy("llama", Intent(kind="min-latency"))
    await c.wait_ready(rep.deployment.deployment_id)
    async for chunk in c.generate("llama", "Hello"):
        print(chunk.text, end="")
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats.errors

from . import bus, errors, subjects
from .messages import (
    Accepted,
    CancelRequest,
    ChatMessage,
    Completion,
    ConfigurationMap,
    DeploymentChanged,
    DeploymentList,
    DeploymentRecord,
    DeployReply,
    DeployRequest,
    GetModel,
    GetProfile,
    GetSchedulerStats,
    GpuLoad,
    InferRequest,
    Intent,
    ListDeployments,
    ListModels,
    ModelInfo,
    ModelList,
    ModelRecord,
    PlacementChoice,
    ProfileDone,
    RegisterModel,
    SchedulerStats,
    TokenChunk,
    UndeployReply,
    UndeployRequest,
    UnregisterModel,
    UnregisterReply,
    decoder,
    encode,
)


class Client:
    def __init__(self, nc):
        self.nc = nc

    @classmethod
    async def connect(
        cls, url: str, name: str = "iserve-client", *, creds: str | None = None, give_up_after: float | None = 5.0
    ) -> "Client":
        """Connect to NATS at ``url`` (with the credentials file ``creds``, else ``$ISERVE_NATS_CREDS``);
        ``Unavailable`` after ``give_up_after`` seconds without a server (None: wait as long as it takes)."""
        return cls(await bus.connect(url, name, creds=creds, give_up_after=give_up_after))

    async def close(self) -> None:
        await self.nc.drain()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ models

    async def register(self, path: str, name: str = "", *, timeout: float = 60.0) -> ModelInfo:
        return await bus.request(
            self.nc, subjects.MODEL_REGISTER, RegisterModel(path=path, name=name), ModelInfo, timeout=timeout
        )

    async def model(self, name: str) -> ModelInfo:
        return await bus.request(self.nc, subjects.MODEL_GET, GetModel(name=name), ModelInfo)

    async def unregister(self, name: str) -> UnregisterReply:
        return await bus.request(self.nc, subjects.MODEL_UNREGISTER, UnregisterModel(name=name), UnregisterReply)

    async def models(self) -> ModelList:
        return await bus.request(self.nc, subjects.MODEL_LIST, ListModels(), ModelList)

    async def profile(self, model: str, gpu_type: str = "") -> ConfigurationMap:
        return await bus.request(
            self.nc, subjects.PROFILE_GET, GetProfile(model=model, gpu_type=gpu_type), ConfigurationMap
        )

    async def wait_profiled(
        self, model: str, *, timeout: float = 900.0, on_record: Callable[[ModelRecord], None] | None = None
    ) -> ProfileDone:
        """Wait for the model's profile.done (or return at once if it is already profiled). With
        ``on_record``, the model's record is read twice a second and passed to it (its ``profiling``
        says what each job does)."""
        sub = await self.nc.subscribe(subjects.PROFILE_DONE)
        poll = 2.0 if on_record is None else 0.5
        try:
            info = await self.model(model)
            if on_record is not None:
                on_record(info.record)
            if info.record.status == "profiled":
                return ProfileDone(model=model, gpu_type=info.record.profiled_gpu_types[0], status="ok")
            if info.record.status == "failed":
                raise errors.IServeError(f"profiling {model} failed: {info.record.status_reason}")
            deadline = time.monotonic() + timeout
            dec = decoder(ProfileDone)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.Timeout(f"{model} was not profiled within {timeout:.0f} s.")
                try:
                    msg = await sub.next_msg(timeout=min(left, poll))
                except nats.errors.TimeoutError:
                    info = await self.model(model)  # covers an event published before we subscribed
                    if on_record is not None:
                        on_record(info.record)
                    if info.record.status == "profiled":
                        return ProfileDone(model=model, gpu_type=info.record.profiled_gpu_types[0], status="ok")
                    if info.record.status == "failed":
                        raise errors.IServeError(f"profiling {model} failed: {info.record.status_reason}")
                    continue
                done = dec.decode(msg.data)
                if done.model != model:
                    continue
                if on_record is not None:  # the jobs' last steps
                    on_record((await self.model(model)).record)
                if done.status == "failed":
                    raise errors.IServeError(f"profiling {model} failed: {done.reason}")
                return done
        finally:
            await sub.unsubscribe()

    # ------------------------------------------------------------------ deployments

    async def deploy(
        self,
        model: str,
        intent: Intent | None = None,
        *,
        placement: PlacementChoice = "",
        deployment_id: str = "",
        context_tokens: int = 0,
        gpu_type: str = "",
        max_batch: int = 0,
        kv_tokens: int = 0,
        config: str = "",
        timeout: float = 60.0,
    ) -> DeployReply:
        req = DeployRequest(
            model=model,
            intent=intent or Intent(),
            placement=placement,
            deployment_id=deployment_id,
            context_tokens=context_tokens,
            gpu_type=gpu_type,
            max_batch=max_batch,
            kv_tokens=kv_tokens,
            config=config,
        )
        return await bus.request(self.nc, subjects.DEPLOY_REQUEST, req, DeployReply, timeout=timeout)

    async def undeploy(self, deployment_id: str) -> UndeployReply:
        return await bus.request(
            self.nc,
            subjects.UNDEPLOY_REQUEST,
            UndeployRequest(deployment_id=deployment_id),
            UndeployReply,
            timeout=60.0,
        )

    async def deployments(self, model: str = "") -> DeploymentList:
        return await bus.request(self.nc, subjects.DEPLOYMENT_LIST, ListDeployments(model=model), DeploymentList)

    async def wait_ready(self, deployment_id: str, *, timeout: float = 600.0) -> DeploymentRecord:
        sub = await self.nc.subscribe(subjects.DEPLOYMENT_CHANGED)
        try:
            deadline = time.monotonic() + timeout
            dec = decoder(DeploymentChanged)
            while True:
                for d in (await self.deployments()).deployments:
                    if d.deployment_id == deployment_id:
                        if d.status == "ready":
                            return d
                        if d.status in ("failed", "stopped"):
                            raise errors.WorkerDied(f"deployment {deployment_id} is {d.status}: {d.reason}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.Timeout(f"deployment {deployment_id} was not ready within {timeout:.0f} s.")
                try:
                    msg = await sub.next_msg(timeout=min(left, 2.0))
                except nats.errors.TimeoutError:
                    continue
                ev = dec.decode(msg.data)
                if ev.deployment.deployment_id == deployment_id and ev.deployment.status == "ready":
                    return ev.deployment
        finally:
            await sub.unsubscribe()

    # ------------------------------------------------------------------ cluster

    async def gpu_loads(self, seconds: float = 1.5) -> list[GpuLoad]:
        """Listen to gpu.load for ``seconds`` and return the latest report of each GPU."""
        latest: dict[tuple[str, int], GpuLoad] = {}
        dec = decoder(GpuLoad)

        async def cb(msg) -> None:
            try:
                g = dec.decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError):
                return
            latest[(g.agent_id, g.gpu_index)] = g

        sub = await self.nc.subscribe(subjects.GPU_LOAD_ALL, cb=cb)
        await asyncio.sleep(seconds)
        await sub.unsubscribe()
        return [latest[k] for k in sorted(latest)]

    async def scheduler_stats(self) -> SchedulerStats:
        return await bus.request(self.nc, subjects.SCHEDULER_STATS, GetSchedulerStats(), SchedulerStats)

    # ------------------------------------------------------------------ inference

    async def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        prompt_tokens: int = 0,
        timeout_s: float = 300.0,
        request_id: str = "",
        stream: "CompletionStream | None" = None,
        messages: list[ChatMessage] | None = None,
    ) -> AsyncIterator[TokenChunk]:
        """Stream a completion: yields ``TokenChunk``s; the final ``Completion`` is left on the
        ``stream`` object passed in (``CompletionStream``), or raised as an ``IServeError``."""
        s = stream or CompletionStream()
        req = InferRequest(
            request_id=request_id or uuid.uuid4().hex,
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            ignore_eos=ignore_eos,
            prompt_tokens=prompt_tokens,
            timeout_s=timeout_s,
            messages=list(messages or []),
        )
        s.request_id = req.request_id
        st = await bus.Stream(self.nc, idle_timeout=timeout_s).open()
        req.stream_to = st.inbox
        finished = False
        try:
            s.accepted = await bus.request(self.nc, subjects.INFER, req, Accepted, timeout=10.0)
            st.expect_keepalive(s.accepted.keepalive_s)
            s.submitted = time.monotonic()
            async for chunk in st:
                if s.first_token_at is None:
                    s.first_token_at = time.monotonic()
                yield chunk
            s.completion = st.completion
            finished = True
        finally:
            await st.close()
            if not finished and s.accepted is not None:
                await self.cancel(req.request_id)  # the caller stopped early (Ctrl-C, break): free the worker

    async def cancel(self, request_id: str) -> None:
        """Ask the scheduler to drop a request, queued or running (best effort: nothing is raised)."""
        try:
            await self.nc.publish(subjects.INFER_CANCEL, encode(CancelRequest(request_id=request_id)))
        except Exception:
            pass


class CompletionStream:
    """What a ``generate`` call leaves behind: the acceptance, the completion, client-side times."""

    def __init__(self) -> None:
        self.request_id = ""
        self.accepted: Accepted | None = None
        self.completion: Completion | None = None
        self.submitted: float | None = None
        self.first_token_at: float | None = None
