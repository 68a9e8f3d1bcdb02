"""The memory model's arithmetic (step II): how many layers a GPU holds, the uneven split of the
layers into pipeline stages, and the exact fit test of a configuration on a host's free memory.

A GPU of a pipeline stage holding ``n`` layers needs ``gpu_overhead_bytes + n * layer_bytes`` plus
``first_stage_bytes`` on the first stage (embedding) and ``last_stage_bytes`` on the last (final norm
and LM head); a single-stage deployment pays both. ``layer_bytes`` is one tensor-parallel rank's
share, so each of a stage's ``tp`` GPUs holds the same ``n`` layers and the stage is as strong as its
GPU with the least free memory. Units: bytes.

The estimate's ``layer_bytes`` holds the KV cache of one sequence of the profile's context. A
deployment that batches requests reserves a KV pool instead (:func:`kv_pool_tokens`); the tokens
beyond the profile's context grow every layer (:func:`with_kv_pool`), so each stage pays the pool's
share of the layers it holds, on each tensor-parallel rank.
"""

from __future__ import annotations

from typing import Callable, Sequence

import msgspec

from iserve.messages import ConfigEstimate, Configuration

KvBytes = Callable[[Configuration, int], int]
"""One layer's KV cache on one tensor-parallel rank of a configuration, for a number of tokens."""


def kv_pool_tokens(max_batch: int, kv_tokens: int, context_tokens: int) -> int:
    """The KV pool a deployment reserves, in tokens: ``kv_tokens`` when asked for, else room for
    ``max_batch`` requests of the whole context (never short)."""
    return kv_tokens if kv_tokens > 0 else max_batch * context_tokens


def with_kv_pool(est: ConfigEstimate, pool_tokens: int, counted_tokens: int, kv_bytes: KvBytes) -> ConfigEstimate:
    """``est`` with its KV cache grown from the ``counted_tokens`` its ``layer_bytes`` already hold
    (the profile's context) to a pool of ``pool_tokens``: every layer on every rank holds
    ``kv_bytes(config, pool_tokens - counted_tokens)`` more, and ``total_bytes`` grows by that times
    the layers and ``tp``. A pool no larger than what is counted returns ``est`` itself (a shorter
    context keeps the estimate's reservation, as it did before batching)."""
    extra_tokens = pool_tokens - counted_tokens
    if extra_tokens <= 0:
        return est
    extra = kv_bytes(est.config, extra_tokens)
    if extra <= 0:
        return est
    return msgspec.structs.replace(
        est,
        layer_bytes=est.layer_bytes + extra,
        total_bytes=est.total_bytes + est.config.tp * est.num_layers * extra,
    )


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


def layer_capacity(free: int, base: int, layer_bytes: int, num_layers: int) -> int:
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
    return layer_capacity(free_bytes, base, est.layer_bytes, est.num_layers)


def fits_sorted(frees: Sequence[int], est: ConfigEstimate) -> bool:
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
        return layer_capacity(frees[tp - 1], ov + fb + bb, lb, n) >= n
    if pp > n:
        return False
    total = 0
    # best and second-best (loss, index) for the first and the last role
    f1 = f2 = l1 = l2 = (1 << 62, -1)
    for j in range(pp):
        m = frees[j * tp + tp - 1]
        mid = layer_capacity(m, ov, lb, n)
        if mid < 1:
            return False
        total += mid
        a = layer_capacity(m, ov + fb, lb, n)
        if a >= 1:
            cand = (mid - a, j)
            if cand < f1:
                f1, f2 = cand, f1
            elif cand < f2:
                f2 = cand
        b = layer_capacity(m, ov + bb, lb, n)
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


def even_stage_needs(est: ConfigEstimate) -> list[int]:
    """Per-stage bytes of an even split (what each GPU of the stage needs), largest first: the
    distinct values of :func:`even_needs`, each standing for ``tp`` GPUs."""
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


def shortfall_bytes(stage_needs: list[int], frees: list[int], tp: int) -> int:
    """Bytes missing when the GPUs with ``frees`` (descending) take the stages' needs (descending),
    ``tp`` GPUs per stage, largest need on the freest GPUs."""
    short = 0
    j = 0
    for need in stage_needs:
        for free in frees[j : j + tp]:
            if need > free:
                short += need - free
        j += tp
    return short


def even_needs(est: ConfigEstimate) -> list[int]:
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
