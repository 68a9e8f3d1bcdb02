"""The deployment controller's decisions, as pure functions (paper section 6).

The controller makes two decisions: which configuration to deploy a model with, and on which GPUs.
It follows the paper's three steps:

I.   :func:`rank` orders the model's configuration estimates by the user's intent (minimise latency,
     cost, memory or GPU-hours; meet a latency SLO or a cost budget).
II.  :func:`plan` walks the ranked list and takes the first configuration whose layers fit the free
     memory of ``tp * pp`` GPUs of one host, split into uneven pipeline stages where the GPUs are
     fragmented (:func:`split_layers`).
III. :func:`place` maps it onto specific GPUs with a load-aware policy: ``least-loaded``, ``packing``
     or ``hybrid`` with threshold ``theta``.

Nothing here does I/O or reads a clock, so the live deployer and the trace simulator run the same
code. Units: bytes for memory (GiB = 2**30 bytes in messages), milliseconds for latency, and for cost
see :func:`cost`.

Memory model (``ConfigEstimate``): a GPU of a pipeline stage holding ``n`` layers needs
``gpu_overhead_bytes + n * layer_bytes`` plus ``first_stage_bytes`` on the first stage (embedding) and
``last_stage_bytes`` on the last (final norm and LM head); a single-stage deployment pays both.
``layer_bytes`` is one tensor-parallel rank's share, so each of a stage's ``tp`` GPUs holds the same
``n`` layers and the stage is as strong as its GPU with the least free memory.

Feasibility does not depend on the placement policy (every policy may end on all GPUs: hybrid falls
back to least-loaded over the whole cluster), so step II checks fit with precomputed per-host bounds
and runs a policy only once, for the chosen configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from iserve.errors import BadRequest, Infeasible, InternalError
from iserve.messages import ConfigEstimate, GpuAssignment, Intent, Rejection

GIB = 1 << 30

INTENT_KINDS = ("min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget")
COST_MODELS = ("mem-x-latency", "memory", "gpu-hours")
POLICIES = ("least-loaded", "packing", "hybrid")

COST_UNITS = {"mem-x-latency": "GiB-s", "memory": "GiB", "gpu-hours": "GPU-h"}


@dataclass(frozen=True)
class GpuState:
    """One GPU as the deployer sees it: free memory now and ``load``, the fraction of the last 120 s
    window it was busy (paper section 6: ``load_i = busy seconds / window``), between 0 and 1."""

    agent_id: str
    gpu_index: int
    gpu_type: str
    total_bytes: int
    free_bytes: int
    load: float


@dataclass
class Decision:
    """The outcome of :func:`plan`.

    ``assignments`` lists the GPUs stage by stage (stage ``s``, tensor-parallel rank ``r`` is
    ``assignments[s * tp + r]``); every rank of a stage holds the same layers. ``rejected`` are the
    better-ranked configurations that did not fit the free GPUs, best first; ``filtered`` are those the
    intent itself ruled out (over the SLO or the budget), closest to the limit first. ``cost`` is in
    the units of ``intent.cost_model`` (see :func:`cost`).
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


# ---------------------------------------------------------------------------------------------------
# step I: metrics and ranking


def latency_ms(est: ConfigEstimate, intent: Intent) -> float:
    """End-to-end latency in milliseconds of one request of the intent's size (paper equation 1)."""
    return est.latency_ms(intent.prompt_tokens, intent.output_tokens)


def _cost(est: ConfigEstimate, lat_ms: float, cost_model: str) -> float:
    if cost_model == "mem-x-latency":
        return est.total_bytes / GIB * (lat_ms / 1000.0)
    if cost_model == "memory":
        return est.total_bytes / GIB
    if cost_model == "gpu-hours":
        return est.config.tp * est.config.pp * (lat_ms / 1000.0) / 3600.0
    raise BadRequest(f"unknown cost_model {cost_model!r}; use one of {', '.join(COST_MODELS)}")


def cost(est: ConfigEstimate, intent: Intent) -> float:
    """Cost of one request of the intent's size under ``intent.cost_model``:

    * ``mem-x-latency``: total memory in GiB times latency in seconds (GiB-s), the memory a request
      holds for as long as it runs;
    * ``memory``: total memory in GiB over all ``tp * pp`` GPUs;
    * ``gpu-hours``: GPUs times latency in seconds / 3600 (GPU-h per request).
    """
    return _cost(est, latency_ms(est, intent), intent.cost_model)


def _gpu_hours(est: ConfigEstimate, lat_ms: float) -> float:
    return est.config.tp * est.config.pp * (lat_ms / 1000.0) / 3600.0


