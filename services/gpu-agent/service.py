"""The GPU agent: one per host. It

* publishes ``gpu.load.<agent>.<gpu>`` every second for each GPU (memory and the paper's busy
  fraction over a sliding window),
* launches and stops model workers (``agent.<id>.launch`` / ``agent.<id>.stop``) as child processes
  restricted to their GPUs, and reports a worker that exits (``worker.exited``). A worker with
  tensor parallelism ``tp > 1`` is ``tp`` processes, one per rank (``stages[s * tp + r]`` is stage
  ``s`` of rank ``r``), sharing one worker id; rank 0 is the one on NATS. When any rank exits, the
  others are stopped and the worker is reported once,
* runs profiling jobs (``agent.<id>.profile``) through the same launch path, in profile mode,
* watches its serving workers' health: a worker that has served (sent an ``idle`` or ``busy``
  heartbeat) and then stays silent for ``worker_stale_s`` (hung, or cut off from NATS) is killed, and
  its ``worker.exited`` says so, so that the deployer re-places the deployment or marks it failed.

Memory: the agent reserves each worker's estimated per-GPU bytes until the worker exits; free memory
is the total minus the larger of what the hardware reports used and what is reserved. Simulated GPUs
have no hardware reading, so reservations are their whole story.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from iserve import bus, errors, subjects
from iserve.messages import (
    GetModel,
    GpuLoad,
    LaunchReply,
    LaunchWorker,
    ModelInfo,
    ProfileJob,
    ProfileResult,
    StopReply,
    StopWorker,
    WorkerExited,
    WorkerHeartbeat,
    decoder,
    encode,
)
from iserve.service import Service

from .config import AgentConfig
from .gpus import GpuReading, Gpus
from .load import BusyWindow, busy_from_heartbeats

log = structlog.get_logger()

STOP_GRACE_S = 10.0


@dataclass
class WorkerProc:
    worker_id: str
    deployment_id: str
    gpu_indices: list[int]
    reserved: dict[int, int]  # gpu index -> bytes
    proc: asyncio.subprocess.Process
    log_path: Path
    mode: str  # "serve" or "profile"
    expected_exit: bool = False
    busy_seconds: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    followers: list[asyncio.subprocess.Process] = field(default_factory=list)  # TP ranks 1..tp-1
    follower_logs: list[Path] = field(default_factory=list)
    last_beat: float = 0.0  # monotonic time of its last heartbeat
    serving: bool = False  # it has sent an idle/busy heartbeat (it loaded and serves)
    unhealthy: str = ""  # why the agent killed it, if it did

    @property
    def procs(self) -> list[asyncio.subprocess.Process]:
        return [self.proc, *self.followers]

    def signal(self, *, kill: bool = False) -> None:
        """Terminate (or kill) every rank still running; one that exits meanwhile is skipped."""
        for p in self.procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    (p.kill if kill else p.terminate)()


def exit_reason(w: "WorkerProc") -> str:
    """Why a worker exited: the line a rank wrote to its error file (rank 0 first), else the end of
    rank 0's log."""
    for path in (w.log_path, *w.follower_logs):
        try:
            text = path.with_suffix(".error").read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text if path == w.log_path else f"tensor-parallel rank {w.follower_logs.index(path) + 1}: {text}"
    return log_tail(w.log_path) or f"exit code {w.exit_code}"


