"""AlpaServe and AlpaServe* as a baseline: one whole-cluster plan made with the trace's per-model
request rates known in advance (the algorithm: docs/simulator.md#alpaserve)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

from iserve.deployer.placement import GpuState, arrange
from iserve.deployer.planner import Decision
from iserve.deployer.ranking import cost, latency_ms, validate_intent
from iserve.errors import BadRequest, Infeasible
from iserve.messages import ConfigEstimate, GpuAssignment, Intent
from iserve.quality import ANY
from iserve.slo import reference_estimate

from .baselines import is_plain, layer_split


@dataclass
class AlpaGroup:
    """One group of GPUs of an AlpaServe plan: its bucket, GPUs, parallelism and the models it holds."""

    bucket: int
    gpus: list[tuple[str, int]]
    tp: int
    pp: int
    models: list[str] = field(default_factory=list)


@dataclass
class AlpaServePlan:
    """The outcome of :func:`alpaserve`.

    ``replicas`` maps every model to its deployments (data-parallel replicas), in placement order;
    an empty list means the model was dropped (``dropped`` lists those, with ``drop_reasons``).
    ``attainment`` is the search's own estimate of the request-weighted SLO attainment (dropped
    models count as missed); ``evaluations`` counts the candidate placements it scored."""

    replicas: dict[str, list[Decision]]
    dropped: list[str]
    groups: list[AlpaGroup]
    attainment: float
    evaluations: int
    why: str
    drop_reasons: dict[str, str] = field(default_factory=dict)


# Weight of the throughput tie-breaker in the search's score (see :func:`_replica_score`).
GOODPUT_WEIGHT = 1e-3
# Processor sharing can slow a replica by at most this factor in the score (the M/M/1 stretch
# ``1 / (1 - rho_others)`` diverges as the other replicas saturate the group).
MAX_STRETCH = 20.0


def _replica_score(rate: float, service_s: float, others_rho: float, slo_s: float) -> tuple[float, float]:
    """The score of one replica per request it receives: (P(latency <= SLO), a small throughput
    tie-breaker); the search adds the two.

    The replica is an M/M/1 FCFS queue receiving ``rate`` requests/s; its service of ``service_s``
    is stretched by processor sharing with the other replicas of its group, which keep its GPUs
    ``others_rho`` busy: ``S = service_s / (1 - others_rho)`` (at most ``MAX_STRETCH`` times).
    With utilisation ``u = rate * S < 1`` the response time is exponential with rate ``(1 - u) / S``,
    so ``P(T <= slo) = 1 - exp(-(1 - u) * slo / S)``; a saturated replica meets no SLO in steady
    state. ``GOODPUT_WEIGHT * min(1, 1 / u)`` (the fraction of its requests it can serve at all) is
    added so that when every option saturates, capacity still decides, as AlpaServe's simulation of
    a finite trace would credit the requests served before the queue builds up."""
    stretch = 1.0 / (1.0 - others_rho) if others_rho < 1.0 - 1.0 / MAX_STRETCH else MAX_STRETCH
    s = service_s * stretch
    u = rate * s
    goodput = GOODPUT_WEIGHT * (min(1.0, 1.0 / u) if u > 0 else 1.0)
    if u >= 1.0:
        return 0.0, goodput
    return 1.0 - math.exp(-(1.0 - u) * slo_s / s), goodput


@dataclass
class _Bucket:
    models: list[str]


@dataclass
class _BucketResult:
    key: tuple  # comparable: larger is better
    placed: int
    attained: float  # requests/s expected to meet the SLO
    groups: list[AlpaGroup]
    replicas: list[tuple[str, int, ConfigEstimate, list[GpuAssignment]]]  # model, group, estimate, assignments


class _AlpaSearch:
    """The state of one :func:`alpaserve` search (the algorithm: docs/simulator.md#alpaserve)."""

    def __init__(
        self,
        models: Mapping[str, Sequence[ConfigEstimate]],
        rates: Mapping[str, float],
        gpus: Sequence[GpuState],
        intent: Intent,
        slo_ms: Mapping[str, float],
        drop: bool,
        bucket_ratio: float,
    ):
        self.intent = intent
        self.drop = drop
        self.rates = {m: max(0.0, float(rates.get(m, 0.0))) for m in models}
        self.slo_s = {m: float(slo_ms[m]) / 1000.0 for m in models}
        self.plain: dict[str, dict[tuple[int, int], ConfigEstimate]] = {
            m: {(e.config.tp, e.config.pp): e for e in ests if is_plain(e)} for m, ests in models.items()
        }
        self.flat = sorted(gpus, key=lambda g: (g.agent_id, g.gpu_index))
        self.evaluations = 0
        self._service: dict[tuple[str, int, int], float] = {}
        self.buckets = self._bucketize(list(models), bucket_ratio)

    # -- buckets ------------------------------------------------------------------------------------

    def _size(self, m: str) -> int:
        ests = self.plain[m]
        if not ests:
            return 0
        return min(e.total_bytes for e in ests.values())

    def _bucketize(self, names: list[str], ratio: float) -> list[_Bucket]:
        order = sorted(names, key=lambda m: (-self._size(m), m))
        buckets: list[_Bucket] = []
        head = 0
        for m in order:
            size = self._size(m)
            if buckets and size * ratio >= head:
                buckets[-1].models.append(m)
            else:
                buckets.append(_Bucket([m]))
                head = size
        while len(buckets) > max(1, len(self.flat)):
            last = buckets.pop()
            buckets[-1].models.extend(last.models)
        return buckets

    # -- scoring ------------------------------------------------------------------------------------

    def service_s(self, m: str, est: ConfigEstimate) -> float:
        key = (m, est.config.tp, est.config.pp)
        s = self._service.get(key)
        if s is None:
            s = self._service[key] = max(latency_ms(est, self.intent), 1e-6) / 1000.0
        return s

    def attained(self, replicas: list[tuple[str, int, float]], *, pure: bool = False) -> float:
        """The search's score of (model, group, service seconds) replicas: requests/s expected to
        meet their SLO plus the throughput tie-breaker (``pure``: without it)."""
        self.evaluations += 1
        count: dict[str, int] = {}
        for m, _, _ in replicas:
            count[m] = count.get(m, 0) + 1
        rho: dict[int, float] = {}
        loads = []
        for m, g, s in replicas:
            lam = self.rates[m] / count[m]
            loads.append(lam * s)
            rho[g] = rho.get(g, 0.0) + lam * s
        total = 0.0
        for (m, g, s), own in zip(replicas, loads):
            lam = self.rates[m] / count[m]
            p, goodput = _replica_score(lam, s, rho[g] - own, self.slo_s[m])
            total += lam * (p if pure else p + goodput)
        return total

    # -- one bucket on one slice --------------------------------------------------------------------

    def _groups(self, off: int, n: int, s: int) -> list[list[GpuState]] | None:
        groups = [self.flat[off + i * s : off + (i + 1) * s] for i in range(n // s)]
        if any(len({g.agent_id for g in grp}) != 1 for grp in groups):
            return None
        return groups

    def _greedy(self, bucket: _Bucket, groups: list[list[GpuState]], cfg: tuple[int, int]) -> _BucketResult:
        frees = [list(grp) for grp in groups]
        reps: list[tuple[str, int, float]] = []
        placed_info: list[tuple[str, int, ConfigEstimate, list[GpuAssignment]]] = []
        held: list[set[str]] = [set() for _ in groups]
        ests = {m: self.plain[m][cfg] for m in bucket.models}

        def fit(m: str, gi: int) -> list[GpuAssignment] | None:
            return arrange(ests[m], frees[gi])

        def apply(m: str, gi: int, assignments: list[GpuAssignment]) -> None:
            used = {(a.agent_id, a.gpu_index): a.memory_bytes for a in assignments}
            frees[gi] = [
                replace(g, free_bytes=g.free_bytes - used.get((g.agent_id, g.gpu_index), 0)) for g in frees[gi]
            ]
            held[gi].add(m)
            reps.append((m, gi, self.service_s(m, ests[m])))
            placed_info.append((m, gi, ests[m], assignments))

        current = 0.0
        if not self.drop:
            # AlpaServe*: every model once, the most loaded first, where it hurts least
            for m in sorted(bucket.models, key=lambda m: (-self.rates[m] * self.service_s(m, ests[m]), m)):
                best = None
                for gi in range(len(groups)):
                    got = fit(m, gi)
                    if got is None:
                        continue
                    score = self.attained(reps + [(m, gi, self.service_s(m, ests[m]))])
                    if best is None or score > best[0]:
                        best = (score, gi, got)
                if best is not None:
                    apply(m, best[1], best[2])
                    current = best[0]
        while True:
            top = None
            for m in bucket.models:
                s = self.service_s(m, ests[m])
                for gi in range(len(groups)):
                    if m in held[gi]:
                        continue
                    got = fit(m, gi)
                    if got is None:
                        continue
                    score = self.attained(reps + [(m, gi, s)])
                    if top is None or score > top[0]:
                        top = (score, m, gi, got)
            if top is None or top[0] <= current + 1e-12:
                break
            current = top[0]
            apply(top[1], top[2], top[3])
        placed = len({r[0] for r in reps})
        alpa_groups = [
            AlpaGroup(
                bucket=-1,
                gpus=[(g.agent_id, g.gpu_index) for g in grp],
                tp=cfg[0],
                pp=cfg[1],
                models=[m for m, gi, _, _ in placed_info if gi == i],
            )
            for i, grp in enumerate(groups)
        ]
        key = (current,) if self.drop else (placed, current)
        return _BucketResult(key=key, placed=placed, attained=current, groups=alpa_groups, replicas=placed_info)

    def best_for(self, b: int, off: int, n: int) -> _BucketResult:
        """The best groups, parallelism and placement for bucket ``b`` on GPUs ``flat[off:off+n]``."""
        bucket = self.buckets[b]
        best: _BucketResult | None = None
        for s in range(1, n + 1):
            if n % s:
                continue
            groups = self._groups(off, n, s)
            if groups is None:
                continue
            cfgs = sorted(
                {
                    k
                    for k in self.plain[bucket.models[0]]
                    if k[0] * k[1] == s and all(k in self.plain[m] for m in bucket.models)
                }
            )
            for cfg in cfgs:
                res = self._greedy(bucket, groups, cfg)
                if best is None or res.key > best.key:
                    best = res
        if best is None:
            best = _BucketResult(key=(0.0,) if self.drop else (0, 0.0), placed=0, attained=0.0, groups=[], replicas=[])
        return best

    # -- the whole cluster --------------------------------------------------------------------------

    def run(self) -> tuple[list[_BucketResult], float]:
        """Dynamic programming over buckets: every split of the GPUs into consecutive non-empty
        slices, one per bucket, maximising the summed bucket keys."""
        G, B = len(self.flat), len(self.buckets)
        memo: dict[tuple[int, int], tuple[tuple, list[_BucketResult]]] = {}

        def add(a: tuple, b: tuple) -> tuple:
            return tuple(x + y for x, y in zip(a, b))

        def solve(b: int, off: int) -> tuple[tuple, list[_BucketResult]]:
            if (b, off) in memo:
                return memo[(b, off)]
            if b == B - 1:
                res = self.best_for(b, off, G - off)
                out = (res.key, [res])
            else:
                out = None
                for n in range(1, G - off - (B - 1 - b) + 1):
                    head = self.best_for(b, off, n)
                    tail_key, tail = solve(b + 1, off + n)
                    key = add(head.key, tail_key)
                    if out is None or key > out[0]:
                        out = (key, [head] + tail)
            memo[(b, off)] = out  # type: ignore[assignment]  # a bucket always gets at least one GPU
            return out  # type: ignore[return-value]

        _, results = solve(0, 0)
        return results, sum(r.attained for r in results)


DEFAULT_SLO_SCALE = 5.0  # the middle of the paper's 2.5-7.5x


def alpaserve(
    models: Mapping[str, Sequence[ConfigEstimate]],
    trace_rates: Mapping[str, float],
    gpus: Sequence[GpuState],
    drop_models: bool,
    *,
    intent: Intent | None = None,
    slo_ms: Mapping[str, float] | None = None,
    bucket_ratio: float = 2.0,
) -> AlpaServePlan:
    """AlpaServe (``drop_models=True``) or AlpaServe* (``False``): one plan for all ``models`` made
    with their request rates over the whole trace known in advance (docs/simulator.md#alpaserve).

    ``trace_rates[m]`` is model ``m``'s mean request rate (requests/s) over the trace; ``slo_ms[m]``
    its latency SLO for a request of the intent's size (the paper: a multiple of its latency at
    minimum parallelism without quantization; default ``DEFAULT_SLO_SCALE`` times the latency of
    :func:`iserve.slo.reference_estimate`); ``intent`` sets that request size (use the
    trace's mean lengths; default 512 + 128 tokens). Every GPU in ``gpus`` is used (they are assumed
    free of other deployments; their free memory is respected). Returns the replicas per model as
    :class:`Decision` objects."""
    intent = intent if intent is not None else Intent(kind="min-latency", quality=ANY)
    validate_intent(intent)
    if slo_ms is None:
        slo_ms = {m: DEFAULT_SLO_SCALE * latency_ms(reference_estimate(e), intent) for m, e in models.items() if e}
    if not models:
        raise BadRequest("alpaserve needs at least one model")
    missing = [m for m in models if m not in slo_ms or not (slo_ms[m] > 0)]
    if missing:
        raise BadRequest(
            f"alpaserve needs a positive SLO in milliseconds for every model; missing for {', '.join(missing)}"
        )
    if not gpus:
        raise Infeasible("alpaserve: there are no GPUs to place the models on")
    if bucket_ratio < 1:
        raise BadRequest(f"bucket_ratio must be at least 1 (got {bucket_ratio!r})")
    search = _AlpaSearch(models, trace_rates, gpus, intent, slo_ms, drop_models, bucket_ratio)
    results, _ = search.run()
    attained = sum(
        search.attained([(m, gi, search.service_s(m, e)) for m, gi, e, _ in res.replicas], pure=True) for res in results
    )

    replicas: dict[str, list[Decision]] = {m: [] for m in models}
    groups: list[AlpaGroup] = []
    name = "alpaserve" if drop_models else "alpaserve*"
    for b, res in enumerate(results):
        base = len(groups)
        for grp in res.groups:
            grp.bucket = b
            groups.append(grp)
        count: dict[str, int] = {}
        for m, _, _, _ in res.replicas:
            count[m] = count.get(m, 0) + 1
        seen: dict[str, int] = {}
        for m, gi, est, assignments in res.replicas:
            seen[m] = seen.get(m, 0) + 1
            lat = latency_ms(est, intent)
            grp = groups[base + gi]
            why = (
                f"{name}: bucket {b + 1} of {len(results)} ({len(search.buckets[b].models)} model"
                f"{'s' if len(search.buckets[b].models) != 1 else ''}) in groups of {grp.tp * grp.pp} GPUs with "
                f"{est.config.key()}; replica {seen[m]} of {count[m]} on group {base + gi + 1} "
                f"({assignments[0].agent_id} GPUs {','.join(str(a.gpu_index) for a in assignments)}, layers "
                f"{layer_split(assignments, est.config.tp)}); {lat:.0f} ms for "
                f"{intent.prompt_tokens}+{intent.output_tokens} tokens"
            )
            replicas[m].append(
                Decision(
                    estimate=est,
                    assignments=assignments,
                    rejected=[],
                    why=why,
                    latency_ms=lat,
                    cost=cost(est, intent),
                    fitting=1,
                    agent_id=assignments[0].agent_id,
                    placement=f"{name} group {base + gi + 1}",
                )
            )
    dropped = [m for m in models if not replicas[m]]
    reasons = {}
    for m in dropped:
        if not search.plain[m]:
            reasons[m] = "the map lists no fp16 configuration of it"
        elif drop_models:
            reasons[m] = "no replica of it raised the estimated SLO attainment, or none fit the groups' free memory"
        else:
            reasons[m] = "it fits no group of the best plan's GPUs, even alone"
    total_rate = sum(search.rates.values())
    att = attained / total_rate if total_rate > 0 else 0.0
    why = (
        f"{name}: {len(results)} bucket{'s' if len(results) != 1 else ''}, {len(groups)} group"
        f"{'s' if len(groups) != 1 else ''}, {sum(len(v) for v in replicas.values())} replicas, estimated SLO "
        f"attainment {att:.1%} after scoring {search.evaluations} candidate placements"
        + (f"; dropped {', '.join(dropped)}" if dropped else "")
    )
    return AlpaServePlan(
        replicas=replicas,
        dropped=dropped,
        groups=groups,
        attainment=att,
        evaluations=search.evaluations,
        why=why,
        drop_reasons=reasons,
    )
