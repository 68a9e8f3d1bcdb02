"""The systems the trace simulator compares, each as a deployment policy over the deployer's own pure
decision functions (:mod:`iserve.deployer.planner`, :mod:`.baselines`).

A system answers one question, when a model's deployment is requested: which deployments (zero, one,
or several data-parallel replicas) to make now, given the model's configuration map, the intent and
the GPUs as the deployer sees them (free memory, busy fraction over the 120 s window). It returns
:class:`~iserve.deployer.planner.Decision` objects or raises :class:`~iserve.errors.Infeasible`.

=============== ====================================================================================
``iserve``      :func:`planner.plan` (rank by intent, first feasible, hybrid load-aware placement; at
                an intent's load, the replicas it needs: :mod:`iserve.deployer.loadplan`)
``max-tp``      TensorRT-LLM_TP: :func:`baselines.max_tp`
``max-pp``      TensorRT-LLM_PP: :func:`baselines.max_pp`
``accelerate``  Accelerate / FSDP: :func:`baselines.accelerate`
``alpaserve``   AlpaServe, one plan for every model made with the whole trace known, may drop models:
                :func:`alpaserve.alpaserve` (``prepare`` is given the trace's per-model rates)
``alpaserve*``  the same, never dropping a model
``static``      a fixed configuration per model, placed by iServe's planner (what the oracle search
                evaluates); a model without a fixed configuration gets iServe's decision
=============== ====================================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from iserve import quality
from iserve.deployer import planner, ranking
from iserve.deployer.loadplan import LoadSpec, load_of
from iserve.deployer.memory import kv_pool_tokens
from iserve.deployer.placement import GpuState
from iserve.deployer.planner import Decision
from iserve.errors import Infeasible
from iserve.fingerprint.estimator.batching import step_models
from iserve.messages import ConfigEstimate, Configuration, ConfigurationMap, Intent

from . import alpaserve, baselines

SYSTEMS = ("iserve", "max-tp", "max-pp", "accelerate", "alpaserve", "alpaserve*")
ALL_SYSTEMS = SYSTEMS + ("oracle",)


@dataclass
class Workload:
    """What a system that is given the trace in advance (AlpaServe) may know: every model's map, its
    mean request rate over the whole trace and its SLO for a request of the trace's mean size."""

    maps: Mapping[str, ConfigurationMap]
    rates: Mapping[str, float]
    slo_ms: Mapping[str, float]
    intent: Intent  # the trace's mean request size
    gpus: Sequence[GpuState]  # the empty cluster


