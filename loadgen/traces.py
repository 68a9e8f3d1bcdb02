"""Azure LLM inference traces: parsing, the paper's compression, slicing, statistics, random model
assignment, prompts and request lengths. Pure functions, no I/O beyond reading files: the live replay
(``replay.py``) and the trace simulator share them, so both see exactly the same workload.

The workload of the paper's evaluation (section 8, "Workload"): the Azure *code* (bursty) and
*conversation* (steady) traces, compressed "by discretizing into intervals, aggregating request
counts from adjacent intervals, and scaling by a rate factor (0.1-0.4)"; each request assigned to a
model at random, with a ShareGPT prompt (inputs capped at 1K tokens) and the trace's output length.

    trace = compress(load_trace("code"), interval_s=60, aggregate=4, rate=0.2, seed=0)
    trace = slice_trace(trace, 0, 600)            # the first 10 minutes of the compressed trace
    print(stats(trace))
    models = assign_models(trace, ["llama-7b", "falcon-7b"], seed=0, available_from=[0, 300])
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import msgspec

DATA_DIR = Path(__file__).resolve().parent / "data"
TRACES = {
    "code": DATA_DIR / "AzureLLMInferenceTrace_code.csv",
    "conv": DATA_DIR / "AzureLLMInferenceTrace_conv.csv",
}
HEADER = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

# The paper caps inputs at 1K tokens ("a random input (max 1K tokens) from the ShareGPT dataset").
DEFAULT_MAX_CONTEXT = 1024


class TraceRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One request of a trace.

    ``arrival_s`` is seconds from the start of the trace (the first request of a freshly loaded trace
    arrives at 0.0); ``index`` is the request's row in the original CSV (0 = first data row), kept
    through compression and slicing so any record can be traced back to its source row.
    """

    arrival_s: float
    context_tokens: int
    generated_tokens: int
    index: int


class TraceStats(msgspec.Struct, kw_only=True):
    """Summary of a trace (see ``stats``)."""

    count: int
    duration_s: float  # last arrival minus first arrival
    mean_rate: float  # requests per second over ``duration_s`` (0 for fewer than 2 requests)
    interarrival_cv: float  # standard deviation / mean of the gaps between arrivals
    context_median: float
    generated_median: float


# ---------------------------------------------------------------------------------------------------
# parsing


def _parse_timestamp(text: str) -> tuple[datetime, float]:
    """``2023-11-16 18:17:03.9799600`` -> (whole seconds as a naive datetime, fraction of a second).

    ``datetime`` keeps only microseconds, so the 7-digit fraction is parsed separately, exactly."""
    base, _, frac = text.strip().partition(".")
    whole = datetime.fromisoformat(base)
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return whole, (int(frac) / 10 ** len(frac)) if frac else 0.0


