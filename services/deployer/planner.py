"""The deployment controller's decision, as pure functions (paper section 6): which configuration to
deploy a model with, on which GPUs, and on which GPU type.

:func:`plan` composes the paper's three steps: rank the estimates by intent (:mod:`.ranking`), take the
first that fits the free GPUs (:mod:`.feasibility`, :mod:`.memory`), and place it with a load-aware
policy (:mod:`.placement`). :func:`plan_gpu_types` runs it for every profiled GPU type and keeps the
best. Nothing here does I/O or reads a clock, so the live deployer and the trace simulator share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence, TypeVar

from iserve import quality
from iserve.errors import BadRequest, Infeasible, InternalError, Unavailable
from iserve.fingerprint.estimator.batching import step_models
from iserve.messages import ConfigEstimate, ConfigurationMap, GpuAssignment, Intent, Rejection

from .capacity import Point
from .feasibility import ClusterView
from .loadplan import LoadSpec, Sized, load_of, load_order, place_replicas, replica_bound
from .memory import KvBytes, kv_pool_tokens, with_kv_pool
from .placement import GpuState, Placement, check_policy
from .ranking import COST_UNITS, Ranked, _cost, filter_reason, gpu_hours, order_key, rank_with_metrics
from .units import gib, num, num_up

T = TypeVar("T")
PLACE_TRIES = 8  # configurations whose replicas are placed at a load before the best partial one is taken


@dataclass
class Decision:
    """The outcome of :func:`plan`.

    ``assignments`` lists the GPUs stage by stage (stage ``s``, tensor-parallel rank ``r`` is
    ``assignments[s * tp + r]``); every rank of a stage holds the same layers. ``rejected`` are the
    better-ranked configurations that did not fit the free GPUs, best first; ``filtered`` are those the
    intent itself ruled out (over the SLO or the budget), closest to the limit first. ``cost`` is in
    the units of ``intent.cost_model`` (see :func:`~.ranking.cost`).
    """

    estimate: ConfigEstimate
    assignments: list[GpuAssignment]
    rejected: list[Rejection]
    why: str
    latency_ms: float
    cost: float
    filtered: list[Rejection] = field(default_factory=list)
    fitting: int = 0  # how many configurations that meet the intent fit the free GPUs
    agent_id: str = ""
    placement: str = ""  # how the placement policy chose the GPUs, one clause
    # at an expected load (:mod:`.loadplan`): every replica's GPUs (the first is ``assignments``), why
    # that many, and what one replica is predicted to see at its share of the load
    replicas: list[list[GpuAssignment]] = field(default_factory=list)
    replica_why: str = ""
    point: Point | None = None


def score(decision: Decision, intent: Intent) -> tuple:
    """How well a decision meets the intent, comparable across decisions (smaller is better), with
    the same order as :func:`~.ranking.rank`; e.g. to pick between the plans for two GPU types."""
    key = order_key(intent.kind, decision.estimate, decision.latency_ms, decision.cost, decision.estimate.config.key())
    n = len(decision.replicas)
    if n > 1 and intent.kind in ("min-memory", "min-gpu-hours"):  # at a load: the whole set of replicas
        return (n * key[0], *key[1:])
    return key


def place(est: ConfigEstimate, gpus: list[GpuState], *, policy: str, theta: float) -> list[GpuAssignment] | str:
    """Paper step III for one configuration: the GPU assignments (stage by stage, ranks within a
    stage; see :func:`~.placement.arrange`), or one sentence saying why it does not fit the free GPUs.

    All ``tp * pp`` GPUs come from one host: each host's fitting selection is found in the policy's
    cluster-wide order and the host whose selection reaches least deep into that order wins (for
    least-loaded, the host that avoids busy GPUs longest; for packing, the one that avoids idle GPUs
    longest). The caller passes only GPUs of the estimate's type.
    """
    check_policy(policy, theta)
    view = ClusterView(gpus)
    placed = view.place(est, policy, theta)
    if placed is None:
        return f"{est.config.key()} {view.miss_reason(est)}"
    return placed.assignments


def plan(
    estimates: Sequence[ConfigEstimate],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    policy: str = "hybrid",
    theta: float = 0.5,
    load: LoadSpec | None = None,
) -> Decision:
    """The deployment controller's decision (paper section 6): rank the configurations by the intent
    (step I), take the first one in rank order that fits the free GPUs (step II), and place it with
    the policy (step III). Every better-ranked configuration that did not fit becomes a rejection with
    its reason. With a ``load``, the configurations that fit are sized and ordered at that load and
    the decision has replicas (:func:`_plan_at_load`).

    Raises :class:`BadRequest` for an unusable intent or policy, and :class:`Infeasible`, with the
    closest miss and what to free or relax, when nothing fits.
    """
    check_policy(policy, theta)
    kept, filtered = rank_with_metrics(estimates, intent)
    view = ClusterView(gpus)
    chosen: Ranked | None = None
    misses: list[Ranked] = []
    fitting = 0
    fits: list[Ranked] = []  # with a load: every one that fits, in rank order
    for r in kept:
        if view.fits(r.est):
            fitting += 1
            if load is not None:
                fits.append(r)
            if chosen is None:
                chosen = r
        elif chosen is None:
            misses.append(r)
    if chosen is None:
        raise Infeasible(_infeasible_message(estimates, kept, filtered, intent, view))
    if load is not None:
        return _plan_at_load(fits, filtered, misses, fitting, intent, gpus, view, load, policy, theta)
    placed = view.place(chosen.est, policy, theta)
    if placed is None:
        raise InternalError(f"{chosen.key} fits the free GPUs but could not be placed")
    rejected = [Rejection(config=m.key, reason=view.miss_reason(m.est)) for m in misses]
    return Decision(
        estimate=chosen.est,
        assignments=placed.assignments,
        rejected=rejected,
        why=_why(chosen, intent, fitting, len(misses), len(filtered), placed),
        latency_ms=chosen.latency_ms,
        cost=chosen.cost,
        filtered=[Rejection(config=r.key, reason=filter_reason(r, intent)) for r in filtered],
        fitting=fitting,
        agent_id=placed.agent_id,
        placement=placed.note,
    )


def _plan_at_load(
    fits: list[Ranked],
    filtered: list[Ranked],
    misses: list[Ranked],
    fitting: int,
    intent: Intent,
    gpus: Sequence[GpuState],
    view: ClusterView,
    load: LoadSpec,
    policy: str,
    theta: float,
) -> Decision:
    """:func:`plan` at an expected load: the first configuration, in the load's order, whose replicas
    all fit; when none does (or none of the first :data:`PLACE_TRIES` whose replicas may fit), the first
    in that order with as many replicas as fit. ``rejected`` holds
    the configurations before the first that fits (unloaded order) and those whose replicas did not
    all fit."""
    rejected = [Rejection(config=m.key, reason=view.miss_reason(m.est)) for m in misses]
    best: tuple[Sized, list[Placement]] | None = None
    tries, free = 0, sum(g.free_bytes for g in gpus)
    for s in load_order(fits, intent, load, free):
        n, bound = s.count.replicas, replica_bound(free, s)
        if best is not None and (n > bound or tries >= PLACE_TRIES):
            held = f"the free GPUs hold at most {bound}" if n > bound else f"not tried after {PLACE_TRIES} others"
            reason = f"needs {n} replicas at this load; {held}"
        else:
            tries += 1
            placed = place_replicas(view, gpus, s, policy=policy, theta=theta)
            if best is None or len(placed) == n:
                best = (s, placed)
            if len(placed) == n:
                break
            reason = f"needs {n} replicas at this load; only {len(placed)} fit the free GPUs"
        rejected.append(Rejection(config=s.ranked.key, reason=reason))
    if best is None:
        raise InternalError("a configuration fits the free GPUs but none was sized")
    s, placed = best
    first, k = placed[0], len(placed)
    replica_why, point, lat, cost = s.why(intent, load), s.count.point, s.latency_ms, s.cost
    if k < s.count.replicas:  # the best partial one: predicted with the replicas that fit
        point = s.replica.at(load.load.rate / k, load.load.cv2, load.percentile)
        lat, cost = point.mean_ms, k * _cost(s.ranked.est, point.mean_ms, intent.cost_model)
        replica_why += f"; only {k} fit the free GPUs, each at {100 * point.utilization:.0f}%"
        rejected = [r for r in rejected if r.config != s.ranked.key]
    why = _why_at_load(s, intent, fitting, len(rejected), first, k, lat, cost)
    return Decision(
        estimate=s.ranked.est,
        assignments=first.assignments,
        rejected=rejected,
        why=f"{why}; {replica_why}",
        latency_ms=lat,
        cost=cost,
        filtered=[Rejection(config=r.key, reason=filter_reason(r, intent)) for r in filtered],
        fitting=fitting,
        agent_id=first.agent_id,
        placement=first.note,
        replicas=[p.assignments for p in placed],
        replica_why=replica_why,
        point=point,
    )


@dataclass
class TypeChoice:
    """The outcome of :func:`plan_gpu_types`: the best decision and the profile (GPU type) it came from."""

    decision: Decision
    profile: ConfigurationMap


def plan_gpu_types(
    profiles: Mapping[str, ConfigurationMap | None],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    policy: str,
    theta: float,
    stale_s: float,
    model: str = "",
    context_tokens: int = 0,
    max_batch: int = 1,
    kv_tokens: int = 0,
    kv_bytes: KvBytes | None = None,
    config: str = "",
) -> TypeChoice:
    """:func:`plan` on every GPU type of ``profiles`` (``None``: that type's profile is missing) with
    its own GPUs out of ``gpus``, keeping the decision with the best :func:`score`; among equals the
    type listed first. ``context_tokens`` (0: the profile's) skips a profile made for a shorter
    context; ``stale_s`` and ``model`` only word the errors.

    Each estimate also reserves the deployment's KV pool (:func:`~.memory.kv_pool_tokens` of
    ``max_batch``, ``kv_tokens`` and the context; ``kv_bytes`` prices the tokens beyond the profile's
    context, :func:`~.memory.with_kv_pool`); the decision's estimate includes it. ``max_batch=1,
    kv_tokens=0`` plans exactly as without batching. ``config`` (a configuration key, e.g.
    ``tp1-pp1-wfp16-kvfp16-pnone``) pins the configuration: only it is ranked and placed.

    Raises :class:`BadRequest` when only the context is too long or ``kv_tokens`` cannot hold one
    request's context, :class:`Unavailable` when no type has GPUs, and :class:`Infeasible` with every
    type's reason otherwise (saying so when only the KV pool does not fit).
    """
    best: TypeChoice | None = None
    misses: list[str] = []
    short_context: list[str] = []
    for gpu_type, cmap in profiles.items():
        typed = [g for g in gpus if g.gpu_type == gpu_type]
        if cmap is None:
            misses.append(f"the {gpu_type} profile is missing")
            continue
        if context_tokens > cmap.context_tokens:
            # the map's memory (KV cache) holds for its own context only: a longer one is not estimated
            short_context.append(f"the {gpu_type} profile is for a context of {cmap.context_tokens} tokens")
            continue
        context = context_tokens or cmap.context_tokens
        pool = kv_pool_tokens(max_batch, kv_tokens, context)
        if pool < context:
            raise BadRequest(
                f"kv_tokens {kv_tokens} cannot hold one request of the deployment's context of {context} tokens; "
                f"ask for at least {context}, or 0 for max_batch x context_tokens."
            )
        if not typed:
            misses.append(f"no {gpu_type} GPU reported load in the last {stale_s:.0f} s")
            continue
        estimates = list(cmap.estimates)
        if config:
            estimates = [e for e in estimates if e.config.key() == config]
            if not estimates:
                known = ", ".join(sorted(e.config.key() for e in cmap.estimates)[:6])
                raise BadRequest(
                    f"configuration {config!r} is not in {model or 'the model'}'s {gpu_type} profile; pick one "
                    f"`iserve profile show` lists (e.g. {known})."
                )
        # quality policy (docs/quality.md): the lossy variants the intent does not admit are ruled out first;
        # a pinned configuration is an explicit choice that only an explicit --quality overrides
        by_quality: list[Rejection] = []
        if not (config and intent.quality.mode == "default"):
            estimates, by_quality = quality.admit(estimates, cmap.quality, intent.quality)
        if not estimates:
            misses.append(f"{gpu_type}: {_quality_miss(by_quality, intent)}")
            continue
        if pool > cmap.context_tokens:
            if kv_bytes is None:
                raise InternalError(f"a KV pool of {pool} tokens needs kv_bytes to price it")
            estimates = [with_kv_pool(e, pool, cmap.context_tokens, kv_bytes) for e in estimates]
        load = load_of(intent)
        spec = None
        if load is not None:
            steps = step_models(cmap.estimates, cmap.context_tokens)
            spec = LoadSpec(load, steps, max_batch, pool, intent.slo_percentile)
        try:
            d = plan(estimates, intent, typed, policy=policy, theta=theta, load=spec)
        except Infeasible as e:
            misses.append(
                f"{gpu_type}: {e.message}{_pool_note(cmap, intent, typed, policy, theta, pool, max_batch, kv_tokens)}"
            )
            continue
        d.filtered += by_quality
        if best is None or score(d, intent) < score(best.decision, intent):
            best = TypeChoice(d, cmap)
    if best is not None:
        return best
    if short_context and not misses:
        raise BadRequest(
            f"context_tokens {context_tokens} is longer than {model} was profiled for ({'; '.join(short_context)}); "
            "ask for at most that, or profile the model again with a fingerprint service started with a larger "
            "--context-tokens."
        )
    misses += short_context
    if all(m.startswith("no ") for m in misses):
        raise Unavailable("; ".join(misses) + "; start a GPU agent (`iserve up` starts one).")
    raise Infeasible("; ".join(misses))


def _quality_miss(ruled_out: list[Rejection], intent: Intent) -> str:
    """Why no configuration of a profile is left after the quality policy, and what to pass instead."""
    policy = quality.describe_policy(intent.quality)
    return (
        f"the quality policy ({policy}) rules out all {len(ruled_out)} configurations (e.g. {ruled_out[0].config}: "
        f"{ruled_out[0].reason.removeprefix('quality: ')}); pass --quality any to search lossy variants freely"
    )


def _pool_note(
    cmap: ConfigurationMap,
    intent: Intent,
    gpus: Sequence[GpuState],
    policy: str,
    theta: float,
    pool: int,
    max_batch: int,
    kv_tokens: int,
) -> str:
    """When only the KV pool keeps every configuration off the free GPUs: a clause saying so and what
    to ask for instead; else empty."""
    if pool <= cmap.context_tokens:
        return ""
    try:
        d = plan(cmap.estimates, intent, gpus, policy=policy, theta=theta)
    except Infeasible:
        return ""
    asked = f"kv_tokens {kv_tokens}" if kv_tokens else f"max_batch {max_batch} x {pool // max_batch} tokens of context"
    return (
        f"; it is the KV pool of {pool} tokens ({asked}) that does not fit: without it "
        f"{d.estimate.config.key()} would; deploy with a smaller max_batch or kv_tokens"
    )


def _why(r: Ranked, intent: Intent, fitting: int, missed: int, filtered: int, placed: Placement) -> str:
    tokens = f"{intent.prompt_tokens}+{intent.output_tokens} tokens"
    unit = COST_UNITS[intent.cost_model]
    lat = f"{r.latency_ms:.0f} ms for {tokens}"
    among = f"among the {fitting} configuration{'s' if fitting != 1 else ''} that fit the free GPUs"
    kind = intent.kind
    if kind == "min-latency":
        head, better = f"has the lowest estimated latency ({lat}) {among}", "faster"
    elif kind == "min-cost":
        head, better = (f"has the lowest estimated cost ({num(r.cost)} {unit} per request, {lat}) {among}", "cheaper")
    elif kind == "min-memory":
        head, better = f"has the smallest footprint ({gib(r.est.total_bytes)} GiB, {lat}) {among}", "smaller"
    elif kind == "min-gpu-hours":
        gh = gpu_hours(r.est, r.latency_ms)
        head, better = (
            f"uses the fewest GPU-hours ({num(gh)} GPU-h per request: {r.est.config.gpus} GPUs x {lat}) {among}",
            "leaner",
        )
    elif kind == "latency-slo":
        head, better = (
            f"is the cheapest ({num(r.cost)} {unit} per request, {lat}) of the {fitting} "
            f"that meet the {intent.slo_ms:.0f} ms SLO and fit the free GPUs",
            "cheaper",
        )
    else:
        head, better = (
            f"is the fastest ({lat}, {num(r.cost)} {unit} per request) of the {fitting} within "
            f"the budget of {num(intent.budget)} {unit} that fit the free GPUs",
            "faster",
        )
    parts = [f"{kind}: {r.key} {head}"]
    if missed:
        parts.append(f"{missed} {better} one{'s' if missed != 1 else ''} did not fit")
    if filtered:
        limit = "the SLO" if kind == "latency-slo" else "the budget"
        parts.append(f"{filtered} exceed{'s' if filtered == 1 else ''} {limit}")
    stages = "/".join(str(a.num_layers) for a in placed.assignments[:: r.est.config.tp])
    gpus = ",".join(str(a.gpu_index) for a in placed.assignments)
    parts.append(f"{placed.note}: {placed.agent_id} GPUs {gpus}, layers {stages}")
    return "; ".join(parts)


def _why_at_load(
    s: Sized, intent: Intent, fitting: int, missed: int, placed: Placement, n: int, lat: float, cost: float
) -> str:
    """The head of ``why`` at a load: what the configuration was first by, with ``n`` replicas of
    predicted mean latency ``lat`` and fleet cost ``cost``."""
    unit, e = COST_UNITS[intent.cost_model], s.ranked.est
    metric = {
        "min-latency": f"the lowest predicted mean latency ({lat:.0f} ms)",
        "cost-budget": f"the lowest predicted mean latency ({lat:.0f} ms) within the budget",
        "min-memory": f"the smallest footprint ({gib(n * e.total_bytes)} GiB)",
        "min-gpu-hours": f"the fewest GPU-hours ({num(n * gpu_hours(e, lat))} GPU-h a request)",
        "latency-slo": f"the lowest cost ({num(cost)} {unit} a request) that meets the SLO",
    }.get(intent.kind, f"the lowest cost ({num(cost)} {unit} a request)")
    copies = f"{n} replica{'s' if n != 1 else ''}"
    head = (
        f"{intent.kind} at the load: {s.ranked.key} x {copies} has {metric} among the {fitting} that fit the free GPUs"
    )
    if missed:
        head += f"; {missed} better-ranked one{'s' if missed != 1 else ''} did not fit"
    stages = "/".join(str(a.num_layers) for a in placed.assignments[:: s.ranked.est.config.tp])
    gpus = ",".join(str(a.gpu_index) for a in placed.assignments)
    which = " (the first replica)" if n > 1 else ""
    return f"{head}; {placed.note}: {placed.agent_id} GPUs {gpus}, layers {stages}{which}"


def _infeasible_message(
    estimates: Sequence[ConfigEstimate], kept: list[Ranked], filtered: list[Ranked], intent: Intent, view: ClusterView
) -> str:
    """One sentence for :class:`Infeasible`: what missed by the least, what to free, what to relax."""
    if not estimates:
        return "there are no configuration estimates to choose from; profile the model for this GPU type first"
    if not view.gpus:
        return "no GPUs of this type are free; add a GPU agent or free GPUs, or deploy on another GPU type"
    slo = intent.kind == "latency-slo"
    unit = COST_UNITS[intent.cost_model]
    relax = ""
    if filtered:
        # the intent's limit rules some out: would relaxing it admit one that fits?
        fit = next((r for r in filtered if view.fits(r.est)), None)
        if fit is not None and slo:
            relax = f"raising slo_ms to {math.ceil(fit.latency_ms)} ms would admit {fit.key}, which fits the free GPUs"
        elif fit is not None:
            relax = f"raising the budget to {num_up(fit.cost)} {unit} would admit {fit.key}, which fits the free GPUs"
    if not kept:
        limit = f"the latency SLO of {intent.slo_ms:.0f} ms" if slo else f"the budget of {num(intent.budget)} {unit}"
        near = filtered[0]
        what = f"takes {near.latency_ms:.0f} ms" if slo else f"costs {num(near.cost)} {unit}"
        head = (
            f"none of the {len(filtered)} configurations meets {limit} for {intent.prompt_tokens}+"
            f"{intent.output_tokens} tokens (the closest, {near.key}, {what})"
        )
        if relax:
            return f"{head}; {relax}"
        return f"{head}, and none of them fits the free GPUs either: {_free_advice(view, filtered)}"
    head = f"none of the {len(kept)} configurations that meet the {intent.kind} intent fits the free GPUs"
    return f"{head}: {_free_advice(view, kept)}" + (f", or {relax}" if relax else "")


def _free_advice(view: ClusterView, ranked: list[Ranked]) -> str:
    closest, gap = view.closest(ranked)
    c = closest.est.config
    text = f"the nearest to fitting, {closest.key}, {view.miss_reason(closest.est)}"
    if math.isfinite(gap):
        return f"{text}; free that memory on {view.best_host(c.tp * c.pp)[0]}"
    return f"{text}; add a host with more GPUs of this type"


def largest_batch(plan_with: Callable[[int], T], max_batch: int, *, fixed: bool) -> tuple[T, int]:
    """``plan_with(b)`` for the largest batch ``b`` that fits: ``max_batch``, else (unless ``fixed``,
    i.e. the caller asked for this batch or pool) halved until one does, down to 1. Returns the plan
    and its batch; raises the last :class:`Infeasible` when even batch 1 does not fit."""
    b = max_batch
    while True:
        try:
            return plan_with(b), b
        except Infeasible:
            if fixed or b == 1:
                raise
            b = max(1, b // 2)
