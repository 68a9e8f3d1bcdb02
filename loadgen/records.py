"""The run format shared by the live replay, the trace simulator and the report: a directory of
``meta.json`` and three JSON-lines files, flushed line by line (docs/simulator.md#run-directories)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from iserve.messages import Intent
from iserve.stats import percentile

FORMAT_VERSION = 1
META = "meta.json"
REQUESTS = "requests.jsonl"
GPUS = "gpus.jsonl"
DEPLOYMENTS = "deployments.jsonl"

RequestStatus = Literal["ok", "error", "timeout", "cancelled"]


class RequestRecord(msgspec.Struct, kw_only=True):
    """One replayed request. Times ``*_s`` are seconds on the run clock, ``*_ms`` milliseconds.

    ``arrival_s <= start_s <= first_token_s <= end_s``; ``ttft_ms`` and ``e2e_ms`` run from
    ``arrival_s`` (queueing included); ``server_ttft_ms = queue_ms + worker_ttft_ms``. When
    ``status != "ok"`` only ``arrival_s``, ``end_s`` and ``e2e_ms`` are always set (other times 0.0
    when unknown); ``slo_met`` is None without an SLO and for cancelled requests.
    See docs/simulator.md#request-records.
    """

    request_id: str
    model: str
    deployment_id: str = ""
    arrival_s: float
    start_s: float = 0.0
    first_token_s: float = 0.0
    end_s: float = 0.0
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    e2e_ms: float = 0.0
    prompt_tokens: int = 0  # as served (the worker's count when known, else as requested)
    output_tokens: int = 0  # tokens actually generated
    slo_ms: float = 0.0
    slo_met: bool | None = None
    status: RequestStatus = "ok"
    error_code: str = ""
    # --- appended fields
    error_message: str = ""
    index: int = -1  # the request's row in the original trace CSV
    scheduled_s: float = 0.0  # arrival in the compressed trace (arrival_s minus the issue lag)
    trace_context_tokens: int = 0  # the trace's ContextTokens and GeneratedTokens, before any cap
    trace_generated_tokens: int = 0
    clipped: bool = False  # the model's context forced fewer tokens than the trace asks (see traces.fit_lengths)
    server_ttft_ms: float = 0.0
    worker_ttft_ms: float = 0.0  # prefill on the worker (Completion.ttft_ms)
    worker_e2e_ms: float = 0.0  # the worker's whole generation (Completion.e2e_ms)
    config: str = ""  # configuration key of the deployment that served it, when known


class GpuSample(msgspec.Struct, kw_only=True):
    """One GPU's state at ``t_s`` (from the agent's ``gpu.load`` report).

    ``busy_fraction`` is the paper's load over the agent's window (120 s by default);
    ``util_percent`` is the instantaneous utilization (NVML) or, on simulated GPUs, the busy fraction
    of the last second: integrate ``util_percent / 100`` over time for busy seconds."""

    t_s: float
    agent_id: str
    gpu_index: int
    total_bytes: int
    used_bytes: int
    busy_fraction: float
    util_percent: float
    workers: int
    # --- appended fields
    gpu_type: str = ""
    free_bytes: int = 0
    window_s: float = 0.0
    simulated: bool = False


class DeploymentEvent(msgspec.Struct, kw_only=True):
    """A deployment's state change at ``t_s``. ``status``: ``requested`` (the deploy request was
    sent), ``launching`` (a configuration was chosen and placed), ``ready``, ``failed`` (``reason``
    says why; also a deploy request the deployer refused), ``stopped``. ``gpus`` lists
    ``"agent/index:layers"`` per GPU; ``total_bytes`` is the estimated memory of the configuration."""

    t_s: float
    model: str
    deployment_id: str
    config: str
    gpus: list[str] = []
    total_bytes: int = 0
    status: str
    # --- appended fields
    reason: str = ""
    gpu_type: str = ""
    why: str = ""  # the deployer's one-sentence explanation of its choice
    decision_ms: float = 0.0
    latency_ms: float = 0.0  # estimated latency for the intent's lengths
    context_tokens: int = 0
    quality: str = ""  # appended: the configuration's quality cost ("lossless", "KL .., top-1 ..", "not measured")


class RunMeta(msgspec.Struct, kw_only=True):
    """What was run, and how."""

    kind: Literal["live", "simulated"]
    trace: str  # "code", "conv" or a file stem
    rate: float
    interval_s: float
    aggregate: int
    duration_s: float  # length of the replayed (compressed, sliced) trace, seconds
    system: str = "iserve"  # policy / system name, e.g. "iserve", "max-tp", "alpaserve"
    intent: Intent = msgspec.field(default_factory=Intent)
    models: list[str] = []
    gpu_type: str = ""
    gpu_count: int = 0
    seed: int = 0
    started_at: float = 0.0  # Unix time the run started (before deployments)
    git_commit: str = ""
    command: list[str] = []
    # --- appended fields
    format_version: int = FORMAT_VERSION
    t0_unix: float = 0.0  # Unix time of the run clock's 0 (start of the trace replay)
    ended_at: float = 0.0  # 0 while running
    interrupted: bool = False  # stopped early (Ctrl-C)
    start_s: float = 0.0  # slice of the compressed trace that was replayed
    requests: int = 0  # requests in the replayed trace
    max_context: int = 0
    deploy_every_s: float = 0.0
    placement: str = ""
    slo_ms: float = 0.0  # fixed per-request SLO (0: none or scaled)
    slo_scale: float = 0.0  # per-request SLO as a multiple of the reference latency (0: none)
    prompts: str = ""  # where the prompts came from ("builtin" or a path)
    notes: str = ""
    max_batch: int = 0  # requests a replica runs at once, as asked (0: the deployer's default, or unrecorded)
    theta: float = 0.0  # the hybrid placement's load threshold (0: unrecorded)


@dataclass
class Run:
    """A run directory loaded into memory."""

    path: Path
    meta: RunMeta
    requests: list[RequestRecord] = field(default_factory=list)
    gpus: list[GpuSample] = field(default_factory=list)
    deployments: list[DeploymentEvent] = field(default_factory=list)


_encoder = msgspec.json.Encoder()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunWriter:
    """Writes a run directory as the run goes: ``meta.json`` first, then one line per record,
    flushed at once. Use as a context manager, or call ``close()``.

        with RunWriter(out_dir, meta) as w:
            w.request(rec); w.gpu(sample); w.deployment(event)
            w.update_meta(ended_at=time.time())
    """

    def __init__(self, path: str | os.PathLike, meta: RunMeta, *, overwrite: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not overwrite and any((self.path / n).exists() for n in (META, REQUESTS, GPUS, DEPLOYMENTS)):
            raise FileExistsError(f"{self.path} already holds a run; choose another directory or remove it")
        self.meta = meta
        self._write_meta()
        self._files = {name: open(self.path / name, "wb") for name in (REQUESTS, GPUS, DEPLOYMENTS)}
        self.counts = {REQUESTS: 0, GPUS: 0, DEPLOYMENTS: 0}

    def _write_meta(self) -> None:
        _write_atomic(self.path / META, msgspec.json.format(_encoder.encode(self.meta), indent=2) + b"\n")

    def _line(self, name: str, rec: msgspec.Struct) -> None:
        f = self._files[name]
        f.write(_encoder.encode(rec) + b"\n")
        f.flush()
        self.counts[name] += 1

    def request(self, rec: RequestRecord) -> None:
        self._line(REQUESTS, rec)

    def gpu(self, sample: GpuSample) -> None:
        self._line(GPUS, sample)

    def deployment(self, event: DeploymentEvent) -> None:
        self._line(DEPLOYMENTS, event)

    def update_meta(self, **changes) -> None:
        """Change fields of the metadata and rewrite ``meta.json`` atomically."""
        self.meta = msgspec.structs.replace(self.meta, **changes)
        self._write_meta()

    def close(self) -> None:
        for f in self._files.values():
            if not f.closed:
                f.close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_lines(path: Path, kind: type) -> list:
    """Decode a JSON-lines file; a last line cut off mid-write (no newline, does not decode) is
    dropped; a bad line elsewhere raises ``ValueError`` naming it."""
    if not path.exists():
        return []
    data = path.read_bytes()
    dec: msgspec.json.Decoder = msgspec.json.Decoder(kind)
    lines = data.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(dec.decode(line))
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            if i == len(lines) - 1:  # the last line, without a newline: a write that was cut short
                break
            raise ValueError(f"{path}, line {i + 1}: {e}") from None
    return out


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (docs/simulator.md#run-directories)."""
    p = Path(path)
    meta_path = p / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{p} is not a run directory: no {META}")
    meta = msgspec.json.decode(meta_path.read_bytes(), type=RunMeta)
    return Run(
        path=p,
        meta=meta,
        requests=_read_lines(p / REQUESTS, RequestRecord),
        gpus=_read_lines(p / GPUS, GpuSample),
        deployments=_read_lines(p / DEPLOYMENTS, DeploymentEvent),
    )