def parse_trace(text: str, *, source: str = "<text>") -> list[TraceRequest]:
    """Parse the CSV text of an Azure LLM inference trace (header ``TIMESTAMP,ContextTokens,
    GeneratedTokens``). Arrivals are seconds after the first row; rows are returned sorted by
    arrival (the published traces already are). Blank lines, CRLF line ends and a last line without
    a newline are accepted; anything else malformed raises ``ValueError`` naming the line."""
    lines = text.splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != HEADER:
        raise ValueError(f"{source}: expected the header {','.join(HEADER)!r}, got {lines[0] if lines else ''!r}")
    rows: list[tuple[datetime, float, int, int, int]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        try:
            if len(parts) != 3:
                raise ValueError(f"expected 3 columns, got {len(parts)}")
            whole, frac = _parse_timestamp(parts[0])
            ctx, gen = int(parts[1]), int(parts[2])
            if ctx < 0 or gen < 0:
                raise ValueError("token counts must be non-negative")
        except ValueError as e:
            raise ValueError(f"{source}, line {lineno}: {e}: {line!r}") from None
        rows.append((whole, frac, ctx, gen, len(rows)))
    if not rows:
        return []
    t0_whole, t0_frac = min((r[0], r[1]) for r in rows)
    out = [
        TraceRequest(
            arrival_s=(w - t0_whole).total_seconds() + (f - t0_frac), context_tokens=c, generated_tokens=g, index=i
        )
        for w, f, c, g, i in rows
    ]
    out.sort(key=lambda r: (r.arrival_s, r.index))
    return out


def load_trace(name_or_path: str | os.PathLike) -> list[TraceRequest]:
    """Load a trace: ``"code"`` or ``"conv"`` are the copies shipped in ``loadgen/data`` (CC-BY 4.0,
    Patel et al., "Splitwise", ISCA 2024); anything else is a path to a CSV of the same format."""
    key = str(name_or_path)
    path = TRACES.get(key, Path(key))
    if not path.is_file():
        raise FileNotFoundError(f"trace {key!r} is neither 'code', 'conv' nor a CSV file")
    return parse_trace(path.read_text(encoding="utf-8"), source=str(path))


def trace_name(name_or_path: str | os.PathLike) -> str:
    """A short name for run metadata: ``code``, ``conv`` or the file's stem."""
    key = str(name_or_path)
    return key if key in TRACES else Path(key).stem


# ---------------------------------------------------------------------------------------------------
# compression, slicing, statistics


def compress(
    trace: Sequence[TraceRequest], *, interval_s: float = 60.0, aggregate: int = 1, rate: float = 1.0, seed: int = 0
) -> list[TraceRequest]:
    """The paper's trace compression: cut time into ``interval_s``-second intervals, merge every
    ``aggregate`` adjacent ones into one, and keep about ``rate`` of each merged interval's requests.

    ``interval_s`` > 0 (seconds); ``aggregate`` a positive integer (time runs that many times faster:
    arrivals become ``arrival_s / aggregate``); ``rate`` in (0, 1], else ValueError. Returns the kept
    requests, with their ``index``, sorted by arrival; deterministic for a given ``seed``.
    See docs/simulator.md#trace-compression.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    if aggregate < 1 or int(aggregate) != aggregate:
        raise ValueError(f"aggregate must be a positive integer, not {aggregate}")
    if not (0 < rate <= 1):
        raise ValueError(f"rate must be in (0, 1], not {rate}; use aggregate to raise the load")
    rng = random.Random(seed)
    groups: dict[int, list[TraceRequest]] = {}
    for r in trace:
        g = math.floor(r.arrival_s / (interval_s * aggregate))
        offset = r.arrival_s - g * aggregate * interval_s
        moved = TraceRequest(
            arrival_s=g * interval_s + offset / aggregate,
            context_tokens=r.context_tokens,
            generated_tokens=r.generated_tokens,
            index=r.index,
        )
        groups.setdefault(g, []).append(moved)
    out: list[TraceRequest] = []
    for g in sorted(groups):
        members = groups[g]
        keep = min(len(members), math.floor(rate * len(members) + rng.random()))
        chosen = sorted(rng.sample(range(len(members)), keep))
        out.extend(members[i] for i in chosen)
    out.sort(key=lambda r: (r.arrival_s, r.index))
    return out


def interval_counts(trace: Sequence[TraceRequest], interval_s: float, *, start_s: float = 0.0) -> list[int]:
    """Requests per interval of ``interval_s`` seconds from ``start_s`` up to the last arrival."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, not {interval_s}")
    if not trace:
        return []
    last = max(r.arrival_s for r in trace)
    counts = [0] * (math.floor((last - start_s) / interval_s) + 1)
    for r in trace:
        if r.arrival_s >= start_s:
            counts[math.floor((r.arrival_s - start_s) / interval_s)] += 1
    return counts


def slice_trace(trace: Sequence[TraceRequest], start_s: float, duration_s: float | None = None) -> list[TraceRequest]:
    """The requests arriving in ``[start_s, start_s + duration_s)`` (to the end when ``duration_s`` is
    None or <= 0), with arrivals shifted so that ``start_s`` becomes 0."""
    end = math.inf if duration_s is None or duration_s <= 0 else start_s + duration_s
    return [
        TraceRequest(
            arrival_s=r.arrival_s - start_s,
            context_tokens=r.context_tokens,
            generated_tokens=r.generated_tokens,
            index=r.index,
        )
        for r in trace
        if start_s <= r.arrival_s < end
    ]


def interarrival_cv(arrivals: Sequence[float]) -> float:
    """Coefficient of variation (population standard deviation / mean) of the gaps between sorted
    arrivals: about 1 for a Poisson process, far above 1 for a bursty one; 0 with fewer than 3."""
    xs = sorted(arrivals)
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    if len(gaps) < 2:
        return 0.0
    mean = statistics.fmean(gaps)
    return statistics.pstdev(gaps) / mean if mean > 0 else 0.0


