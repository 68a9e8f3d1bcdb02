"""The latency fit (paper L2): TTFT and decode-step lines through the 1- and 2-layer fingerprints,
host and device time fitted separately, and the cost of TP collectives.
See docs/estimator.md#latency-l2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from iserve.messages import FingerprintMeasurement

Poly = tuple[float, float, float]  # c0 + c1 p + c2 p^2
Line = tuple[float, float]  # a + b x


# ---------------------------------------------------------------------------------------------------
# least squares


def nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0, exactly, for the few (<= 8) features used here:
    the best of the unconstrained solutions on every subset of features that comes out non-negative.
    Every latency coefficient is a cost (per layer, per token, per position), so none is negative;
    without the constraint, noise can make a fitted slope negative and an extrapolation absurd."""
    k = a.shape[1]
    if k > 8:
        raise ValueError("nnls here is for at most 8 features")
    best, best_res = np.zeros(k), float(np.sum(y**2))
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        sub = a[:, cols]
        coef, *_ = np.linalg.lstsq(sub, y, rcond=None)
        if np.any(coef < 0):
            continue
        res = float(np.sum((sub @ coef - y) ** 2))
        if res < best_res - 1e-12 * max(1.0, best_res):
            best = np.zeros(k)
            best[cols] = coef
            best_res = res
    return best