def validate_intent(intent: Intent) -> None:
    """Raise :class:`BadRequest` with a sentence that says what to fix when the intent is unusable."""
    if intent.kind not in INTENT_KINDS:
        raise BadRequest(f"unknown intent kind {intent.kind!r}; use one of {', '.join(INTENT_KINDS)}")
    if intent.cost_model not in COST_MODELS:
        raise BadRequest(f"unknown cost_model {intent.cost_model!r}; use one of {', '.join(COST_MODELS)}")
    for name in ("prompt_tokens", "output_tokens"):
        value = getattr(intent, name)
        if not isinstance(value, int) or value < 1:
            raise BadRequest(f"intent {name} must be a positive number of tokens (got {value!r}); set it to "
                             "the typical request size the latency should be computed for")
    if intent.kind == "latency-slo":
        slo = intent.slo_ms
        if slo is None or not math.isfinite(slo) or slo <= 0:
            raise BadRequest(f"intent latency-slo needs slo_ms, a positive latency target in milliseconds for "
                             f"a {intent.prompt_tokens}+{intent.output_tokens}-token request (got {slo!r}), "
                             "e.g. slo_ms=2000")
    if intent.kind == "cost-budget":
        budget = intent.budget
        if budget is None or not math.isfinite(budget) or budget <= 0:
            unit = COST_UNITS[intent.cost_model]
            raise BadRequest(f"intent cost-budget needs budget, the most one request may cost in {unit} "
                             f"(cost_model {intent.cost_model}), as a positive number (got {budget!r})")


@dataclass(slots=True)
class _Ranked:
    est: ConfigEstimate
    key: str
    latency_ms: float
    cost: float


def _rank(estimates: Sequence[ConfigEstimate], intent: Intent) -> tuple[list[_Ranked], list[_Ranked]]:
    """Rank with the metrics kept alongside; returns (kept in rank order, filtered closest first)."""
    validate_intent(intent)
    p, o, cm = intent.prompt_tokens, intent.output_tokens, intent.cost_model
    items = []
    for est in estimates:
        lat = est.latency_ms(p, o)
        items.append(_Ranked(est, est.config.key(), lat, _cost(est, lat, cm)))
    kind = intent.kind
    filtered: list[_Ranked] = []
    if kind == "latency-slo":
        slo = intent.slo_ms
        filtered = sorted((r for r in items if not r.latency_ms <= slo), key=lambda r: (r.latency_ms, r.key))
        items = [r for r in items if r.latency_ms <= slo]
    elif kind == "cost-budget":
        budget = intent.budget
        filtered = sorted((r for r in items if not r.cost <= budget), key=lambda r: (r.cost, r.key))
        items = [r for r in items if r.cost <= budget]
    if kind == "min-latency" or kind == "cost-budget":  # the common keys inline; the same as _order_key
        items.sort(key=lambda r: (r.latency_ms, r.cost, r.key))
    elif kind == "min-cost" or kind == "latency-slo":
        items.sort(key=lambda r: (r.cost, r.latency_ms, r.key))
    else:
        items.sort(key=lambda r: _order_key(kind, r.est, r.latency_ms, r.cost, r.key))
    return items, filtered


def _order_key(kind: str, est: ConfigEstimate, lat_ms: float, cost_: float, key: str) -> tuple:
    """The sort key of step I: smaller is better for the intent ``kind`` (:func:`_rank` inlines the
    first and last case)."""
    if kind == "min-latency" or kind == "cost-budget":
        return (lat_ms, cost_, key)
    if kind == "min-memory":
        return (est.total_bytes, lat_ms, key)
    if kind == "min-gpu-hours":
        return (_gpu_hours(est, lat_ms), lat_ms, key)
    return (cost_, lat_ms, key)  # min-cost, latency-slo


def score(decision: Decision, intent: Intent) -> tuple:
    """How well a decision meets the intent, comparable across decisions (smaller is better), with
    the same order as :func:`rank`; e.g. to pick between the plans for two GPU types."""
    return _order_key(intent.kind, decision.estimate, decision.latency_ms, decision.cost,
                      decision.estimate.config.key())


def _filter_reason(r: _Ranked, intent: Intent) -> str:
    if intent.kind == "latency-slo":
        return (f"estimated latency {r.latency_ms:.0f} ms for {intent.prompt_tokens}+{intent.output_tokens} "
                f"tokens exceeds the SLO of {intent.slo_ms:.0f} ms")
    unit = COST_UNITS[intent.cost_model]
    return f"estimated cost {_num(r.cost)} {unit} per request exceeds the budget of {_num(intent.budget)} {unit}"


