"""Live trace replay against a running iServe (``python -m iserve.loadgen``, ``iserve loadgen``): the
client side, sending every request of the compressed trace open loop and recording it; what a run
does, step by step: docs/simulator.md#the-live-replay."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from iserve import errors
from iserve import slo as slo_mod
from iserve.client import Client, CompletionStream

from .config import LoadgenConfig
from .deployments import DeploymentSide, Interrupted, ModelSlot
from .records import RequestRecord, RunMeta, RunWriter, Summary, summarize
from .traces import (
    TraceRequest,
    assignment_draws,
    compress,
    fit_lengths,
    load_trace,
    pick_model,
    prompt_for,
    resolve_prompts,
    slice_trace,
    stats,
    trace_name,
)


@dataclass
class RunResult:
    path: Path
    summary: Summary | None
    interrupted: bool
    planned: int
    records: list[RequestRecord] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# helpers


def plan_trace(cfg: LoadgenConfig) -> list[TraceRequest]:
    """The requests to replay: the trace compressed, then sliced, then cut to ``max_requests``."""
    trace = compress(
        load_trace(cfg.trace), interval_s=cfg.interval_s, aggregate=cfg.aggregate, rate=cfg.rate, seed=cfg.seed
    )
    trace = slice_trace(trace, cfg.start_s, cfg.duration_s or None)
    if cfg.max_requests > 0:
        trace = trace[: cfg.max_requests]
    return trace


def git_commit() -> str:
    """The commit of the repository this package runs from, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def summary_table(s: Summary, *, title: str = "") -> Table:
    """The end-of-run table; every figure comes from ``records.summarize``."""
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests", str(s.count))
    t.add_row("ok", str(s.ok))
    t.add_row("errors (incl. timeouts)", str(s.errors))
    t.add_row("cancelled", str(s.cancelled))
    t.add_row("e2e p50 / p95 / p99 ms", f"{s.e2e_p50_ms:.1f} / {s.e2e_p95_ms:.1f} / {s.e2e_p99_ms:.1f}")
    t.add_row("TTFT p50 ms", f"{s.ttft_p50_ms:.1f}")
    t.add_row("TPOT p50 ms", f"{s.tpot_p50_ms:.2f}")
    t.add_row(
        "SLO attainment", f"{s.slo_attainment:.1%} of {s.slo_requests}" if s.slo_attainment is not None else "no SLO"
    )
    t.add_row("clipped to the model's context", str(s.clipped))
    for model, n in s.per_model.items():
        t.add_row(f"requests to {model}", str(n))
    return t


# ---------------------------------------------------------------------------------------------------
# the replayer