def stats(trace: Sequence[TraceRequest]) -> TraceStats:
    """Count, duration, mean arrival rate, inter-arrival CV and token medians of a trace."""
    if not trace:
        return TraceStats(
            count=0, duration_s=0.0, mean_rate=0.0, interarrival_cv=0.0, context_median=0.0, generated_median=0.0
        )
    arrivals = [r.arrival_s for r in trace]
    duration = max(arrivals) - min(arrivals)
    return TraceStats(
        count=len(trace),
        duration_s=duration,
        mean_rate=(len(trace) / duration) if duration > 0 else 0.0,
        interarrival_cv=interarrival_cv(arrivals),
        context_median=float(statistics.median(r.context_tokens for r in trace)),
        generated_median=float(statistics.median(r.generated_tokens for r in trace)),
    )


class ExpectedLoad(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment intent takes from a trace: its mean rate, mean lengths (prompts capped at
    ``max_context``, as the replay caps them) and the squared coefficient of variation of its outputs."""

    rate: float
    prompt_tokens: int
    output_tokens: int
    output_cv2: float


def expected_load(trace: Sequence[TraceRequest], max_context: int = DEFAULT_MAX_CONTEXT) -> ExpectedLoad:
    """A trace as an intent's expected load; raises ``ValueError`` for fewer than 2 requests."""
    st = stats(trace)
    if st.count < 2 or st.mean_rate <= 0:
        raise ValueError("a trace needs at least 2 requests at distinct times to give a rate")
    outs = [max(1, r.generated_tokens) for r in trace]
    mean_out = statistics.fmean(outs)
    return ExpectedLoad(
        rate=st.mean_rate,
        prompt_tokens=max(1, round(statistics.fmean(min(max(1, r.context_tokens), max_context) for r in trace))),
        output_tokens=max(1, round(mean_out)),
        output_cv2=statistics.pvariance(outs) / mean_out**2,
    )


# ---------------------------------------------------------------------------------------------------
# random model assignment


def assignment_draws(n: int, seed: int) -> list[float]:
    """One uniform draw in [0, 1) per request, in trace order: the randomness of model assignment.
    The live replay uses the same draws with ``pick_model`` on the models ready at each arrival."""
    rng = random.Random(f"assign-{seed}")
    return [rng.random() for _ in range(n)]


def pick_model(u: float, available: Sequence[str]) -> str:
    """The model a draw ``u`` in [0, 1) selects among ``available`` (uniform over them)."""
    if not available:
        raise ValueError("no model is available to assign the request to")
    return available[min(int(u * len(available)), len(available) - 1)]


def assign_models(
    trace: Sequence[TraceRequest], models: Sequence[str], seed: int, *, available_from: Sequence[float] | None = None
) -> list[str]:
    """Assign each request to one of ``models`` uniformly at random (paper: "we randomly assign each
    query to a model"), deterministically for a ``seed``.

    ``available_from[i]`` (optional) is when ``models[i]`` becomes available (e.g. deployed every 5
    minutes: ``[0, 300, 600, ...]``); a request then picks uniformly among the models available at
    its arrival (the first model is used for requests that arrive before any is available). Repeated
    names count once. Returns one model name per request, in trace order."""
    if not models:
        raise ValueError("assign_models needs at least one model")
    if available_from is not None and len(available_from) != len(models):
        raise ValueError("available_from must give one time per model")
    order = sorted(range(len(models)), key=lambda i: (available_from[i] if available_from is not None else 0.0, i))
    draws = assignment_draws(len(trace), seed)
    out = []
    for r, u in zip(trace, draws):
        ready: list[str] = []
        for i in order:
            if (available_from is None or available_from[i] <= r.arrival_s) and models[i] not in ready:
                ready.append(models[i])
        out.append(pick_model(u, ready or [models[order[0]]]))
    return out


# ---------------------------------------------------------------------------------------------------
# request lengths


class Lengths(msgspec.Struct, frozen=True, kw_only=True):
    """What a request asks of the model: ``prompt_tokens`` in (the worker pads or truncates the prompt
    to exactly this), ``output_tokens`` out (generated with ``ignore_eos``). ``clipped`` is True when
    the model's context forced values below what the trace (with the ``max_context`` cap) asks."""

    prompt_tokens: int
    output_tokens: int
    clipped: bool = False


def fit_lengths(
    context_tokens: int, generated_tokens: int, *, max_context: int = DEFAULT_MAX_CONTEXT, model_context: int = 0
) -> Lengths:
    """The lengths a trace request is replayed with.

    1. ``ContextTokens`` is capped at ``max_context`` (default 1024, as the paper caps inputs at 1K
       tokens; 0 disables the cap). This is part of the workload, not counted as clipping.
    2. Prompt and output must fit the deployment's context (``model_context`` tokens, 0 = unknown or
       unlimited): the output is cut to at most ``model_context - 1`` tokens, then the prompt to
       ``model_context - output``. Either cut sets ``clipped``.

    Both lengths are at least 1 (the worker needs a prompt token and ``max_tokens >= 1``)."""
    prompt = max(1, context_tokens)
    if max_context > 0:
        prompt = min(prompt, max_context)
    output = max(1, generated_tokens)
    want = (prompt, output)
    if model_context > 0:
        if model_context < 2:
            raise ValueError(f"a model context of {model_context} tokens cannot hold a prompt and an output")
        output = min(output, model_context - 1)
        prompt = min(prompt, model_context - output)
    return Lengths(prompt_tokens=prompt, output_tokens=output, clipped=(prompt, output) != want)


# ---------------------------------------------------------------------------------------------------
# prompts

# Used when no prompt file is available. Synthetic, written for iServe (no third-party text): the
# worker pads or truncates every prompt to the trace's ContextTokens, so only their variety matters.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Explain how a hash table resolves collisions, and compare chaining with open addressing.",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Summarize the main causes of the French Revolution in five bullet points.",
    "What is the difference between a process and a thread in an operating system?",
    "Draft a polite email asking a colleague to review a pull request by Friday.",
    "Describe the water cycle to a ten-year-old.",
    "Give three ideas for a weekend trip near the mountains with a small budget.",
    "Refactor this loop into a list comprehension: result = []; for x in data: result.append(x * 2)",
    "How does public-key cryptography let two strangers agree on a secret?",
    "List the steps to make bread from flour, water, salt and yeast.",
    "Why does the sky look blue during the day and red at sunset?",
    "Write a SQL query that returns the ten customers with the highest total order value.",
    "Compare renting and buying a home in terms of costs and flexibility.",
    "Explain gradient descent and the role of the learning rate.",
    "Translate into French: 'The meeting has been moved to Tuesday afternoon.'",
    "Suggest a name and a tagline for a coffee shop that also repairs bicycles.",
    "What are the trade-offs between microservices and a monolith?",
    "Write a short poem about a lighthouse keeper who collects lost letters.",
    "How do vaccines train the immune system?",
    "Outline a 30-minute beginner workout that needs no equipment.",
)