def rank(estimates: list[ConfigEstimate], intent: Intent) -> tuple[list[ConfigEstimate], list[Rejection]]:
    """Paper step I: order the configurations by how well they meet the intent.

    * ``min-latency``: latency, then cost; ``min-cost``: cost (``intent.cost_model``), then latency;
    * ``min-memory``: total bytes, then latency; ``min-gpu-hours``: GPU-hours, then latency;
    * ``latency-slo``: only those with latency <= ``slo_ms``, cheapest first, then faster;
    * ``cost-budget``: only those with cost <= ``budget``, fastest first, then cheaper.

    Ties end on the configuration key, so the order is deterministic. Configurations the intent rules
    out come back as rejections with the reason, closest to the limit first. Raises
    :class:`BadRequest` for an unusable intent (see :func:`validate_intent`).
    """
    kept, filtered = _rank(estimates, intent)
    return [r.est for r in kept], [Rejection(config=r.key, reason=_filter_reason(r, intent)) for r in filtered]


# ---------------------------------------------------------------------------------------------------
# step II: the layer split


def split_layers(num_layers: int, capacities: list[int]) -> list[int] | None:
    """Split ``num_layers`` into contiguous blocks, one per stage in the given order, each at least 1
    and at most the stage's capacity, as even as the memory allows (paper: "distribute blocks evenly").

    Water-filling: the level ``h`` is the smallest largest block, i.e. the least ``h`` with
    ``sum(min(c, h)) >= num_layers``; each stage takes ``min(c, h)``, and the surplus (fewer than the
    stages at the level) is taken one layer each from the LAST stages at the level. The paper's
    example, 32 layers over capacities ``[10, 12, 7, 6]``, gives ``[10, 9, 7, 6]``. Returns ``None``
    when no split exists (a stage that cannot hold one layer, more stages than layers, or too little
    capacity in all).
    """
    k = len(capacities)
    if k == 0 or num_layers < k or min(capacities) < 1 or sum(capacities) < num_layers:
        return None
    lo, hi = 1, num_layers  # sum(min(c, num_layers)) >= num_layers holds at hi
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(c if c < mid else mid for c in capacities) >= num_layers:
            hi = mid
        else:
            lo = mid + 1
    level = lo
    blocks = [c if c < level else level for c in capacities]
    surplus = sum(blocks) - num_layers
    i = k - 1
    while surplus > 0:
        if blocks[i] == level:
            blocks[i] -= 1
            surplus -= 1
        i -= 1
    return blocks


def _cap(free: int, base: int, layer_bytes: int, num_layers: int) -> int:
    """Largest number of layers (at most ``num_layers``) a GPU with ``free`` bytes holds when a stage
    costs ``base + n * layer_bytes``; 0 when it cannot hold even one."""
    x = free - base
    if x < layer_bytes or x < 0:
        return 0
    if layer_bytes <= 0:
        return num_layers
    n = x // layer_bytes
    return n if n < num_layers else num_layers


def stage_capacity(est: ConfigEstimate, free_bytes: int, *, first: bool, last: bool) -> int:
    """Largest ``n`` with ``est.stage_bytes(n, first=first, last=last) <= free_bytes`` (at most the
    model's layers); 0 when not even one layer fits."""
    base = est.gpu_overhead_bytes + (est.first_stage_bytes if first else 0) + (est.last_stage_bytes if last else 0)
    return _cap(free_bytes, base, est.layer_bytes, est.num_layers)


def _fits_sorted(frees: Sequence[int], est: ConfigEstimate) -> bool:
    """Exact test: do the model's layers fit some arrangement of these GPUs (free bytes sorted
    descending, at least ``tp * pp`` of them; the first ``tp * pp`` are used)?

    Cutting the sorted list into consecutive groups of ``tp`` maximises every stage's weakest GPU at
    once, so only the roles remain: one group pays the first-stage extra, another the last-stage
    extra, and the best pair is found in O(pp).
    """
    c = est.config
    tp, pp, n = c.tp, c.pp, est.num_layers
    ov, lb, fb, bb = est.gpu_overhead_bytes, est.layer_bytes, est.first_stage_bytes, est.last_stage_bytes
    if pp == 1:
        return _cap(frees[tp - 1], ov + fb + bb, lb, n) >= n
    if pp > n:
        return False
    total = 0
    # best and second-best (loss, index) for the first and the last role
    f1 = f2 = l1 = l2 = (1 << 62, -1)
    for j in range(pp):
        m = frees[j * tp + tp - 1]
        mid = _cap(m, ov, lb, n)
        if mid < 1:
            return False
        total += mid
        a = _cap(m, ov + fb, lb, n)
        if a >= 1:
            cand = (mid - a, j)
            if cand < f1:
                f1, f2 = cand, f1
            elif cand < f2:
                f2 = cand
        b = _cap(m, ov + bb, lb, n)
        if b >= 1:
            cand = (mid - b, j)
            if cand < l1:
                l1, l2 = cand, l1
            elif cand < l2:
                l2 = cand
    if f1[1] < 0 or l1[1] < 0:
        return False
    if f1[1] != l1[1]:
        loss = f1[0] + l1[0]
    else:
        options = [f1[0] + l2[0] if l2[1] >= 0 else 1 << 62, f2[0] + l1[0] if f2[1] >= 0 else 1 << 62]
        loss = min(options)
        if loss >= 1 << 62:
            return False
    return total - loss >= n