def trtllm_serves(config) -> bool:
    """Whether the worker for ``config`` will run TensorRT-LLM (which starts its own ranks). Torch is
    imported into the agent only where ``tensorrt_llm`` is installed at all."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False
    from .engine.trtllm import use_trtllm

    return use_trtllm(config)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a tensor-parallel worker's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, lines: int = 5, max_chars: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    tail = " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())
    return tail[-max_chars:]


class AgentService(Service):
    def __init__(self, cfg: AgentConfig, nc: NATS, gpus: Gpus):
        super().__init__(nc)
        self.cfg = cfg
        self.gpus = gpus
        # The workers and profiling runs it starts read it from their environment (gpus.pin_to_gpu_cpus).
        os.environ["ISERVE_PIN_CPUS"] = "1" if cfg.pin_cpus else "0"
        self.workers: dict[str, WorkerProc] = {}
        self.windows: dict[int, BusyWindow] = {}
        self._prev_busy: dict[int, dict[str, float]] = {}
        self.readings: list[GpuReading] = []
        (cfg.work_dir / "workers").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        self.readings = await asyncio.to_thread(self.gpus.read)
        self.windows = {r.index: BusyWindow(self.cfg.load_window_s) for r in self.readings}

    async def subscribe(self) -> None:
        aid = self.cfg.agent_id
        await self.serve(subjects.agent_launch(aid), LaunchWorker, self.handle_launch)
        await self.serve(subjects.agent_stop(aid), StopWorker, self.handle_stop)
        await self.serve(subjects.agent_profile(aid), ProfileJob, self.handle_profile)
        await self.listen(subjects.WORKER_HEARTBEAT + ".>", self._on_heartbeat)

    async def started(self) -> None:
        self.spawn(self._publish_loop())
        log.info(
            "gpu agent started",
            agent_id=self.cfg.agent_id,
            gpus=len(self.readings),
            gpu_type=self.readings[0].gpu_type if self.readings else "",
            simulated=self.gpus.simulated,
        )

    async def stopping(self) -> None:
        await asyncio.gather(*(self._stop_worker(w) for w in list(self.workers.values())), return_exceptions=True)

    async def close(self) -> None:
        await super().close()
        self.gpus.close()

    # ------------------------------------------------------------------ load reports

    def reserved_bytes(self, index: int) -> int:
        return sum(w.reserved.get(index, 0) for w in self.workers.values())

    def free_bytes(self, r: GpuReading) -> int:
        used = max(r.used_bytes, self.reserved_bytes(r.index))
        return max(r.total_bytes - used, 0)

    def check_health(self, now: float) -> list[str]:
        """Kill the serving workers whose heartbeats stopped ``worker_stale_s`` ago; returns their ids.
        Their exit is then reported by ``_watch`` with the reason set here."""
        stale = self.cfg.worker_stale_s
        killed: list[str] = []
        if stale <= 0:
            return killed
        for w in list(self.workers.values()):
            if w.mode != "serve" or not w.serving or w.unhealthy or w.expected_exit:
                continue
            silent = now - w.last_beat
            if silent <= stale:
                continue
            w.unhealthy = (
                f"no heartbeat for {silent:.0f} s (more than --worker-stale-s {stale:g}): the worker hung or lost "
                f"its NATS connection, so agent {self.cfg.agent_id} killed it"
            )
            log.error("worker unhealthy; killing it", worker_id=w.worker_id, silent_s=round(silent, 1))
            w.signal(kill=True)
            killed.append(w.worker_id)
        return killed

    async def _publish_loop(self) -> None:
        interval = self.cfg.interval_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            dt = now - last
            last = now
            self.check_health(now)
            try:
                self.readings = await asyncio.to_thread(self.gpus.read)
            except Exception as e:
                log.warning("gpu read failed", error=str(e))
                continue
            for r in self.readings:
                on_gpu = {w.worker_id: w.busy_seconds for w in self.workers.values() if r.index in w.gpu_indices}
                busy = busy_from_heartbeats(self._prev_busy.get(r.index, {}), on_gpu, dt)
                self._prev_busy[r.index] = on_gpu
                # NVML utilization is the share of its sample period with a kernel running.
                busy = max(busy, dt * r.util_percent / 100.0)
                window = self.windows.setdefault(r.index, BusyWindow(self.cfg.load_window_s))
                window.add(now, dt, busy)
                msg = GpuLoad(
                    agent_id=self.cfg.agent_id,
                    gpu_index=r.index,
                    gpu_type=r.gpu_type,
                    total_bytes=r.total_bytes,
                    used_bytes=r.total_bytes - self.free_bytes(r),
                    free_bytes=self.free_bytes(r),
                    busy_fraction=window.fraction(now),
                    window_s=self.cfg.load_window_s,
                    util_percent=r.util_percent if not self.gpus.simulated else 100.0 * busy / max(dt, 1e-9),
                    simulated=self.gpus.simulated,
                    workers=sorted(w.worker_id for w in self.workers.values() if r.index in w.gpu_indices),
                    ts=time.time(),
                )
                try:
                    await self.nc.publish(subjects.gpu_load(self.cfg.agent_id, r.index), encode(msg))
                except Exception as e:
                    log.warning("publish gpu.load failed", error=str(e))

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = decoder(WorkerHeartbeat).decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return
        w = self.workers.get(hb.worker_id)
        if w is not None:
            w.busy_seconds = max(w.busy_seconds, hb.busy_seconds)
            w.last_beat = time.monotonic()
            if hb.state in ("idle", "busy"):
                w.serving = True

    # ------------------------------------------------------------------ workers

    def _check_gpus(self, indices: list[int], need: dict[int, int], what: str) -> None:
        by_index = {r.index: r for r in self.readings}
        for i in indices:
            if i not in by_index:
                raise errors.BadRequest(
                    f"{what} names GPU {i}, but agent {self.cfg.agent_id} has GPUs 0..{len(by_index) - 1}."
                )
        if len(set(indices)) != len(indices):
            raise errors.BadRequest(f"{what} names a GPU twice ({indices}); each pipeline stage needs its own GPU.")
        for i, b in need.items():
            free = self.free_bytes(by_index[i])
            if b > free:
                raise errors.Infeasible(
                    f"{what} needs {b / 2**30:.2f} GiB on GPU {i} but only {free / 2**30:.2f} GiB is free; re-plan "
                    "the deployment."
                )

    async def _spawn_worker(
        self,
        worker_id: str,
        deployment_id: str,
        mode: str,
        gpu_indices: list[int],
        reserved: dict[int, int],
        args: list[str],
        ranks: list[tuple[list[int], list[str]]] | None = None,
    ) -> WorkerProc:
        """Start a worker's process(es), all seeing ``gpu_indices``. ``ranks``: per process, the GPUs of
        its stages and its extra arguments (default: one process with every GPU, in order)."""
        log_path = self.cfg.work_dir / "workers" / f"{worker_id}.log"
        env = dict(os.environ)
        env.update(self.gpus.visible_devices_env(gpu_indices))
        env.setdefault("PYTHONUNBUFFERED", "1")
        procs = []
        logs = []
        for r, (rank_gpus, rank_args) in enumerate(ranks or [(gpu_indices, [])]):
            path = log_path if r == 0 else log_path.with_name(f"{worker_id}.rank{r}.log")
            devices = ",".join(self.gpus.device_for(i, gpu_indices.index(i)) for i in rank_gpus)
            cmd = [
                sys.executable,
                "-m",
                "iserve.gpu_agent.worker",
                mode,
                *args,
                *rank_args,
                "--agent-id",
                self.cfg.agent_id,
                "--nats-url",
                self.cfg.nats_url,
                "--devices",
                devices,
                "--error-file",
                str(path.with_suffix(".error")),
            ]
            path.with_suffix(".error").unlink(missing_ok=True)
            logf = open(path, "ab")
            try:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf, env=env
                    )
                )
            finally:
                logf.close()
            logs.append(path)
            log.info(
                "worker started",
                worker_id=worker_id,
                mode=mode,
                pid=procs[-1].pid,
                gpus=rank_gpus,
                devices=devices,
                rank=r,
            )
        w = WorkerProc(
            worker_id,
            deployment_id,
            gpu_indices,
            reserved,
            procs[0],
            log_path,
            mode,
            followers=procs[1:],
            follower_logs=logs[1:],
        )
        self.workers[worker_id] = w
        self.spawn(self._watch(w))
        return w

    async def _watch(self, w: WorkerProc) -> None:
        waits = {asyncio.ensure_future(p.wait()): p for p in w.procs}
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        first = next(iter(done))
        code = first.result()
        if pending:  # a tensor-parallel rank exited: the others cannot go on without it
            w.signal()
            try:
                await asyncio.wait_for(asyncio.gather(*pending), STOP_GRACE_S)
            except asyncio.TimeoutError:
                w.signal(kill=True)
                await asyncio.gather(*pending)
        if waits[first] is not w.proc and w.proc.returncode not in (None, 0) and code == 0:
            code = w.proc.returncode
        w.exit_code = code
        self.workers.pop(w.worker_id, None)
        w.exited.set()
        if w.mode != "serve":
            return
        reason = "stopped on request" if w.expected_exit else (w.unhealthy or exit_reason(w))
        log.log(
            20 if w.expected_exit else 40,
            "worker exited",
            worker_id=w.worker_id,
            exit_code=code,
            expected=w.expected_exit,
            reason=reason,
        )
        event = WorkerExited(
            worker_id=w.worker_id,
            deployment_id=w.deployment_id,
            agent_id=self.cfg.agent_id,
            exit_code=code,
            expected=w.expected_exit,
            reason=reason,
        )
        try:
            await self.nc.publish(subjects.WORKER_EXITED, encode(event))
        except Exception as e:
            log.warning("publish worker.exited failed", error=str(e))

    async def _stop_worker(self, w: WorkerProc) -> None:
        """Stop rank 0 (which releases the other ranks); kill whatever is left after the grace time."""
        w.expected_exit = True
        if w.proc.returncode is None:
            try:
                w.proc.terminate()
            except ProcessLookupError:
                pass
        try:
            await asyncio.wait_for(w.exited.wait(), STOP_GRACE_S)
        except asyncio.TimeoutError:
            w.signal(kill=True)
            await w.exited.wait()

    async def handle_launch(self, req: LaunchWorker, _msg: Msg) -> LaunchReply:
        with structlog.contextvars.bound_contextvars(worker_id=req.worker_id, deployment_id=req.deployment_id):
            existing = self.workers.get(req.worker_id)
            if existing is not None:  # a retried launch: idempotent
                return LaunchReply(worker_id=req.worker_id, pid=existing.proc.pid, agent_id=self.cfg.agent_id)
            if not req.stages:
                raise errors.BadRequest("launch has no stages; give at least one stage with its GPU and layers.")
            tp = req.config.tp
            if tp < 1 or len(req.stages) % tp:
                raise errors.BadRequest(
                    f"launch has {len(req.stages)} stage entries for tensor parallelism {tp}; give tp entries per "
                    "pipeline stage (stage s of rank r is stages[s * tp + r])."
                )
            if any(s.memory_bytes <= 0 for s in req.stages):
                raise errors.BadRequest(
                    f"launch of {req.worker_id} gives a stage no memory; every stage must reserve the bytes it holds."
                )
            indices = [s.gpu_index for s in req.stages]
            need: dict[int, int] = {}
            for s in req.stages:
                need[s.gpu_index] = need.get(s.gpu_index, 0) + s.memory_bytes
            self._check_gpus(indices, need, f"worker {req.worker_id}")
            if self.cfg.verify_launches:
                await self._check_registered(req.model, req.model_path)
            spec_path = self.cfg.work_dir / "workers" / f"{req.worker_id}.launch.json"
            spec_path.write_bytes(encode(req))
            ranks = None
            if tp > 1 and not trtllm_serves(req.config):
                port = str(free_port())
                ranks = [
                    (
                        [st.gpu_index for st in req.stages[r::tp]],
                        ["--tp-rank", str(r), "--tp-size", str(tp), "--dist-port", port],
                    )
                    for r in range(tp)
                ]
            w = await self._spawn_worker(
                req.worker_id, req.deployment_id, "serve", indices, need, ["--spec", str(spec_path)], ranks
            )
            return LaunchReply(worker_id=req.worker_id, pid=w.proc.pid, agent_id=self.cfg.agent_id)

    async def _check_registered(self, model: str, path: str) -> None:
        """A worker loads only the checkpoint registered under ``model`` (not any path a launch names)."""
        try:
            info = await bus.request(self.nc, subjects.MODEL_GET, GetModel(name=model), ModelInfo, timeout=10.0)
        except errors.NotFound:
            raise errors.BadRequest(f"launch names model {model!r}, which is not registered; register it first.")
        if Path(info.record.path).resolve() != Path(path).resolve():
            raise errors.BadRequest(
                f"launch of {model!r} names {path}, but the model is registered at {info.record.path}; "
                "launch the registered checkpoint."
            )

    async def handle_stop(self, req: StopWorker, _msg: Msg) -> StopReply:
        w = self.workers.get(req.worker_id)
        if w is None:
            return StopReply(worker_id=req.worker_id, stopped=False)
        await self._stop_worker(w)
        return StopReply(worker_id=req.worker_id, stopped=True)

    async def handle_profile(self, job: ProfileJob, _msg: Msg) -> ProfileResult:
        """Run a profile-mode worker on the job's GPU (and the extra GPUs of its tensor-parallel
        variants, ``gpu_indices``) and return what it measured."""
        with structlog.contextvars.bound_contextvars(job_id=job.job_id, model=job.model):
            gpus = [job.gpu_index] + [i for i in job.gpu_indices if i != job.gpu_index]
            self._check_gpus(gpus, {}, f"profile job {job.job_id}")
            missing = [p for p in job.fingerprint_paths if not (Path(p) / "config.json").is_file()]
            if not job.fingerprint_paths or missing:
                raise errors.CheckpointError(
                    f"profile job {job.job_id}: fingerprint folder(s) {', '.join(missing) or '(none given)'} hold no "
                    "config.json on this agent's host; the fingerprint service must write them where the agent reads."
                )
            wid = f"profile-{job.job_id}"
            job_path = self.cfg.work_dir / "workers" / f"{wid}.job.json"
            result_path = self.cfg.work_dir / "workers" / f"{wid}.result.json"
            result_path.unlink(missing_ok=True)
            job_path.write_bytes(encode(job))
            t0 = time.monotonic()
            w = await self._spawn_worker(
                wid, "", "profile", gpus, {}, ["--job", str(job_path), "--result", str(result_path)]
            )
            timeout = min(job.timeout_s, self.cfg.profile_timeout_s)
            try:
                await asyncio.wait_for(w.exited.wait(), timeout)
            except asyncio.TimeoutError:
                await self._stop_worker(w)
                raise errors.Timeout(
                    f"profiling {job.model} on GPU {job.gpu_index} took longer than {timeout:.0f} s and was stopped."
                ) from None
            if w.exit_code != 0 or not result_path.is_file():
                raise errors.WorkerDied(
                    f"the profiling worker for {job.model} exited with code {w.exit_code}: {exit_reason(w)}"
                )
            result = decoder(ProfileResult).decode(result_path.read_bytes())
            wall = time.monotonic() - t0
            # The first GPU was held for the whole life of the profiling process, start-up included; the
            # worker's own count adds the time TP variants held the other GPUs.
            extra = max(result.gpu_seconds - result.wall_seconds, 0.0)
            result.wall_seconds = wall
            result.gpu_seconds = wall + extra
            log.info("profile job done", seconds=round(wall, 2))
            return result