# ---------------------------------------------------------------------------------------------------
# summary


class Summary(msgspec.Struct, kw_only=True):
    """Headline numbers of a set of request records (see ``summarize``)."""

    count: int
    ok: int
    errors: int  # status "error" or "timeout"
    cancelled: int
    e2e_p50_ms: float
    e2e_p95_ms: float
    e2e_p99_ms: float
    ttft_p50_ms: float
    tpot_p50_ms: float
    slo_requests: int  # finished requests that had an SLO (cancelled ones excluded)
    slo_attainment: float | None  # fraction of those that met it; None without SLOs
    per_model: dict[str, int]
    clipped: int


def summarize(records: list[RequestRecord]) -> Summary:
    """Count, errors, end-to-end percentiles (over successful requests), median TTFT and TPOT, SLO
    attainment (over requests with an SLO that were not cancelled) and requests per model."""
    ok = [r for r in records if r.status == "ok"]
    with_slo = [r for r in records if r.slo_met is not None]
    per_model: dict[str, int] = {}
    for r in records:
        per_model[r.model] = per_model.get(r.model, 0) + 1
    e2e = [r.e2e_ms for r in ok]
    return Summary(
        count=len(records),
        ok=len(ok),
        errors=sum(r.status in ("error", "timeout") for r in records),
        cancelled=sum(r.status == "cancelled" for r in records),
        e2e_p50_ms=percentile(e2e, 50, empty=0.0),
        e2e_p95_ms=percentile(e2e, 95, empty=0.0),
        e2e_p99_ms=percentile(e2e, 99, empty=0.0),
        ttft_p50_ms=percentile([r.ttft_ms for r in ok], 50, empty=0.0),
        tpot_p50_ms=percentile([r.tpot_ms for r in ok if r.output_tokens > 1], 50, empty=0.0),
        slo_requests=len(with_slo),
        slo_attainment=(sum(bool(r.slo_met) for r in with_slo) / len(with_slo)) if with_slo else None,
        per_model=dict(sorted(per_model.items())),
        clipped=sum(r.clipped for r in records),
    )