def default_prompts_path() -> Path | None:
    """``$ISERVE_PROMPTS`` when set, else the ShareGPT sample at ``../shared/data/
    sharegpt_V3_filtered_500_mlenergy.json`` next to the repository when it exists, else None."""
    env = os.environ.get("ISERVE_PROMPTS", "")
    if env:
        return Path(env)
    candidate = (
        Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sharegpt_V3_filtered_500_mlenergy.json"
    )
    return candidate if candidate.is_file() else None


def _prompt_of(item: object) -> str:
    """The prompt text of one entry: a string, ``{"prompt"|"text": ...}`` or a ShareGPT record
    (``{"conversations": [{"from": "human", "value": ...}, ...]}``, first human turn)."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "text"):
            if isinstance(item.get(key), str):
                return item[key]
        for turn in item.get("conversations") or []:
            if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
                return turn["value"]
    return ""


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: ``.json`` (a list of strings, of ``{"prompt": ...}`` objects or of
    ShareGPT records, first human turn), ``.jsonl`` (one such entry per line) or plain text (one
    prompt per line). Empty prompts are skipped; a file with none raises ``ValueError``."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    elif p.suffix == ".jsonl":
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        items = text.splitlines()
    prompts = [s for s in (_prompt_of(i).strip() for i in items) if s]
    if not prompts:
        raise ValueError(f"{p}: no prompts found")
    return prompts


def resolve_prompts(path: str | os.PathLike | None = None) -> tuple[list[str], str]:
    """The prompts to replay with and where they came from: ``path`` when given, else
    ``default_prompts_path()``, else ``BUILTIN_PROMPTS`` (source ``"builtin"``)."""
    chosen = Path(path) if path else default_prompts_path()
    if chosen is None:
        return list(BUILTIN_PROMPTS), "builtin"
    return load_prompts(chosen), str(chosen)


def prompt_for(index: int, prompts: Sequence[str]) -> str:
    """The prompt of trace request ``index``: ``prompts[index % len(prompts)]`` (deterministic, so a
    live run and a simulated one send the same text for the same request)."""
    if not prompts:
        raise ValueError("no prompts")
    return prompts[index % len(prompts)]