def _even_stage_needs(est: ConfigEstimate) -> list[int]:
    """Per-stage bytes of an even split (what each GPU of the stage needs), largest first: the
    distinct values of :func:`_even_needs`, each standing for ``tp`` GPUs."""
    c = est.config
    pp = c.pp
    ov, lb = est.gpu_overhead_bytes, est.layer_bytes
    q, r = divmod(est.num_layers, pp)
    if pp == 1:
        return [ov + q * lb + est.first_stage_bytes + est.last_stage_bytes]
    stages = [ov + (q + 1 if s < r else q) * lb for s in range(pp)]
    stages[0] += est.first_stage_bytes
    stages[-1] += est.last_stage_bytes
    stages.sort(reverse=True)
    return stages


def _shortfall(stage_needs: list[int], frees: list[int], tp: int) -> int:
    """Bytes missing when the GPUs with ``frees`` (descending) take the stages' needs (descending),
    ``tp`` GPUs per stage, largest need on the freest GPUs."""
    short = 0
    j = 0
    for need in stage_needs:
        for free in frees[j:j + tp]:
            if need > free:
                short += need - free
        j += tp
    return short


def _even_needs(est: ConfigEstimate) -> list[int]:
    """Per-GPU bytes of an even split, largest first: what each GPU would need free without
    fragmentation. The stage sizes are :func:`split_layers` with unlimited capacity in closed form:
    ``num_layers // pp`` each, one more on the first ``num_layers % pp`` stages (needs pp <= layers)."""
    c = est.config
    tp, pp = c.tp, c.pp
    ov, lb = est.gpu_overhead_bytes, est.layer_bytes
    q, r = divmod(est.num_layers, pp)
    if pp == 1:
        return [ov + q * lb + est.first_stage_bytes + est.last_stage_bytes] * tp
    stages = [ov + (q + 1 if s < r else q) * lb for s in range(pp)]
    stages[0] += est.first_stage_bytes
    stages[-1] += est.last_stage_bytes
    stages.sort(reverse=True)
    return [b for b in stages for _ in range(tp)]


# ---------------------------------------------------------------------------------------------------
# step III: placement


@dataclass(slots=True)
class _Placement:
    assignments: list[GpuAssignment]
    agent_id: str
    note: str


def _policy_key(policy: str):
    if policy == "least-loaded":
        # least busy first; among equals the GPU with the most free memory (spread)
        return lambda g: (g.load, -g.free_bytes, g.agent_id, g.gpu_index)
    # packing: busiest first; among equals the GPU already holding the most memory (best fit)
    return lambda g: (-g.load, g.free_bytes - g.total_bytes, g.agent_id, g.gpu_index)


def check_policy(policy: str, theta: float) -> None:
    """Raise :class:`BadRequest` for an unknown placement policy or a threshold outside 0..1."""
    if policy not in POLICIES:
        raise BadRequest(f"unknown placement policy {policy!r}; use one of {', '.join(POLICIES)}")
    if not (isinstance(theta, (int, float)) and 0.0 <= theta <= 1.0):
        raise BadRequest(f"placement threshold theta must be a load between 0 and 1 (got {theta!r})")


