"""The paper's baselines (section 8) as deployment policies, pure like the planner: no I/O, no clock.
Each takes what :func:`iserve.deployer.planner.plan` takes and returns its ``Decision``s, so the
simulator can swap systems; each baseline's definition is in docs/simulator.md#baselines (AlpaServe,
a whole-cluster plan, is :mod:`.alpaserve`)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import msgspec

from iserve.deployer.feasibility import ClusterView
from iserve.deployer.placement import GpuState, check_policy
from iserve.deployer.planner import Decision, plan
from iserve.deployer.ranking import cost, latency_ms, validate_intent
from iserve.errors import BadRequest, Infeasible
from iserve.fingerprint.estimator.batching import layer_kv_bytes
from iserve.messages import ConfigEstimate, GpuAssignment, Intent, Rejection

SYSTEMS = ("iserve", "max-tp", "max-pp", "accelerate", "alpaserve", "alpaserve*")

# A PCIe 4.0 x16 link, the paper testbed's path between GPUs that do not share an NVLink bridge.
DEFAULT_ALLGATHER_BYTES_PER_S = 25e9


def is_plain(est: ConfigEstimate) -> bool:
    """fp16 weights, fp16 KV cache, no pruning: what every baseline but iServe deploys."""
    c = est.config
    return c.weight_quant == "fp16" and c.kv_quant == "fp16" and c.pruning == "none"


def _load_unaware(gpus: Sequence[GpuState]) -> list[GpuState]:
    """The static baselines see free memory, not load: every GPU looks idle to them."""
    return [replace(g, load=0.0) for g in gpus]


def layer_split(d_assignments: list[GpuAssignment], tp: int) -> str:
    """The layers per pipeline stage, e.g. ``"40/40"``."""
    return "/".join(str(a.num_layers) for a in d_assignments[::tp])


def _decide(
    ordered: Sequence[ConfigEstimate], intent: Intent, gpus: Sequence[GpuState], *, rule: str, policy: str, theta: float
) -> Decision:
    """Take the first of ``ordered`` (the baseline's preference order) that fits the free GPUs and
    place it with ``policy`` on load-unaware GPU states; the better-preferred ones that did not fit
    become rejections. Raises :class:`Infeasible` when none fits."""
    validate_intent(intent)
    check_policy(policy, theta)
    view = ClusterView(_load_unaware(gpus))
    if not ordered:
        raise Infeasible(
            f"{rule}: the configuration map lists no configuration this baseline deploys "
            "(fp16 weights and KV cache, no pruning); profile the model without compression too"
        )
    misses: list[ConfigEstimate] = []
    for est in ordered:
        if not view.fits(est):
            misses.append(est)
            continue
        placed = view.place(est, policy, theta)
        if placed is None:  # fits() said yes, so this cannot happen; keep the error explicit
            raise Infeasible(f"{rule}: {est.config.key()} fits the free GPUs but could not be placed")
        fitting = 1 + sum(view.fits(e) for e in ordered[len(misses) + 1 :])
        lat = latency_ms(est, intent)
        gpus_txt = ",".join(str(a.gpu_index) for a in placed.assignments)
        why = (
            f"{rule}: {est.config.key()} ({lat:.0f} ms for {intent.prompt_tokens}+{intent.output_tokens} tokens)"
            + (f"; {len(misses)} preferred one{'s' if len(misses) != 1 else ''} did not fit" if misses else "")
            + f"; {placed.note}: {placed.agent_id} GPUs {gpus_txt}, "
            + f"layers {layer_split(placed.assignments, est.config.tp)}"
        )
        return Decision(
            estimate=est,
            assignments=placed.assignments,
            rejected=[Rejection(config=m.config.key(), reason=view.miss_reason(m)) for m in misses],
            why=why,
            latency_ms=lat,
            cost=cost(est, intent),
            fitting=fitting,
            agent_id=placed.agent_id,
            placement=placed.note,
        )
    near = misses[0]
    raise Infeasible(
        f"{rule}: none of the {len(misses)} configurations it would deploy fits the free GPUs; "
        f"the first, {near.config.key()}, {view.miss_reason(near)}"
    )


# ---------------------------------------------------------------------------------------------------
# per-model baselines


def iserve(
    estimates: Sequence[ConfigEstimate],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    policy: str = "hybrid",
    theta: float = 0.5,
) -> Decision:
    """iServe's own decision: :func:`planner.plan` (rank by intent, first feasible, load-aware)."""
    return plan(estimates, intent, gpus, policy=policy, theta=theta)


def max_tp(
    estimates: Sequence[ConfigEstimate],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    policy: str = "least-loaded",
    theta: float = 0.5,
) -> Decision:
    """TensorRT-LLM_TP: the largest TP degree that fits, PP = 1 unless it must grow, fp16."""
    ordered = sorted((e for e in estimates if is_plain(e)), key=lambda e: (-e.config.tp, e.config.pp, e.config.key()))
    return _decide(ordered, intent, gpus, rule="max-tp (largest tensor parallelism, fp16)", policy=policy, theta=theta)


def max_pp(
    estimates: Sequence[ConfigEstimate],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    policy: str = "least-loaded",
    theta: float = 0.5,
) -> Decision:
    """TensorRT-LLM_PP (the transformers default): TP = 1, PP = min(GPUs, layers), fp16; the largest
    PP that fits when the free memory cannot take that many stages."""
    ordered = sorted(
        (e for e in estimates if is_plain(e) and e.config.tp == 1), key=lambda e: (-e.config.pp, e.config.key())
    )
    return _decide(
        ordered, intent, gpus, rule="max-pp (largest pipeline parallelism, fp16)", policy=policy, theta=theta
    )


def weight_bytes(estimates: Sequence[ConfigEstimate], est: ConfigEstimate) -> tuple[int, int]:
    """The weight bytes of one tensor-parallel rank of ``est`` (whole model, all stages) and of one
    layer, derived from the map.

    ``layer_bytes`` holds a layer's weights, its KV cache and a small activation term. When the map
    also lists the same configuration with an int8 KV cache, the difference is exactly half the fp16
    KV cache (the estimator halves the KV bytes and nothing else), so the KV cache is removed; the
    activation term (a few MiB per layer) stays in. Without that sibling, ``layer_bytes`` is used
    whole (an upper bound)."""
    layer = est.layer_bytes
    kv = layer_kv_bytes(estimates, est) if est.config.kv_quant == "fp16" else None
    if kv is not None:
        layer -= kv
    return est.num_layers * layer + est.first_stage_bytes + est.last_stage_bytes, layer


def fsdp_estimate(
    shard: ConfigEstimate, unsharded: ConfigEstimate, weights: int, layer_weights: int, allgather_bytes_per_s: float
) -> ConfigEstimate:
    """Accelerate's FSDP over ``shard.config.pp`` GPUs: the memory of ``shard`` (layer sharding) plus
    one gathered layer per GPU, the latency of ``unsharded`` plus the all-gather of every weight on
    every forward pass (docs/simulator.md#accelerate)."""
    g = shard.config.pp
    gather_ms = (g - 1) / g * weights / allgather_bytes_per_s * 1000.0 if g > 1 else 0.0
    overhead = shard.gpu_overhead_bytes + (layer_weights if g > 1 else 0)
    c = shard.config
    total = c.tp * (
        c.pp * overhead + shard.num_layers * shard.layer_bytes + shard.first_stage_bytes + shard.last_stage_bytes
    )
    return msgspec.structs.replace(
        shard,
        ttft_base_ms=unsharded.ttft_base_ms + gather_ms,
        ttft_per_token_ms=unsharded.ttft_per_token_ms,
        ttft_per_token2_ms=unsharded.ttft_per_token2_ms,
        tpot_ms=unsharded.tpot_ms + gather_ms,
        gpu_overhead_bytes=overhead,
        total_bytes=total,
        method="accelerate-fsdp",
    )


def accelerate(
    estimates: Sequence[ConfigEstimate],
    intent: Intent,
    gpus: Sequence[GpuState],
    *,
    allgather_bytes_per_s: float = DEFAULT_ALLGATHER_BYTES_PER_S,
    policy: str = "least-loaded",
    theta: float = 0.5,
) -> Decision:
    """Accelerate (FSDP): every model sharded over all GPUs of a host, with the all-gather penalty.
    The decision's estimate is the FSDP estimate (:func:`fsdp_estimate`), whose latency is what a
    simulator should serve requests with."""
    if not (allgather_bytes_per_s > 0 and math.isfinite(allgather_bytes_per_s)):
        raise BadRequest(
            f"allgather_bytes_per_s must be a positive bandwidth in bytes per second (got {allgather_bytes_per_s!r})"
        )
    by_pp = {e.config.pp: e for e in estimates if is_plain(e) and e.config.tp == 1}
    if not by_pp:
        return _decide([], intent, gpus, rule="accelerate (FSDP over all GPUs)", policy=policy, theta=theta)
    unsharded = by_pp.get(1) or by_pp[min(by_pp)]
    weights, layer_w = weight_bytes(estimates, unsharded)
    ordered = [
        fsdp_estimate(by_pp[g], unsharded, weights, layer_w, allgather_bytes_per_s) for g in sorted(by_pp, reverse=True)
    ]
    rule = f"accelerate (FSDP over all GPUs, all-gather at {allgather_bytes_per_s / 1e9:g} GB/s)"
    return _decide(ordered, intent, gpus, rule=rule, policy=policy, theta=theta)
