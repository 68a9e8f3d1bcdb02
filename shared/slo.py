"""Latency SLOs as the paper sets them (section 8.3, following Proteus): "we observe each LLM's
latency under minimum parallelism without quantization and set SLOs as multiples of this latency
(2.5-7.5x)". Pure functions over a model's configuration map, shared by the live replay and the
simulator.
"""

from __future__ import annotations

from collections.abc import Sequence

from iserve.messages import ConfigEstimate


def reference_estimate(estimates: Sequence[ConfigEstimate]) -> ConfigEstimate:
    """The configuration an SLO is a multiple of: the fewest GPUs (``tp * pp``) with fp16 weights,
    fp16 KV cache and no pruning; ties go to the lowest ``tp`` then ``pp`` (``tp1-pp1`` whenever it
    exists). When the map has no such
    uncompressed configuration (e.g. fp16 does not fit one GPU type and was excluded), the fewest-GPU
    configuration of any kind is used, so an SLO can always be set."""
    if not estimates:
        raise ValueError("the configuration map has no estimates")
    plain = [
        e
        for e in estimates
        if e.config.weight_quant == "fp16" and e.config.kv_quant == "fp16" and e.config.pruning == "none"
    ]
    pool = plain or list(estimates)
    return min(pool, key=lambda e: (e.config.gpus, e.config.tp, e.config.pp, e.config.key()))


def slo_ms(estimate: ConfigEstimate, prompt_tokens: int, output_tokens: int, scale: float) -> float:
    """``scale`` times the estimated end-to-end latency of a request of these lengths. Raises
    ``ValueError`` when the estimate is not positive (a fit extrapolated far outside its measured
    prompt lengths can be), since no meaningful SLO follows from it."""
    if scale <= 0:
        raise ValueError(f"the SLO scale must be positive, not {scale}")
    latency = estimate.latency_ms(prompt_tokens, output_tokens)
    if not latency > 0:
        raise ValueError(
            f"the estimated latency of {estimate.config.key()} for {prompt_tokens}+{output_tokens} tokens is "
            f"{latency:.1f} ms; "
            "no SLO can be scaled from it (re-profile with prompt lengths covering this one)"
        )
    return scale * latency


def request_slo_ms(
    prompt_tokens: int,
    output_tokens: int,
    *,
    fixed_ms: float | None = None,
    scale: float | None = None,
    reference: ConfigEstimate | None = None,
) -> float:
    """A request's SLO: ``fixed_ms`` when given, else ``scale`` times the ``reference`` estimate's
    latency for its lengths, else 0 (no SLO). Raises ``ValueError`` as ``slo_ms`` does."""
    if fixed_ms:
        return float(fixed_ms)
    if scale and reference is not None:
        return slo_ms(reference, prompt_tokens, output_tokens, scale)
    return 0.0


def slo_met(e2e_ms: float, slo: float) -> bool | None:
    """Whether a finished request met its SLO; None when it had none (``slo <= 0``)."""
    return None if slo <= 0 else e2e_ms <= slo
