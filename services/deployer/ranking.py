"""Step I of the deployment decision: the metrics of one request (latency, cost) and the order of a
model's configurations by the user's intent (minimise latency, cost, memory or GPU-hours; meet a
latency SLO or a cost budget). Units: milliseconds for latency, and for cost see :func:`cost`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from iserve.errors import BadRequest
from iserve.messages import COST_MODELS, INTENT_KINDS, ConfigEstimate, Intent, Rejection

from .units import GIB, num

COST_UNITS = {"mem-x-latency": "GiB-s", "memory": "GiB", "gpu-hours": "GPU-h"}


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


def gpu_hours(est: ConfigEstimate, lat_ms: float) -> float:
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
            raise BadRequest(
                f"intent {name} must be a positive number of tokens (got {value!r}); set it to "
                "the typical request size the latency should be computed for"
            )
    if not (math.isfinite(intent.rate) and intent.rate >= 0):
        raise BadRequest(f"intent rate must be the expected requests/s, 0 or more (got {intent.rate!r}); 0: no load")
    if not 50 <= intent.slo_percentile < 100:
        raise BadRequest(f"intent slo_percentile must be in [50, 100) (got {intent.slo_percentile!r}), e.g. 95 for p95")
    if not (math.isfinite(intent.output_cv2) and intent.output_cv2 >= 0):
        raise BadRequest(
            f"intent output_cv2 must be 0 or more (got {intent.output_cv2!r}): 0 for equal output lengths, "
            "1 for exponential ones"
        )
    if intent.kind == "latency-slo":
        slo = intent.slo_ms
        if slo is None or not math.isfinite(slo) or slo <= 0:
            raise BadRequest(
                f"intent latency-slo needs slo_ms, a positive latency target in milliseconds for "
                f"a {intent.prompt_tokens}+{intent.output_tokens}-token request (got {slo!r}), "
                "e.g. slo_ms=2000"
            )
    if intent.kind == "cost-budget":
        budget = intent.budget
        if budget is None or not math.isfinite(budget) or budget <= 0:
            unit = COST_UNITS[intent.cost_model]
            raise BadRequest(
                f"intent cost-budget needs budget, the most one request may cost in {unit} "
                f"(cost_model {intent.cost_model}), as a positive number (got {budget!r})"
            )


@dataclass(slots=True)
class Ranked:
    """A configuration with its step-I metrics for the intent's request size."""

    est: ConfigEstimate
    key: str
    latency_ms: float
    cost: float


def rank_with_metrics(estimates: Sequence[ConfigEstimate], intent: Intent) -> tuple[list[Ranked], list[Ranked]]:
    """Rank with the metrics kept alongside; returns (kept in rank order, filtered closest first)."""
    validate_intent(intent)
    p, o, cm = intent.prompt_tokens, intent.output_tokens, intent.cost_model
    items = []
    for est in estimates:
        lat = est.latency_ms(p, o)
        items.append(Ranked(est, est.config.key(), lat, _cost(est, lat, cm)))
    kind = intent.kind
    filtered: list[Ranked] = []
    if kind == "latency-slo":
        slo = intent.slo_ms
        assert slo is not None  # validate_intent requires it
        filtered = sorted((r for r in items if not r.latency_ms <= slo), key=lambda r: (r.latency_ms, r.key))
        items = [r for r in items if r.latency_ms <= slo]
    elif kind == "cost-budget":
        budget = intent.budget
        assert budget is not None  # validate_intent requires it
        filtered = sorted((r for r in items if not r.cost <= budget), key=lambda r: (r.cost, r.key))
        items = [r for r in items if r.cost <= budget]
    if kind == "min-latency" or kind == "cost-budget":  # the common keys inline; the same as order_key
        items.sort(key=lambda r: (r.latency_ms, r.cost, r.key))
    elif kind == "min-cost" or kind == "latency-slo":
        items.sort(key=lambda r: (r.cost, r.latency_ms, r.key))
    else:
        items.sort(key=lambda r: order_key(kind, r.est, r.latency_ms, r.cost, r.key))
    return items, filtered


def order_key(kind: str, est: ConfigEstimate, lat_ms: float, cost_: float, key: str) -> tuple:
    """The sort key of step I: smaller is better for the intent ``kind`` (:func:`rank_with_metrics` inlines the
    first and last case)."""
    if kind == "min-latency" or kind == "cost-budget":
        return (lat_ms, cost_, key)
    if kind == "min-memory":
        return (est.total_bytes, lat_ms, key)
    if kind == "min-gpu-hours":
        return (gpu_hours(est, lat_ms), lat_ms, key)
    return (cost_, lat_ms, key)  # min-cost, latency-slo


def filter_reason(r: Ranked, intent: Intent) -> str:
    if intent.kind == "latency-slo":
        return (
            f"estimated latency {r.latency_ms:.0f} ms for {intent.prompt_tokens}+{intent.output_tokens} "
            f"tokens exceeds the SLO of {intent.slo_ms:.0f} ms"
        )
    unit = COST_UNITS[intent.cost_model]
    return f"estimated cost {num(r.cost)} {unit} per request exceeds the budget of {num(intent.budget)} {unit}"


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
    kept, filtered = rank_with_metrics(estimates, intent)
    return [r.est for r in kept], [Rejection(config=r.key, reason=filter_reason(r, intent)) for r in filtered]