def _fit_ttft(points: list[tuple[int, int, float]], degree: int, name: str) -> tuple[Poly, Poly]:
    """``T(n, p) = n * layer(p) + other(p)``, polynomials of ``degree`` in p with non-negative
    coefficients, by least squares."""
    scale = float(max(p for _, p, _ in points))
    rows, ys = [], []
    for n, p, y in points:
        q = p / scale
        powers = [q**k for k in range(degree + 1)]
        rows.append([n * w for w in powers] + powers)
        ys.append(y)
    a = np.asarray(rows, dtype=float)
    if np.linalg.matrix_rank(a) < a.shape[1]:
        raise ValueError(f"variant {name}: TTFT measurements do not determine the per-layer and other terms")
    coef = nnls(a, np.asarray(ys, dtype=float))
    unscale = [scale**-k for k in range(degree + 1)]
    layer = [float(coef[k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)
    other = [float(coef[degree + 1 + k]) * unscale[k] for k in range(degree + 1)] + [0.0] * (2 - degree)
    return (layer[0], layer[1], layer[2]), (other[0], other[1], other[2])


def _fit_steps(points: list[tuple[int, int, float]]) -> tuple[Line, Line]:
    """``S(n, x) = n * (a_l + b_l x) + (a_o + b_o x)`` by non-negative least squares; ``b = 0`` when
    the points have a single position."""
    positions = {x for _, x, _ in points}
    ys = np.asarray([y for _, _, y in points], dtype=float)
    if len(positions) < 2:
        coef = nnls(np.asarray([[n, 1.0] for n, _, _ in points], dtype=float), ys)
        return (float(coef[0]), 0.0), (float(coef[1]), 0.0)
    scale = float(max(positions)) or 1.0
    a = np.asarray([[n, n * x / scale, 1.0, x / scale] for n, x, _ in points], dtype=float)
    coef = nnls(a, ys)
    return (float(coef[0]), float(coef[1]) / scale), (float(coef[2]), float(coef[3]) / scale)


BatchTerms = tuple[int, Line, Line]  # a batch size, the step's per-layer and other lines in position


def fit_batched(measurements: Sequence[FingerprintMeasurement], depths: Sequence[int]) -> tuple[BatchTerms, ...]:
    """The batching engine's decode step at every batch size measured on at least two of ``depths``:
    ``S_b(n, x) = n * (a_l + b_l x) + (a_o + b_o x)`` for ``n`` layers at mean position ``x``, as
    ``_fit_steps`` fits the batch-1 step (docs/estimator.md#batched-steps). Empty when none was."""
    ms = [m for m in measurements if not m.replayed_from and m.num_layers in depths and m.batch_decode]
    out = []
    for b in sorted({t.batch for m in ms for t in m.batch_decode}):
        points = [(m.num_layers, t.position, t.step_ms) for m in ms for t in m.batch_decode if t.batch == b]
        if len({n for n, _, _ in points}) >= 2:
            layer, other = _fit_steps(points)
            out.append((b, layer, other))
    return tuple(out)


def _step_points(m: FingerprintMeasurement, device: bool) -> list[tuple[int, int, float]]:
    timings = m.decode_device if device else m.decode
    if timings:
        return [(m.num_layers, t.position, t.step_ms) for t in timings]
    value = m.tpot_device_ms if device else m.tpot_ms
    return [(m.num_layers, 0, value)]


def _has_device(measurements: Sequence[FingerprintMeasurement]) -> bool:
    return all(m.ttft_device and (m.decode_device or m.tpot_device_ms > 0) for m in measurements)


def poly_add(a: Poly, b: Poly) -> Poly:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


# ---------------------------------------------------------------------------------------------------
# one variant's latency


@dataclass(frozen=True)
class LatencyFit:
    """One variant's per-layer and "other" latency terms. The device lines include the slack in
    their "other" part; a host line is ``None`` where that pass has no host bound."""

    ttft_layer: Poly
    ttft_other: Poly
    step_layer: Line  # decode step: ms at position 0, ms per position
    step_other: Line
    ttft_host_layer: Poly | None
    ttft_host_other: Poly | None
    step_host_layer: Line | None
    step_host_other: Line | None
    prompt_lengths: tuple[int, ...]


def fit_latency(measurements: Sequence[FingerprintMeasurement], depths: Sequence[int], name: str) -> LatencyFit:
    """Fit TTFT and decode steps over one variant's measurements (fingerprints of ``depths`` layers,
    and any replayed deep run). Raises ValueError when TTFT was timed at fewer than two prompt
    lengths on some fingerprint, or the points do not determine the terms."""
    timed = [m for m in measurements if m.ttft]
    lengths_by_depth = {n: {t.prompt_tokens for m in timed if m.num_layers == n for t in m.ttft} for n in depths}
    min_lengths = min(len(v) for v in lengths_by_depth.values())
    if min_lengths < 2:
        raise ValueError(
            f"variant {name} has TTFT at fewer than two prompt lengths on some fingerprint; "
            "TTFT per token cannot be fitted"
        )
    degree = 2 if min_lengths >= 3 else 1

    # Wall time (the host bound, and the only one without device timing).
    wall_points = [(m.num_layers, t.prompt_tokens, t.ttft_ms) for m in timed for t in m.ttft]
    host_layer, host_other = _fit_ttft(wall_points, degree, name)
    host_step_layer, host_step_other = _fit_steps([p for m in measurements for p in _step_points(m, False)])
    # With a replayed deep run the wall lines are the estimate. See docs/estimator.md#deep-runs.
    deep = any(m.replayed_from for m in measurements)

    ttft_host_layer = ttft_host_other = tpot_host_layer = tpot_host_other = None
    if _has_device(timed) and not deep:
        # A device sample above the wall median is noise: capped so it cannot steepen the device line.
        wall_ttft = {(m.num_layers, t.prompt_tokens): t.ttft_ms for m in timed for t in m.ttft}
        dev_points = [
            (m.num_layers, t.prompt_tokens, min(t.ttft_ms, wall_ttft.get((m.num_layers, t.prompt_tokens), math.inf)))
            for m in timed
            for t in m.ttft_device
        ]
        dev_layer, dev_other = _fit_ttft(dev_points, degree, name)
        wall_steps = {(m.num_layers, t.position): t.step_ms for m in timed for t in m.decode}
        dev_step_points = [
            (n, x, min(y, wall_steps.get((n, x), math.inf))) for m in timed for n, x, y in _step_points(m, True)
        ]
        dev_step_layer, dev_step_other = _fit_steps(dev_step_points)
        # Slack: the least wall-minus-device gap (host work before the first kernel and after the last).
        gaps = [
            w.ttft_ms - d.ttft_ms
            for m in timed
            for w in m.ttft
            for d in m.ttft_device
            if w.prompt_tokens == d.prompt_tokens
        ]
        ttft_slack = max(0.0, min(gaps)) if gaps else 0.0
        step_gaps = [m.tpot_ms - m.tpot_device_ms for m in timed if m.tpot_device_ms > 0]
        step_slack = max(0.0, min(step_gaps)) if step_gaps else 0.0
        dev_other = poly_add(dev_other, (ttft_slack, 0.0, 0.0))
        dev_step_other = (dev_step_other[0] + step_slack, dev_step_other[1])
        # A pass captured in one CUDA graph has no per-layer host work, hence no host bound.
        # See docs/estimator.md#graph-captured-passes.
        longest = max(p for _, p, _ in wall_points)
        if not all(m.prefill_graph_tokens >= longest for m in timed):
            ttft_host_layer, ttft_host_other = host_layer, host_other
        if not all(m.decode_graphs for m in measurements):
            tpot_host_layer, tpot_host_other = host_step_layer, host_step_other
    else:
        dev_layer, dev_other = host_layer, host_other
        dev_step_layer, dev_step_other = host_step_layer, host_step_other

    return LatencyFit(
        ttft_layer=dev_layer,
        ttft_other=dev_other,
        step_layer=dev_step_layer,
        step_other=dev_step_other,
        ttft_host_layer=ttft_host_layer,
        ttft_host_other=ttft_host_other,
        step_host_layer=tpot_host_layer,
        step_host_other=tpot_host_other,
        prompt_lengths=tuple(sorted({p for _, p, _ in wall_points})),
    )


# ---------------------------------------------------------------------------------------------------
# tensor-parallel collectives


@dataclass(frozen=True)
class CommModel:
    """Cost of one collective of ``m`` bytes over ``t`` ranks: ``alpha_us + 2 (t-1)/t * m / beta``."""

    alpha_us: float
    bus_gbps: float
    source: str = "default"  # "measured" or "default"

    def collective_ms(self, nbytes: float, ranks: int) -> float:
        if ranks <= 1:
            return 0.0
        return (self.alpha_us + 2.0 * (ranks - 1) / ranks * nbytes / (self.bus_gbps * 1e3)) / 1000.0

    def describe(self) -> str:
        return f"collective = {self.alpha_us:.1f} us + 2(t-1)/t * bytes / {self.bus_gbps:.0f} GB/s ({self.source})"


# Intra-host collective defaults by GPU family: NVLink parts vs PCIe (small messages: NCCL latency).
COMM_DEFAULTS: dict[str, CommModel] = {
    "nvlink": CommModel(alpha_us=12.0, bus_gbps=300.0),
    "pcie": CommModel(alpha_us=20.0, bus_gbps=20.0),
}


def default_comm(gpu_type: str) -> CommModel:
    """The default :class:`CommModel` for a GPU type (NVLink for SXM-class H100/H200/A100/B200)."""
    t = gpu_type.upper()
    nvlink = any(k in t for k in ("H100", "H200", "A100", "B200", "GH200")) and "PCIE" not in t
    return COMM_DEFAULTS["nvlink" if nvlink else "pcie"]