@dataclass
class System:
    """One system under test. ``decide`` is called at every deployment request."""

    name: str
    policy: str = "hybrid"
    theta: float = 0.5
    allgather_bytes_per_s: float = baselines.DEFAULT_ALLGATHER_BYTES_PER_S
    forced: Mapping[str, Configuration] = field(default_factory=dict)
    # iServe at an intent's load (``Intent.rate``): each model's map as profiled (its step models) and
    # the replicas' batch size, as the deployer's ``plan_gpu_types`` has them
    raw_maps: Mapping[str, ConfigurationMap] = field(default_factory=dict)
    max_batch: int = 1
    plan_note: str = ""
    _alpa: alpaserve.AlpaServePlan | None = None

    @property
    def needs_workload(self) -> bool:
        return self.name in ("alpaserve", "alpaserve*")

    def prepare(self, workload: Workload) -> None:
        """Give the system the workload before the run; only AlpaServe uses it (its plan is made here)."""
        if not self.needs_workload:
            return
        self._alpa = alpaserve.alpaserve(
            {m: cmap.estimates for m, cmap in workload.maps.items()},
            workload.rates,
            workload.gpus,
            drop_models=self.name == "alpaserve",
            intent=workload.intent,
            slo_ms=workload.slo_ms,
        )
        self.plan_note = self._alpa.why

    def decide(self, model: str, cmap: ConfigurationMap, intent: Intent, gpus: list[GpuState]) -> list[Decision]:
        """The deployments to make for ``model`` now (several for DP replicas, none never: a model the
        system will not deploy raises :class:`Infeasible` with the reason)."""
        ests = cmap.estimates
        name = self.name
        if name == "iserve":  # the intent's quality policy first; unset, the paper's free search (docs/quality.md)
            policy = quality.ANY if intent.quality.mode == "default" else intent.quality
            admitted, _ = quality.admit(ests, cmap.quality, policy)
            load = self._load(model, cmap, intent)
            d = planner.plan(admitted, intent, gpus, policy=self.policy, theta=self.theta, load=load)
            return [dataclasses.replace(d, assignments=a) for a in d.replicas] if d.replicas else [d]
        if name == "max-tp":
            return [baselines.max_tp(ests, intent, gpus)]
        if name == "max-pp":
            return [baselines.max_pp(ests, intent, gpus)]
        if name == "accelerate":
            return [baselines.accelerate(ests, intent, gpus, allgather_bytes_per_s=self.allgather_bytes_per_s)]
        if name in ("alpaserve", "alpaserve*"):
            if self._alpa is None:
                raise RuntimeError(f"{name} must be prepared with the workload before the run")
            reps = self._alpa.replicas.get(model, [])
            if not reps:
                reason = self._alpa.drop_reasons.get(model, "it is not part of the plan")
                raise Infeasible(f"{name} dropped {model}: {reason}")
            return list(reps)
        if name in ("static", "oracle"):
            cfg = self.forced.get(model)
            if cfg is None:
                return [planner.plan(ests, intent, gpus, policy=self.policy, theta=self.theta)]
            chosen = [e for e in ests if e.config == cfg]
            if not chosen:
                raise Infeasible(f"{model} has no estimate for the fixed configuration {cfg.key()}")
            return [planner.plan(chosen, _unbounded(intent), gpus, policy=self.policy, theta=self.theta)]
        raise ValueError(f"unknown system {name!r}; choose one of {', '.join(ALL_SYSTEMS + ('static',))}")

    def _load(self, model: str, cmap: ConfigurationMap, intent: Intent) -> LoadSpec | None:
        """The load the intent states, with what sizing replicas needs (None: no load stated)."""
        load = load_of(intent)
        if load is None:
            return None
        raw = self.raw_maps.get(model, cmap)
        steps = step_models(raw.estimates, raw.context_tokens)
        pool = kv_pool_tokens(self.max_batch, 0, cmap.context_tokens)
        return LoadSpec(load, steps, self.max_batch, pool, intent.slo_percentile)


def _unbounded(intent: Intent) -> Intent:
    """A fixed configuration is deployed whatever the intent's SLO or budget says (the oracle has
    already judged it on the whole trace), so those limits are lifted for the plan."""
    if intent.kind in ("latency-slo", "cost-budget"):
        return Intent(
            kind="min-latency",
            cost_model=intent.cost_model,
            prompt_tokens=intent.prompt_tokens,
            output_tokens=intent.output_tokens,
            quality=intent.quality,
        )
    return intent


def make_system(
    name: str,
    *,
    policy: str = "hybrid",
    theta: float = 0.5,
    allgather_bytes_per_s: float = baselines.DEFAULT_ALLGATHER_BYTES_PER_S,
    forced: Mapping[str, Configuration] | None = None,
) -> System:
    """A :class:`System` by name (see the module docstring)."""
    if name not in ALL_SYSTEMS and name != "static":
        raise ValueError(f"unknown system {name!r}; choose one of {', '.join(ALL_SYSTEMS)}")
    return System(
        name=name, policy=policy, theta=theta, allgather_bytes_per_s=allgather_bytes_per_s, forced=dict(forced or {})
    )


def oracle_candidates(estimates: Sequence[ConfigEstimate], intent: Intent, k: int) -> list[Configuration]:
    """The configurations the oracle tries for one model: the ``k`` best by the intent's ranking with
    distinct (GPU count, estimated latency) (so PP variants of equal latency do not crowd out other
    choices), plus the best-ranked configuration of every GPU count (placement and contention differ
    with the number of GPUs). In rank order."""
    ranked, _ = ranking.rank(list(estimates), _unbounded(intent))
    out: list[Configuration] = []
    seen: set[tuple[int, float]] = set()
    per_count: dict[int, Configuration] = {}
    for e in ranked:
        per_count.setdefault(e.config.gpus, e.config)
        sig = (e.config.gpus, round(ranking.latency_ms(e, intent), 3))
        if sig in seen or len(out) >= k:
            continue
        seen.add(sig)
        out.append(e.config)
    for cfg in per_count.values():
        if cfg not in out:
            out.append(cfg)
    order = {e.config: i for i, e in enumerate(ranked)}
    return sorted(out, key=lambda c: order[c])