class ClusterView:
    """The free GPUs of one GPU type, indexed once per decision so that testing a configuration's fit
    costs O(1) for most configurations (per-host bounds) and O(pp) per promising host otherwise.

    GPUs are grouped by host (``agent_id``): all ``tp * pp`` GPUs of a deployment live on one host.
    """

    def __init__(self, gpus: Sequence[GpuState]):
        self.gpus = list(gpus)
        seen: set[tuple[str, int]] = set()
        by_agent: dict[str, list[GpuState]] = {}
        for g in self.gpus:
            ident = (g.agent_id, g.gpu_index)
            if ident in seen:
                raise BadRequest(f"GPU {g.agent_id}:{g.gpu_index} is listed twice; pass each GPU once")
            seen.add(ident)
            by_agent.setdefault(g.agent_id, []).append(g)
        self.agents = sorted(by_agent)
        self.by_agent = by_agent
        self.free_desc = {a: sorted((g.free_bytes for g in by_agent[a]), reverse=True) for a in self.agents}
        self.max_gpus = max((len(v) for v in by_agent.values()), default=0)
        self._bounds: dict[tuple[int, int], list[tuple[int, list[int]]]] = {}
        self._best_host: dict[int, tuple[str, list[int], str]] = {}
        self._orders: dict[tuple[str, float | None], list[GpuState]] = {}

    # -- fit ----------------------------------------------------------------------------------------

    def _host_bounds(self, tp: int, pp: int) -> list[tuple[int, list[int]]]:
        """Hosts with at least ``tp * pp`` GPUs as (sum of the stage minima, free bytes descending),
        largest sum first: the sum bounds the bytes any arrangement of the host's GPUs offers."""
        key = (tp, pp)
        out = self._bounds.get(key)
        if out is None:
            k = tp * pp
            out = []
            for a in self.agents:
                s = self.free_desc[a]
                if len(s) >= k:
                    out.append((sum(s[j * tp + tp - 1] for j in range(pp)), s))
            out.sort(key=lambda t: -t[0])
            self._bounds[key] = out
        return out

    def fits(self, est: ConfigEstimate) -> bool:
        """Whether some ``tp * pp`` GPUs of one host hold the configuration (exact, policy-free)."""
        c = est.config
        tp, pp, n = c.tp, c.pp, est.num_layers
        if tp < 1 or pp < 1 or tp * pp > self.max_gpus or pp > n:
            return False
        # every stage's weakest GPU pays the overhead, one layer per layer and the two extras once
        ov, lb, extras = est.gpu_overhead_bytes, est.layer_bytes, est.first_stage_bytes + est.last_stage_bytes
        need = pp * ov + extras + n * lb
        # enough on every GPU for an even share plus both extras: fits without looking at roles
        ample = ov + -(-n // pp) * lb + extras
        k = tp * pp
        for bound, frees in self._host_bounds(tp, pp):
            if bound < need:
                return False
            if pp == 1 or frees[k - 1] >= ample or _fits_sorted(frees, est):
                return True
        return False

    # -- explaining a miss ---------------------------------------------------------------------------

    def _best(self, k: int) -> tuple[str, list[int], str]:
        """The host with the most free bytes on its ``k`` freest GPUs, those bytes, and a phrase."""
        got = self._best_host.get(k)
        if got is None:
            agent, top = "", -1
            for a in self.agents:  # sorted, so ties go to the first host id
                total = sum(self.free_desc[a][:k])
                if total > top:
                    agent, top = a, total
            frees = self.free_desc[agent][:k]
            if k == 1:
                phrase = f"the best host, {agent}, has {_gib(frees[0])} GiB free on its freest GPU"
            elif k <= 4:
                phrase = f"the best host, {agent}, has {_gib_list(frees)} GiB free"
            else:
                phrase = (f"the best host, {agent}, has {_gib(sum(frees))} GiB free on its {k} freest GPUs "
                          f"(the smallest {_gib(frees[-1])} GiB)")
            got = self._best_host[k] = (agent, frees, phrase)
        return got

    def shortfall(self, est: ConfigEstimate) -> float:
        """Bytes to free on the best host so that an even split fits (inf when no host is big enough)."""
        c = est.config
        k = c.tp * c.pp
        if k > self.max_gpus or c.pp > est.num_layers or k < 1:
            return math.inf
        _, frees, _ = self._best(k)
        return float(_shortfall(_even_stage_needs(est), frees, c.tp))

    def closest(self, ranked: list[_Ranked]) -> tuple[_Ranked, float]:
        """The configuration with the least :meth:`shortfall` (the better-ranked among equals) and it.
        Its total bytes beyond the best host's free bytes bound the shortfall from below, so the exact
        value is computed only for candidates that bound does not rule out."""
        bounds = []
        for i, r in enumerate(ranked):
            c = r.est.config
            k = c.tp * c.pp
            if k > self.max_gpus or c.pp > r.est.num_layers or k < 1:
                bound = math.inf
            else:
                need = c.tp * (c.pp * r.est.gpu_overhead_bytes + r.est.num_layers * r.est.layer_bytes
                               + r.est.first_stage_bytes + r.est.last_stage_bytes)
                bound = max(0, need - sum(self._best(k)[1]))
            bounds.append((bound, i))
        bounds.sort()
        best = (math.inf, len(ranked))
        for bound, i in bounds:
            if (bound, i) >= best:
                break
            gap = self.shortfall(ranked[i].est)
            if (gap, i) < best:
                best = (gap, i)
        i = best[1] if best[1] < len(ranked) else 0
        return ranked[i], best[0]

    def miss_reason(self, est: ConfigEstimate) -> str:
        """One clause saying why the configuration does not fit the free GPUs."""
        c = est.config
        k = c.tp * c.pp
        if not self.gpus:
            return "no GPUs of this type are free"
        if c.pp > est.num_layers:
            return f"needs at least {c.pp} layers for pp={c.pp}, and the model has {est.num_layers}"
        if k > self.max_gpus:
            return (f"needs {k} GPUs on one host (tp={c.tp} x pp={c.pp}), and no host has more than "
                    f"{self.max_gpus} GPUs of this type")
        needs = _even_stage_needs(est)
        lo, hi = _gib(needs[-1]), _gib(needs[0])
        _, frees, phrase = self._best(k)
        short = _shortfall(needs, frees, c.tp)
        tail = f" ({_gib(short)} GiB short)" if short > 0 else " (not in stages its GPUs can hold)"
        if k == 1:
            return f"needs 1 GPU with {hi} GiB free; {phrase}{tail}"
        each = f"{hi} GiB" if lo == hi else f"{lo} to {hi} GiB"
        return f"needs {k} GPUs on one host with {each} free each ({_gib(c.tp * sum(needs))} GiB in all); {phrase}{tail}"

    # -- placement -----------------------------------------------------------------------------------

    def _order(self, policy: str, theta: float | None) -> list[GpuState]:
        """All GPUs in the policy's order; with ``theta`` only the packable ones (load < theta)."""
        key = (policy, theta)
        order = self._orders.get(key)
        if order is None:
            pool = self.gpus if theta is None else [g for g in self.gpus if g.load < theta]
            order = self._orders[key] = sorted(pool, key=_policy_key(policy))
        return order

    @staticmethod
    def _deepest(order: list[GpuState], k: int, fixed: list[int], hi: int, est: ConfigEstimate) -> int:
        """Smallest prefix length ``q <= hi`` of ``order`` whose ``k`` freest GPUs, with the ``fixed``
        free bytes, fit the configuration; -1 when none. Feasibility only grows with free memory, so
        the freest GPUs of a prefix are its best completion."""
        frees = [g.free_bytes for g in order]
        for q in range(k, hi + 1):
            cand = sorted(frees[:q], reverse=True)[:k] + fixed
            cand.sort(reverse=True)
            if _fits_sorted(cand, est):
                return q
        return -1

    def _select(self, order: list[GpuState], est: ConfigEstimate) -> list[GpuState]:
        """The policy-preferred ``tp * pp`` GPUs of one host (``order`` is the host's GPUs in policy
        order, known to hold a fitting subset): the subset whose deepest GPU in the order comes
        earliest, then the next deepest, and so on (colexicographic minimum). When every GPU either
        can or cannot take an even share this is the paper's "first K GPUs with enough free memory";
        with fragmented GPUs it skips a GPU only when no fitting subset can use it there."""
        k = est.config.tp * est.config.pp
        picked: list[int] = []
        fixed: list[int] = []
        hi = len(order)
        for r in range(k, 0, -1):
            q = self._deepest(order, r, fixed, hi, est)
            if q < 0:
                raise InternalError(f"placement lost a fitting subset for {est.config.key()}")
            picked.append(q - 1)
            fixed.append(order[q - 1].free_bytes)
            hi = q - 1
        return [order[i] for i in sorted(picked)]

    def _place_in(self, order: list[GpuState], est: ConfigEstimate) -> tuple[str, list[GpuState]] | None:
        """Pick the host whose selection reaches least deep into ``order`` (the cluster-wide policy
        order: the deepest GPU decides, and GPUs are unique so there are no ties), then its GPUs."""
        k = est.config.tp * est.config.pp
        position = {id(g): i for i, g in enumerate(order)}
        per_agent: dict[str, list[GpuState]] = {}
        for g in order:
            per_agent.setdefault(g.agent_id, []).append(g)
        best: tuple[int, str] | None = None
        for agent in sorted(per_agent):
            gs = per_agent[agent]
            if len(gs) < k:
                continue
            if not _fits_sorted(sorted((g.free_bytes for g in gs), reverse=True), est):
                continue
            q = self._deepest(gs, k, [], len(gs), est)
            depth = position[id(gs[q - 1])]
            if best is None or depth < best[0]:
                best = (depth, agent)
        if best is None:
            return None
        agent = best[1]
        return agent, self._select(per_agent[agent], est)

    def place(self, est: ConfigEstimate, policy: str, theta: float) -> _Placement | None:
        """Paper step III: choose the GPUs with the policy, order them into stages, split the layers.

        * ``least-loaded``: the least busy GPUs with enough memory (spreads deployments);
        * ``packing``: the busiest GPUs with enough memory (fewer GPUs in use);
        * ``hybrid``: GPUs with load < ``theta`` are packable: first the packing policy over them
          only; if they cannot hold the model, least-loaded over all GPUs.
        """
        if not self.fits(est):
            return None
        if policy == "hybrid":
            got = self._place_in(self._order("packing", theta), est)
            note = f"hybrid packed it onto GPUs with load < {theta:g}"
            if got is None:
                got = self._place_in(self._order("least-loaded", None), est)
                note = f"hybrid found too little memory on GPUs with load < {theta:g} and spread it least-loaded"
        else:
            got = self._place_in(self._order(policy, None), est)
            note = f"{policy} placement"
        if got is None:
            raise InternalError(f"placement found no GPUs for {est.config.key()}, which fits")
        agent, chosen = got
        assignments = arrange(est, chosen)
        if assignments is None:
            raise InternalError(f"the layer split failed on GPUs chosen for {est.config.key()}")
        return _Placement(assignments, agent, note)


def arrange(est: ConfigEstimate, chosen: list[GpuState]) -> list[GpuAssignment] | None:
    """Order ``tp * pp`` GPUs (given in policy order) into pipeline stages and split the layers.

    Stage ordering: the GPUs, sorted by free memory (most first, ties in policy order), are cut into
    consecutive groups of ``tp`` (a stage is as strong as its weakest rank, so this maximises every
    stage); stages then run in policy order of their first GPU, ranks within a stage in policy order.
    With ``tp = 1`` the pipeline therefore follows the policy order exactly. Only if that order leaves
    the first or last stage unable to hold its extra (embedding, LM head) or the layers short, the
    first and last roles go to the first pair of stages, in order, that fits; the other stages keep
    their order. The split is :func:`split_layers` over the stages' capacities. ``None`` when the GPUs
    cannot hold the model in any arrangement.
    """
    c = est.config
    tp, pp, n = c.tp, c.pp, est.num_layers
    if len(chosen) != tp * pp:
        raise ValueError(f"{c.key()} needs {tp * pp} GPUs, got {len(chosen)}")
    rank_of = {id(g): i for i, g in enumerate(chosen)}
    by_free = sorted(chosen, key=lambda g: (-g.free_bytes, rank_of[id(g)]))
    groups = [sorted(by_free[s * tp:(s + 1) * tp], key=lambda g: rank_of[id(g)]) for s in range(pp)]
    groups.sort(key=lambda grp: rank_of[id(grp[0])])
    weakest = [min(g.free_bytes for g in grp) for grp in groups]
    ov, lb, fb, bb = est.gpu_overhead_bytes, est.layer_bytes, est.first_stage_bytes, est.last_stage_bytes

    split = None
    sequence: list[int] = [0]
    if pp == 1:
        split = split_layers(n, [_cap(weakest[0], ov + fb + bb, lb, n)])
    else:
        mid = [_cap(m, ov, lb, n) for m in weakest]
        pairs = [(0, pp - 1)] + [(f, l) for f in range(pp) for l in range(pp) if f != l]
        for f, l in pairs:
            sequence = [f] + [s for s in range(pp) if s != f and s != l] + [l]
            caps = ([_cap(weakest[f], ov + fb, lb, n)] + [mid[s] for s in sequence[1:-1]]
                    + [_cap(weakest[l], ov + bb, lb, n)])
            split = split_layers(n, caps)
            if split is not None:
                break
    if split is None:
        return None
    out: list[GpuAssignment] = []
    start = 0
    for pos, (s, nl) in enumerate(zip(sequence, split)):
        mem = est.stage_bytes(nl, first=pos == 0, last=pos == pp - 1)
        for g in groups[s]:
            out.append(GpuAssignment(agent_id=g.agent_id, gpu_index=g.gpu_index, first_layer=start,
                                     num_layers=nl, memory_bytes=mem))
        start += nl
    return out


def place(est: ConfigEstimate, gpus: list[GpuState], *, policy: str, theta: float) -> list[GpuAssignment] | str:
    """Paper step III for one configuration: the GPU assignments (stage by stage, ranks within a
    stage; see :func:`arrange`), or one sentence saying why it does not fit the free GPUs.

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


# ---------------------------------------------------------------------------------------------------
# steps I to III together


def plan(estimates: Sequence[ConfigEstimate], intent: Intent, gpus: Sequence[GpuState], *,
         policy: str = "hybrid", theta: float = 0.5) -> Decision:
    """The deployment controller's decision (paper section 6): rank the configurations by the intent
    (step I), take the first one in rank order that fits the free GPUs (step II), and place it with
    the policy (step III). Every better-ranked configuration that did not fit becomes a rejection with
    its reason.

    Raises :class:`BadRequest` for an unusable intent or policy, and :class:`Infeasible`, with the
    closest miss and what to free or relax, when nothing fits.
    """
    check_policy(policy, theta)
    kept, filtered = _rank(estimates, intent)
    view = ClusterView(gpus)
    chosen: _Ranked | None = None
    misses: list[_Ranked] = []
    fitting = 0
    for r in kept:
        if view.fits(r.est):
            fitting += 1
            if chosen is None:
                chosen = r
        elif chosen is None:
            misses.append(r)
    if chosen is None:
        raise Infeasible(_infeasible_message(estimates, kept, filtered, intent, view))
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
        filtered=[Rejection(config=r.key, reason=_filter_reason(r, intent)) for r in filtered],
        fitting=fitting,
        agent_id=placed.agent_id,
        placement=placed.note,
    )


def _why(r: _Ranked, intent: Intent, fitting: int, missed: int, filtered: int, placed: _Placement) -> str:
    tokens = f"{intent.prompt_tokens}+{intent.output_tokens} tokens"
    unit = COST_UNITS[intent.cost_model]
    lat = f"{r.latency_ms:.0f} ms for {tokens}"
    among = f"among the {fitting} configuration{'s' if fitting != 1 else ''} that fit the free GPUs"
    kind = intent.kind
    if kind == "min-latency":
        head, better = f"has the lowest estimated latency ({lat}) {among}", "faster"
    elif kind == "min-cost":
        head, better = (f"has the lowest estimated cost ({_num(r.cost)} {unit} per request, {lat}) {among}",
                        "cheaper")
    elif kind == "min-memory":
        head, better = f"has the smallest footprint ({_gib(r.est.total_bytes)} GiB, {lat}) {among}", "smaller"
    elif kind == "min-gpu-hours":
        gh = _gpu_hours(r.est, r.latency_ms)
        head, better = (f"uses the fewest GPU-hours ({_num(gh)} GPU-h per request: {r.est.config.gpus} GPUs "
                        f"x {lat}) {among}", "leaner")
    elif kind == "latency-slo":
        head, better = (f"is the cheapest ({_num(r.cost)} {unit} per request, {lat}) of the {fitting} "
                        f"that meet the {intent.slo_ms:.0f} ms SLO and fit the free GPUs", "cheaper")
    else:
        head, better = (f"is the fastest ({lat}, {_num(r.cost)} {unit} per request) of the {fitting} within "
                        f"the budget of {_num(intent.budget)} {unit} that fit the free GPUs", "faster")
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


def _infeasible_message(estimates: Sequence[ConfigEstimate], kept: list[_Ranked], filtered: list[_Ranked],
                        intent: Intent, view: ClusterView) -> str:
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
            relax = (f"raising slo_ms to {math.ceil(fit.latency_ms)} ms would admit {fit.key}, "
                     "which fits the free GPUs")
        elif fit is not None:
            relax = f"raising the budget to {_num_up(fit.cost)} {unit} would admit {fit.key}, which fits the free GPUs"
    if not kept:
        limit = f"the latency SLO of {intent.slo_ms:.0f} ms" if slo else f"the budget of {_num(intent.budget)} {unit}"
        near = filtered[0]
        what = f"takes {near.latency_ms:.0f} ms" if slo else f"costs {_num(near.cost)} {unit}"
        head = (f"none of the {len(filtered)} configurations meets {limit} for {intent.prompt_tokens}+"
                f"{intent.output_tokens} tokens (the closest, {near.key}, {what})")
        if relax:
            return f"{head}; {relax}"
        return f"{head}, and none of them fits the free GPUs either: {_free_advice(view, filtered)}"
    head = f"none of the {len(kept)} configurations that meet the {intent.kind} intent fits the free GPUs"
    return f"{head}: {_free_advice(view, kept)}" + (f", or {relax}" if relax else "")


def _free_advice(view: ClusterView, ranked: list[_Ranked]) -> str:
    closest, gap = view.closest(ranked)
    c = closest.est.config
    text = f"the nearest to fitting, {closest.key}, {view.miss_reason(closest.est)}"
    if math.isfinite(gap):
        return f"{text}; free that memory on {view._best(c.tp * c.pp)[0]}"
    return f"{text}; add a host with more GPUs of this type"


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def _gib_list(values: list[int]) -> str:
    parts = [_gib(v) for v in values]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _num_up(x: float) -> str:
    """``x`` rounded UP to 3 significant digits, so a limit set to it admits ``x``."""
    if x <= 0 or not math.isfinite(x):
        return _num(x)
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    up = math.ceil(x / step - 1e-9) * step
    return f"{up:.3g}" if up < 1000 else f"{up:.0f}"


def _num(x: float | None) -> str:
    if x is None:
        return "?"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
