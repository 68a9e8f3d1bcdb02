"""Step III of the deployment decision: choose a host's GPUs for a configuration with a load-aware
policy (``least-loaded``, ``packing`` or ``hybrid`` with threshold ``theta``), order them into
pipeline stages and split the layers. Nothing here does I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from iserve.errors import BadRequest, InternalError
from iserve.messages import PLACEMENT_POLICIES, ConfigEstimate, GpuAssignment

from .memory import fits_sorted, layer_capacity, split_layers

POLICIES = PLACEMENT_POLICIES


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


@dataclass(slots=True)
class Placement:
    """The GPUs a policy chose for one configuration (stage by stage), their host, and how it chose."""

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


def policy_order(gpus: Sequence[GpuState], policy: str, theta: float | None) -> list[GpuState]:
    """All GPUs in the policy's order; with ``theta`` only the packable ones (load < theta)."""
    pool = gpus if theta is None else [g for g in gpus if g.load < theta]
    return sorted(pool, key=_policy_key(policy))


def _deepest(order: list[GpuState], k: int, fixed: list[int], hi: int, est: ConfigEstimate) -> int:
    """Smallest prefix length ``q <= hi`` of ``order`` whose ``k`` freest GPUs, with the ``fixed``
    free bytes, fit the configuration; -1 when none. Feasibility only grows with free memory, so
    the freest GPUs of a prefix are its best completion."""
    frees = [g.free_bytes for g in order]
    for q in range(k, hi + 1):
        cand = sorted(frees[:q], reverse=True)[:k] + fixed
        cand.sort(reverse=True)
        if fits_sorted(cand, est):
            return q
    return -1


def _select(order: list[GpuState], est: ConfigEstimate) -> list[GpuState]:
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
        q = _deepest(order, r, fixed, hi, est)
        if q < 0:
            raise InternalError(f"placement lost a fitting subset for {est.config.key()}")
        picked.append(q - 1)
        fixed.append(order[q - 1].free_bytes)
        hi = q - 1
    return [order[i] for i in sorted(picked)]


def _place_in(order: list[GpuState], est: ConfigEstimate) -> tuple[str, list[GpuState]] | None:
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
        if not fits_sorted(sorted((g.free_bytes for g in gs), reverse=True), est):
            continue
        q = _deepest(gs, k, [], len(gs), est)
        depth = position[id(gs[q - 1])]
        if best is None or depth < best[0]:
            best = (depth, agent)
    if best is None:
        return None
    agent = best[1]
    return agent, _select(per_agent[agent], est)


def choose_gpus(gpus: Sequence[GpuState], est: ConfigEstimate, policy: str, theta: float) -> Placement:
    """Paper step III for a configuration known to fit ``gpus``: choose the GPUs with the policy,
    order them into stages, split the layers.

    * ``least-loaded``: the least busy GPUs with enough memory (spreads deployments);
    * ``packing``: the busiest GPUs with enough memory (fewer GPUs in use);
    * ``hybrid``: GPUs with load < ``theta`` are packable: first the packing policy over them
      only; if they cannot hold the model, least-loaded over all GPUs.
    """
    if policy == "hybrid":
        got = _place_in(policy_order(gpus, "packing", theta), est)
        note = f"hybrid packed it onto GPUs with load < {theta:g}"
        if got is None:
            got = _place_in(policy_order(gpus, "least-loaded", None), est)
            note = f"hybrid found too little memory on GPUs with load < {theta:g} and spread it least-loaded"
    else:
        got = _place_in(policy_order(gpus, policy, None), est)
        note = f"{policy} placement"
    if got is None:
        raise InternalError(f"placement found no GPUs for {est.config.key()}, which fits")
    agent, chosen = got
    assignments = arrange(est, chosen)
    if assignments is None:
        raise InternalError(f"the layer split failed on GPUs chosen for {est.config.key()}")
    return Placement(assignments, agent, note)


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
    groups = [sorted(by_free[s * tp : (s + 1) * tp], key=lambda g: rank_of[id(g)]) for s in range(pp)]
    groups.sort(key=lambda grp: rank_of[id(grp[0])])
    weakest = [min(g.free_bytes for g in grp) for grp in groups]
    ov, lb, fb, bb = est.gpu_overhead_bytes, est.layer_bytes, est.first_stage_bytes, est.last_stage_bytes

    split = None
    sequence: list[int] = [0]
    if pp == 1:
        split = split_layers(n, [layer_capacity(weakest[0], ov + fb + bb, lb, n)])
    else:
        mid = [layer_capacity(m, ov, lb, n) for m in weakest]
        pairs = [(0, pp - 1)] + [(f, last) for f in range(pp) for last in range(pp) if f != last]
        for f, last in pairs:
            sequence = [f] + [s for s in range(pp) if s != f and s != last] + [last]
            caps = (
                [layer_capacity(weakest[f], ov + fb, lb, n)]
                + [mid[s] for s in sequence[1:-1]]
                + [layer_capacity(weakest[last], ov + bb, lb, n)]
            )
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
            out.append(
                GpuAssignment(
                    agent_id=g.agent_id, gpu_index=g.gpu_index, first_layer=start, num_layers=nl, memory_bytes=mem
                )
            )
        start += nl
    return out
