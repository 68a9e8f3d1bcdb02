"""Step II of the deployment decision: the free GPUs of one type as a :class:`ClusterView` that
answers whether a configuration fits some host (exact, policy-free), why not when it does not, and
hands a fitting one to the placement policy.

Feasibility does not depend on the placement policy (every policy may end on all GPUs: hybrid falls
back to least-loaded over the whole cluster), so fit is checked with precomputed per-host bounds and
a policy runs only once, for the chosen configuration.
"""

from __future__ import annotations

import math
from typing import Sequence

from iserve.errors import BadRequest
from iserve.messages import ConfigEstimate

from .memory import even_stage_needs, fits_sorted, shortfall_bytes
from .placement import GpuState, Placement, choose_gpus
from .ranking import Ranked
from .units import gib, gib_list


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
        self._best_cache: dict[int, tuple[str, list[int], str]] = {}

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
            if pp == 1 or frees[k - 1] >= ample or fits_sorted(frees, est):
                return True
        return False

    # -- explaining a miss ---------------------------------------------------------------------------

    def best_host(self, k: int) -> tuple[str, list[int], str]:
        """The host with the most free bytes on its ``k`` freest GPUs, those bytes, and a phrase."""
        got = self._best_cache.get(k)
        if got is None:
            agent, top = "", -1
            for a in self.agents:  # sorted, so ties go to the first host id
                total = sum(self.free_desc[a][:k])
                if total > top:
                    agent, top = a, total
            frees = self.free_desc[agent][:k]
            if k == 1:
                phrase = f"the best host, {agent}, has {gib(frees[0])} GiB free on its freest GPU"
            elif k <= 4:
                phrase = f"the best host, {agent}, has {gib_list(frees)} GiB free"
            else:
                phrase = (
                    f"the best host, {agent}, has {gib(sum(frees))} GiB free on its {k} freest GPUs "
                    f"(the smallest {gib(frees[-1])} GiB)"
                )
            got = self._best_cache[k] = (agent, frees, phrase)
        return got

    def shortfall(self, est: ConfigEstimate) -> float:
        """Bytes to free on the best host so that an even split fits (inf when no host is big enough)."""
        c = est.config
        k = c.tp * c.pp
        if k > self.max_gpus or c.pp > est.num_layers or k < 1:
            return math.inf
        _, frees, _ = self.best_host(k)
        return float(shortfall_bytes(even_stage_needs(est), frees, c.tp))

    def closest(self, ranked: list[Ranked]) -> tuple[Ranked, float]:
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
                need = c.tp * (
                    c.pp * r.est.gpu_overhead_bytes
                    + r.est.num_layers * r.est.layer_bytes
                    + r.est.first_stage_bytes
                    + r.est.last_stage_bytes
                )
                bound = max(0, need - sum(self.best_host(k)[1]))
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
            return (
                f"needs {k} GPUs on one host (tp={c.tp} x pp={c.pp}), and no host has more than "
                f"{self.max_gpus} GPUs of this type"
            )
        needs = even_stage_needs(est)
        lo, hi = gib(needs[-1]), gib(needs[0])
        _, frees, phrase = self.best_host(k)
        short = shortfall_bytes(needs, frees, c.tp)
        tail = f" ({gib(short)} GiB short)" if short > 0 else " (not in stages its GPUs can hold)"
        if k == 1:
            return f"needs 1 GPU with {hi} GiB free; {phrase}{tail}"
        each = f"{hi} GiB" if lo == hi else f"{lo} to {hi} GiB"
        return f"needs {k} GPUs on one host with {each} free each ({gib(c.tp * sum(needs))} GiB in all); {phrase}{tail}"

    # -- placement -----------------------------------------------------------------------------------

    def place(self, est: ConfigEstimate, policy: str, theta: float) -> Placement | None:
        """Paper step III: the policy's GPUs for ``est`` (see :func:`choose_gpus`); ``None`` when it
        does not fit."""
        if not self.fits(est):
            return None
        return choose_gpus(self.gpus, est, policy, theta)
