"""The time of one continuous-batching step, from a configuration's estimate (pure; see
docs/estimator.md#batched-steps).

Where the estimate carries batched steps measured on its fingerprints (``ConfigEstimate.batch_sizes``),
a decode step of ``b`` sequences at mean position ``x`` is that line at ``x``, interpolated linearly
between the measured batch sizes and extended along the last two beyond them. Otherwise (older maps,
derived TP variants) the roofline model below applies.

A step decodes ``b`` sequences holding ``K`` KV tokens in total and prefills some prompt chunks.
Memory roofline: a decode step reads the weights once and every sequence's KV cache, so it costs the
batch-1 step at the mean position ``K / b`` scaled by ``(W + kv * K) / (W + kv * K / b)``, with ``W``
the weight bytes and ``kv`` the KV bytes per token of one rank. A prompt chunk adds what TTFT grows by
over its positions; a step of prompt chunks alone also pays TTFT's fixed part. Assumptions: decode is
memory-bound and its per-sequence compute is negligible, the host bound does not grow with the batch,
pipeline stages take turns. ``b = 1`` and no chunk give exactly ``ConfigEstimate.step_ms(K)``.
Not yet checked against ``bench/bench_batching.py`` on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from iserve.messages import ConfigEstimate, Configuration


def layer_kv_bytes(estimates: Sequence[ConfigEstimate], est: ConfigEstimate) -> int | None:
    """The KV-cache bytes in ``est.layer_bytes`` (one layer, one rank, the map's context), read from the
    map: the same configuration with the other KV format differs only by its KV cache, and int8 holds
    about half of fp16's bytes. None without that sibling, or when the difference is implausible."""
    c = est.config
    other = "int8" if c.kv_quant == "fp16" else "fp16"
    for e in estimates:
        o = e.config
        if (o.tp, o.pp, o.weight_quant, o.pruning, o.kv_quant) == (c.tp, c.pp, c.weight_quant, c.pruning, other):
            half = est.layer_bytes - e.layer_bytes if other == "int8" else e.layer_bytes - est.layer_bytes
            kv = 2 * half if c.kv_quant == "fp16" else half
            return kv if 0 <= kv < est.layer_bytes else None
    return None


def map_kv_bytes(estimates: Sequence[ConfigEstimate], context_tokens: int) -> Callable[[Configuration, int], int]:
    """One layer's KV cache on one rank of a configuration of the map, for a number of tokens: what
    :func:`layer_kv_bytes` reads for ``context_tokens``, pro rata; the whole ``layer_bytes`` (an upper
    bound) where it reads nothing. For pricing a KV pool when the architecture is not at hand."""
    by_config = {e.config: e for e in estimates}

    def kv_bytes(config: Configuration, tokens: int) -> int:
        est = by_config[config]
        kv = layer_kv_bytes(estimates, est)
        per_context = est.layer_bytes if kv is None else kv
        return -(-per_context * tokens // max(1, context_tokens))

    return kv_bytes


@dataclass(frozen=True)
class StepModel:
    """One replica's step time. ``kv_share`` is the KV bytes of one token over the weight bytes (one rank)."""

    est: ConfigEstimate
    kv_share: float = 0.0

    def decode_ms(self, seqs: int, kv_tokens: int) -> float:
        """A step feeding one token to each of ``seqs`` sequences that hold ``kv_tokens`` positions in all."""
        if seqs <= 0:
            return 0.0
        e = self.est
        mean = kv_tokens / seqs
        if e.batch_sizes:
            return measured_step_ms(e, seqs, mean)
        device = e.tpot_ms + e.tpot_per_position_ms * mean
        if seqs > 1:
            device *= (1.0 + self.kv_share * kv_tokens) / (1.0 + self.kv_share * mean)
        if len(e.tpot_host_ms) != 2:
            return device
        return max(device, e.tpot_host_ms[0] + e.tpot_host_ms[1] * mean)

    def chunk_ms(self, start: int, tokens: int) -> float:
        """What a prompt chunk of positions ``[start, start + tokens)`` adds to a step."""
        return self.est.ttft_ms(start + tokens) - self.est.ttft_ms(start)

    def step_ms(self, seqs: int, kv_tokens: int, chunks: Sequence[tuple[int, int]] = ()) -> float:
        """One step: ``seqs`` decodes over ``kv_tokens`` positions, then prompt chunks ``(start, tokens)``.
        A whole prompt alone costs exactly its TTFT."""
        if seqs == 0 and len(chunks) == 1 and chunks[0][0] == 0:
            return self.est.ttft_ms(chunks[0][1])
        base = self.decode_ms(seqs, kv_tokens) if seqs else self.est.ttft_ms(0)
        return base + sum(self.chunk_ms(s, n) for s, n in chunks)


def measured_step_ms(est: ConfigEstimate, seqs: int, position: float) -> float:
    """The measured batched step of ``seqs`` sequences at mean ``position``: linear in the batch
    between the measured sizes, along the last two beyond them, the first size's below it; never
    below the smallest measured step."""
    sizes = est.batch_sizes
    at = [a + s * position for a, s in zip(est.batch_step_ms, est.batch_step_per_position_ms)]
    if len(sizes) == 1 or seqs <= sizes[0]:
        return at[0]
    i = next((k for k in range(1, len(sizes)) if seqs <= sizes[k]), len(sizes) - 1)
    b0, b1 = sizes[i - 1], sizes[i]
    t = at[i - 1] + (at[i] - at[i - 1]) * (seqs - b0) / (b1 - b0)
    return max(t, min(at))


def step_model(estimates: Sequence[ConfigEstimate], est: ConfigEstimate, context_tokens: int) -> StepModel:
    """``est``'s step model, its KV share read from the map (``estimates``, whose ``layer_bytes`` hold
    ``context_tokens`` of KV). The share is never below the fit's own slope over its intercept (the
    decode line's KV part), which keeps a step non-decreasing in the batch at a fixed ``K``; without
    an int8/fp16 sibling it is that slope alone (0 for a flat line: KV reads then cost nothing extra)."""
    base = next((e for e in estimates if e.config == est.config), est)
    slope = est.tpot_per_position_ms / est.tpot_ms if est.tpot_ms > 0 else 0.0
    kv = layer_kv_bytes(estimates, base)
    if kv is None or context_tokens <= 0:
        return StepModel(est, slope)
    weights = base.num_layers * (base.layer_bytes - kv) + base.first_stage_bytes + base.last_stage_bytes
    per_token = base.num_layers * kv / context_tokens
    return StepModel(est, max(per_token / weights if weights > 0 else 0.0, slope))


def step_models(estimates: Sequence[ConfigEstimate], context_tokens: int) -> Callable[[Configuration], StepModel]:
    """:func:`step_model` of any configuration of a map, made on first use (each reads only its KV
    sibling, so sizing a few configurations of a large map stays cheap)."""
    by_config = {e.config: e for e in estimates}
    made: dict[Configuration, StepModel] = {}

    def get(c: Configuration) -> StepModel:
        m = made.get(c)
        if m is None:
            e = by_config[c]
            other = by_config.get(msgspec.structs.replace(c, kv_quant="int8" if c.kv_quant == "fp16" else "fp16"))
            m = made[c] = step_model([e] if other is None else [e, other], e, context_tokens)
        return m

    return get
