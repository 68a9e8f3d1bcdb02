"""A continuously batched replica under a Poisson load, analytically (pure; see
docs/deployment.md#capacity): its throughput and its mean and percentile latency at an arrival rate.

The replica is a birth-death chain over the requests it holds, ``k``. With ``n = min(k, B)`` of them in
the batch (``B``: ``max_batch``, or fewer when the KV pool cannot hold ``B`` worst cases) every step
decodes ``n`` sequences holding ``n x (prompt + output / 2)`` positions (``StepModel.decode_ms``) and,
on average, ``n / output`` prompt chunks, so a request takes ``T(n) = solo + (output - 1) x (step(n) -
step(1))`` plus its own prompt chunks' share of the others' decodes, and the replica completes
``n / T(n)`` requests per unit of time. Below ``B`` the chain is a
symmetric queue whose state is insensitive to the length distribution; a request that finds ``k >= B``
waits for ``k - B + 1`` completions at the full batch's rate, scaled by ``(1 + cv2) / 2`` (Allen-Cunneen:
``cv2`` is the squared coefficient of variation of the work per request, 0 for fixed lengths, 1 for
exponential ones). By PASTA an arrival sees the chain's stationary state, which gives the mean and
every percentile in ``O(B)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

from iserve.fingerprint.estimator.batching import StepModel
from iserve.gpu_agent.engine.batch_plan import BLOCK_SIZE, STEP_TOKENS  # the engine's KV block and step budget


@dataclass(frozen=True)
class Load:
    """An expected load: Poisson arrivals at ``rate`` requests/s of ``prompt_tokens`` in and
    ``output_tokens`` out on average; ``cv2`` as in the module docstring."""

    rate: float
    prompt_tokens: int
    output_tokens: int
    cv2: float = 1.0

    def split(self, replicas: int) -> Load:
        """The load one of ``replicas`` replicas sees (the scheduler spreads a model's requests evenly)."""
        return Load(self.rate / replicas, self.prompt_tokens, self.output_tokens, self.cv2)


@dataclass(frozen=True)
class Point:
    """A replica at one arrival rate: ``throughput`` (requests/s it can complete at most),
    ``utilization`` (rate / throughput), ``mean_ms`` and ``p_ms`` (the latency at the asked percentile;
    ``inf`` for both when the rate reaches the throughput), ``wait`` (share of arrivals that queue)."""

    rate: float
    throughput: float
    utilization: float
    mean_ms: float
    p_ms: float
    wait: float


def batch_limit(max_batch: int, kv_tokens: int, prompt_tokens: int, output_tokens: int) -> int:
    """How many requests of this size run at once: ``max_batch``, or fewer when the pool of
    ``kv_tokens`` (0: no limit) cannot hold that many worst cases (prompt + output, in blocks)."""
    if kv_tokens <= 0:
        return max_batch
    need = -(-(prompt_tokens + output_tokens) // BLOCK_SIZE)
    return max(1, min(max_batch, (kv_tokens // BLOCK_SIZE) // max(1, need)))


def output_quantile(mean: float, cv2: float, percentile: float) -> float:
    """The ``percentile`` of output lengths with this mean and squared coefficient of variation, as a
    gamma distribution (shape ``1 / cv2``; exponential at 1) by the Wilson-Hilferty approximation."""
    if cv2 <= 0:
        return mean
    z = NormalDist().inv_cdf(percentile / 100.0)
    c = cv2 / 9.0
    return mean * max(0.0, 1.0 - c + z * math.sqrt(c)) ** 3


class Replica:
    """One replica's latency curve for a request size: ``latency_ms(n)`` in a batch of ``n`` and the
    curve's points via :meth:`at`. Build once per (configuration, size); :meth:`at` is ``O(batch)``."""

    __slots__ = (
        "model", "batch", "prompt_tokens", "output_tokens", "solo_ms", "throughput",
        "_first", "_chunk", "_base", "_service", "_step",
    )  # fmt: skip

    def __init__(self, model: StepModel, batch: int, prompt_tokens: int, output_tokens: int):
        if batch < 1 or prompt_tokens < 1 or output_tokens < 1:
            raise ValueError("batch, prompt_tokens and output_tokens must be >= 1")
        self.model, self.batch, self.prompt_tokens, self.output_tokens = model, batch, prompt_tokens, output_tokens
        self.solo_ms = max(model.est.latency_ms(prompt_tokens, output_tokens), 1e-9)
        self._first = model.est.ttft_ms(prompt_tokens)
        self._chunk = model.chunk_ms(0, prompt_tokens)
        self._base = model.decode_ms(1, round(prompt_tokens + output_tokens / 2.0))
        self._service: list[float] = []  # T(1) .. T(batch), filled on first use
        self._step: list[float] = []
        self.throughput = 1000.0 * batch / self.service_ms(batch)  # requests/s at the full batch

    def service_ms(self, n: int) -> float:
        """``T(n)``: a request's latency in a batch of ``n`` (no queueing)."""
        if n == 1:
            return self.solo_ms
        p, o = self.prompt_tokens, self.output_tokens
        step = self.model.decode_ms(n, round(n * (p + o / 2.0))) + (n - 1) / o * self._chunk
        # its own prompt chunks ride along with the other n - 1 sequences' decodes
        others = -(-p // STEP_TOKENS) * self.model.decode_ms(n - 1, round((n - 1) * (p + o / 2.0)))
        return self.solo_ms + max(0.0, (o - 1) * (step - self._base)) + others

    def _curve(self) -> tuple[list[float], list[float]]:
        if not self._service:
            self._service = [self.service_ms(n) for n in range(1, self.batch + 1)]
            first, o = self._first, self.output_tokens
            # one more output token in a batch of n (for a request longer than the mean)
            self._step = [(t - first) / (o - 1) if o > 1 else t - first for t in self._service]
        return self._service, self._step

    def at(self, rate: float, cv2: float = 1.0, percentile: float = 95.0) -> Point:
        """The replica at ``rate`` requests/s (``percentile`` in (0, 100))."""
        b, mu_b = self.batch, self.throughput
        service, step = self._curve()
        rate = max(rate, 0.0)
        if rate >= mu_b:
            return Point(rate, mu_b, rate / mu_b, math.inf, math.inf, 1.0)
        # unnormalised stationary probabilities of k = 0 .. b-1 held, then the tail k >= b
        probs = [1.0]
        for n in range(1, b):
            probs.append(probs[-1] * rate * service[n - 1] / (1000.0 * n))
        r = rate / mu_b
        at_b = probs[-1] * rate * service[b - 1] / (1000.0 * b)
        tail = at_b / (1.0 - r)
        z = sum(probs) + tail
        wait = tail / z
        scale = (1.0 + cv2) / 2.0
        drain = mu_b - rate  # requests/s by which the full batch outruns arrivals
        mean = sum(q * t for q, t in zip(probs, service)) / z
        mean += wait * (service[-1] + scale * 1000.0 / drain)
        q = 1.0 - percentile / 100.0
        queued = scale * 1000.0 * math.log(wait / q) / drain if wait > q else 0.0
        k = b - 1
        if not queued:
            acc = 0.0
            for k, pk in enumerate(probs):
                acc += pk / z
                if acc >= 1.0 - q:
                    break
        # the request's own length at the percentile; its excess and the wait combine as independent tails
        longer = (output_quantile(self.output_tokens, cv2, percentile) - self.output_tokens) * step[k]
        p_ms = service[k] + math.hypot(max(0.0, longer), queued)
        return Point(rate, mu_b, r, mean, p_ms, wait)

    def max_rate(self, utilization: float) -> float:
        """The rate at which the replica runs at ``utilization`` of its throughput."""
        return utilization * self.throughput