class Replayer(DeploymentSide):
    """One live run. ``run()`` does everything; ``stop`` (an event) ends it early. Progress and
    messages go to ``console`` (default: standard error), so standard output keeps only results."""

    def __init__(self, cfg: LoadgenConfig, *, stop: asyncio.Event | None = None, console: Console | None = None):
        super().__init__(cfg, stop=stop, console=console)
        self.records: list[RequestRecord] = []
        self._ok_e2e: list[float] = []
        self._p50 = 0.0  # shown on the progress bar
        self._p50_at = 0.0
        self._errors = 0
        self.prompts: list[str] = []
        self.prompt_source = ""
        self.run_id = uuid.uuid4().hex[:8]
        self.lagged = 0  # requests held back by --max-inflight
        self.slo_unavailable = 0  # requests that got no SLO because the estimate was not positive
        self._slo_warned: set[str] = set()

    # ------------------------------------------------------------------ requests

    def _slot_for(self, model: str) -> ModelSlot:
        """The model's deployment with the smallest context (the scheduler may use any of them)."""
        return min(self.slots[model], key=lambda s: s.context_tokens)

    async def _one(self, req: TraceRequest, model: str, sent_mono: float, sem: asyncio.Semaphore | None) -> None:
        """Send one request, stream its tokens, and write its record whatever happens."""
        assert self.client is not None and self.writer is not None and self.t0_mono is not None
        cfg = self.cfg
        slot = self._slot_for(model)
        lengths = fit_lengths(
            req.context_tokens, req.generated_tokens, max_context=cfg.max_context, model_context=slot.context_tokens
        )
        try:
            slo = slo_mod.request_slo_ms(
                lengths.prompt_tokens,
                lengths.output_tokens,
                fixed_ms=cfg.slo_ms,
                scale=cfg.slo_scale,
                reference=slot.reference,
            )
        except ValueError as e:  # the profile gives no usable latency for these lengths: no SLO
            slo = 0.0
            self.slo_unavailable += 1
            if model not in self._slo_warned:
                self._slo_warned.add(model)
                self.err.print(f"[yellow]{model}: requests of such lengths get no SLO:[/] {e}")
        arrival = sent_mono - self.t0_mono
        rec = RequestRecord(
            request_id=f"lg-{self.run_id}-{req.index}",
            model=model,
            arrival_s=arrival,
            prompt_tokens=lengths.prompt_tokens,
            slo_ms=slo,
            index=req.index,
            scheduled_s=req.arrival_s,
            trace_context_tokens=req.context_tokens,
            trace_generated_tokens=req.generated_tokens,
            clipped=lengths.clipped,
        )
        stream = CompletionStream()
        tokens = 0
        try:
            async for _chunk in self.client.generate(
                model,
                prompt_for(req.index, self.prompts),
                max_tokens=lengths.output_tokens,
                ignore_eos=True,
                prompt_tokens=lengths.prompt_tokens,
                timeout_s=cfg.request_timeout_s,
                request_id=rec.request_id,
                stream=stream,
            ):
                tokens += 1
            done = stream.completion
            end = time.monotonic()
            if done is None:  # the stream ended without its Completion: treat as an error
                raise errors.InternalError("the stream ended without a completion")
            rec.deployment_id = done.deployment_id
            rec.queue_ms = done.queue_ms
            rec.start_s = arrival + done.queue_ms / 1000.0
            first = stream.first_token_at if stream.first_token_at is not None else end
            rec.first_token_s = first - self.t0_mono
            rec.end_s = end - self.t0_mono
            rec.ttft_ms = (first - sent_mono) * 1000.0
            rec.e2e_ms = (end - sent_mono) * 1000.0
            rec.tpot_ms = done.tpot_ms
            rec.prompt_tokens = done.prompt_tokens
            rec.output_tokens = done.completion_tokens
            rec.worker_ttft_ms = done.ttft_ms
            rec.worker_e2e_ms = done.e2e_ms
            rec.server_ttft_ms = done.queue_ms + done.ttft_ms
            if done.finish_reason == "cancelled":  # the worker stopped it (the scheduler's cancel)
                rec.status, rec.error_code = "cancelled", "cancelled"
            else:
                rec.slo_met = slo_mod.slo_met(rec.e2e_ms, slo)
                self._ok_e2e.append(rec.e2e_ms)
        except asyncio.CancelledError:
            self._failed(rec, stream, tokens, "cancelled", "cancelled", "the run was stopped")
            raise
        except errors.Timeout as e:
            self._failed(rec, stream, tokens, "timeout", e.code, e.message)
        except errors.IServeError as e:
            self._failed(rec, stream, tokens, "error", e.code, e.message)
        except (nats.errors.Error, OSError) as e:
            self._failed(rec, stream, tokens, "error", "unavailable", f"{type(e).__name__}: {e}")
        except Exception as e:  # a bug or an unexpected reply: recorded, never lost, the run goes on
            self._failed(rec, stream, tokens, "error", "internal", f"{type(e).__name__}: {e}")
        finally:
            served_by = [s for s in self.slots.get(model, []) if s.deployment_id == rec.deployment_id]
            rec.config = (served_by[0] if served_by else slot).config
            self.records.append(rec)
            self.writer.request(rec)
            if sem is not None:
                sem.release()

    def _failed(
        self, rec: RequestRecord, stream: CompletionStream, tokens: int, status: str, code: str, message: str
    ) -> None:
        assert self.t0_mono is not None
        end = time.monotonic()
        rec.status = status  # type: ignore[assignment]
        rec.error_code = code
        rec.error_message = message
        rec.end_s = end - self.t0_mono
        rec.e2e_ms = (rec.end_s - rec.arrival_s) * 1000.0
        rec.output_tokens = tokens
        if stream.accepted is not None:
            rec.deployment_id = stream.accepted.deployment_id
        if stream.first_token_at is not None:
            rec.first_token_s = stream.first_token_at - self.t0_mono
            rec.ttft_ms = (rec.first_token_s - rec.arrival_s) * 1000.0
        rec.slo_met = None if status == "cancelled" or rec.slo_ms <= 0 else False
        if status != "cancelled":
            self._errors += 1

    async def _replay(self, trace: list[TraceRequest], progress: Progress, task_id) -> None:
        """Send every request at its arrival time (open loop), then wait for them all or a stop."""
        draws = assignment_draws(len(trace), self.cfg.seed)
        sem = asyncio.Semaphore(self.cfg.max_inflight) if self.cfg.max_inflight > 0 else None
        tasks: set[asyncio.Task] = set()
        for req, u in zip(trace, draws):
            if not await self._sleep_until(req.arrival_s):
                break
            if sem is not None:
                if sem.locked():
                    self.lagged += 1
                try:
                    await self._guard(sem.acquire())
                except Interrupted:
                    break
            model = pick_model(u, self.ready_names)
            t = asyncio.create_task(self._one(req, model, time.monotonic(), sem))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            t.add_done_callback(lambda _t: self._advance(progress, task_id))
        if tasks and not self.stop.is_set():
            waiter = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
            try:
                await self._guard(waiter)
            except Interrupted:
                pass
        if tasks:  # stopped: cancel what is in flight (the client tells the scheduler), keep the records
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _advance(self, progress: Progress, task_id) -> None:
        """One more request finished: advance the bar; the p50 shown is recomputed at most twice a
        second (a median over every finished request)."""
        now = time.monotonic()
        if self._ok_e2e and now - self._p50_at >= 0.5:
            self._p50 = statistics.median(self._ok_e2e)
            self._p50_at = now
        progress.update(task_id, advance=1, errors=self._errors, p50=self._p50)

    # ------------------------------------------------------------------ the whole run

    async def run(self) -> RunResult:
        """Plan, register, deploy, replay, record, clean up (docs/simulator.md#the-live-replay). The run
        directory is valid at every moment; ``RunResult.interrupted`` says whether ``stop`` ended it."""
        cfg = self.cfg
        trace = plan_trace(cfg)
        if not trace:
            raise ValueError("the compressed, sliced trace has no requests; widen --duration-s or raise --rate")
        self.prompts, self.prompt_source = resolve_prompts(cfg.prompts or None)
        st = stats(trace)
        lengths = [fit_lengths(r.context_tokens, r.generated_tokens, max_context=cfg.max_context) for r in trace]
        self.intent_prompt = int(statistics.median(x.prompt_tokens for x in lengths))
        self.intent_output = int(statistics.median(x.output_tokens for x in lengths))
        out_dir = cfg.run_dir()
        interrupted = False
        self.client = await Client.connect(cfg.nats_url, "iserve-loadgen", creds=cfg.nats_creds or None)
        try:
            names = await self._resolve_models()
            loads = await self.client.gpu_loads(1.2)
            base_intent = cfg.intent_for(self.intent_prompt, self.intent_output)
            meta = RunMeta(
                kind="live",
                trace=trace_name(cfg.trace),
                rate=cfg.rate,
                interval_s=cfg.interval_s,
                aggregate=cfg.aggregate,
                duration_s=max(r.arrival_s for r in trace),
                system=cfg.system,
                intent=base_intent,
                models=names,
                gpu_type=loads[0].gpu_type if loads else "",
                gpu_count=len(loads),
                seed=cfg.seed,
                started_at=time.time(),
                git_commit=git_commit(),
                command=cfg.command,
                start_s=cfg.start_s,
                requests=len(trace),
                max_context=cfg.max_context,
                deploy_every_s=cfg.deploy_every_s,
                placement=cfg.placement,
                slo_ms=cfg.slo_ms or 0.0,
                slo_scale=cfg.slo_scale or 0.0,
                prompts=self.prompt_source,
                max_batch=cfg.max_batch,
            )
            self.writer = RunWriter(out_dir, meta)
            self.err.print(
                f"replaying {st.count} requests of the {meta.trace} trace over {st.duration_s:.0f} s "
                f"({st.mean_rate:.2f} req/s, inter-arrival CV {st.interarrival_cv:.2f}) on {len(loads)} GPU(s); run "
                f"directory {out_dir}"
            )
            await self._listen()
            for d in (await self.client.deployments()).deployments:  # the cluster as it was
                self._deployment_event(d)
            first = names if cfg.deploy_every_s <= 0 else names[:1]
            for m in first:
                await self._guard(self._deploy(m))
            if not self.ready_names:
                raise errors.NotReady("no model could be deployed; see the messages above")
            self._start_clock()
            if cfg.deploy_every_s > 0:
                for i, m in enumerate(names[1:], start=1):
                    self._background.append(asyncio.create_task(self._deploy_later(m, i * cfg.deploy_every_s)))
            show = cfg.progress if cfg.progress is not None else self.err.is_terminal
            with Progress(
                TextColumn("[bold]replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("errors {task.fields[errors]}"),
                TextColumn("p50 e2e {task.fields[p50]:.0f} ms"),
                TimeElapsedColumn(),
                console=self.err,
                disable=not show,
            ) as progress:
                task_id = progress.add_task("replay", total=len(trace), errors=0, p50=0.0)
                await self._replay(trace, progress, task_id)
            interrupted = self.stop.is_set()
        except Interrupted:
            interrupted = True
        finally:
            for t in self._background:
                t.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            if cfg.undeploy and self.deployed:
                await self._undeploy_ours()
                await asyncio.sleep(0.2)  # let the deploy.changed events of the undeploys arrive
            for s in self._subs:
                try:
                    await s.unsubscribe()
                except Exception:
                    pass
            if self.writer is not None:
                if self.t0_unix is None:  # stopped before the replay began: keep the events anyway
                    self._start_clock()
                notes = self.writer.meta.notes
                if self.slo_unavailable:
                    notes = (
                        f"{self.slo_unavailable} requests had no SLO: the reference estimate was not positive for "
                        "their lengths. " + notes
                    )
                if self.lagged:
                    notes = f"{self.lagged} requests were held back by --max-inflight {cfg.max_inflight}. " + notes
                self.writer.update_meta(ended_at=time.time(), interrupted=interrupted, notes=notes.strip())
                self.writer.close()
            await self.client.close()
        summary = summarize(self.records) if self.records else None
        return RunResult(
            path=out_dir, summary=summary, interrupted=interrupted, planned=len(trace), records=self.records
        )


async def run(cfg: LoadgenConfig, *, stop: asyncio.Event | None = None, console: Console | None = None) -> RunResult:
    """Run one live replay (docs/simulator.md#the-live-replay); ``stop`` ends it early, keeping the records.
    ``console`` receives the progress bar and messages (default: standard error)."""
    return await Replayer(cfg, stop=stop, console=console).run()


def dry_run(cfg: LoadgenConfig, console: Console) -> None:
    """Print the original and the compressed trace's statistics (no connection)."""
    original = load_trace(cfg.trace)
    planned = plan_trace(cfg)
    t = Table(
        title=f"{trace_name(cfg.trace)} trace: interval {cfg.interval_s:g} s, aggregate {cfg.aggregate}, "
        f"rate {cfg.rate:g}"
    )
    for col in ("", "requests", "duration s", "req/s", "inter-arrival CV", "context median", "generated median"):
        t.add_column(col, justify="right")
    for label, tr in (("original", original), ("replayed", planned)):
        s = stats(tr)
        t.add_row(
            label,
            str(s.count),
            f"{s.duration_s:.1f}",
            f"{s.mean_rate:.3f}",
            f"{s.interarrival_cv:.2f}",
            f"{s.context_median:.0f}",
            f"{s.generated_median:.0f}",
        )
    console.print(t)
    if planned:
        clipped = [fit_lengths(r.context_tokens, r.generated_tokens, max_context=cfg.max_context) for r in planned]
        capped = sum(r.context_tokens > x.prompt_tokens for r, x in zip(planned, clipped))
        console.print(f"{capped} of {len(planned)} prompts are capped at --max-context {cfg.max_context} tokens")
