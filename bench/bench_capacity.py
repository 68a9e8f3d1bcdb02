"""The capacity model (``iserve.deployer.capacity``) against the simulator's batched replica
(``iserve.loadgen.replica.serve_alone``): mean and percentile latency at several utilizations, and what
each costs to compute.

Poisson arrivals at ``u x throughput`` for u in 0.1 .. 0.9, on synthetic H100 maps (docs/simulator.md),
for fixed request lengths and for exponential output lengths. The relative error columns are the
model's over the simulation's; the cost columns are one call of the model and one simulated run.

Run: ``python bench/bench_capacity.py [--requests 20000] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from iserve.deployer.capacity import Replica, batch_limit
from iserve.deployer.memory import kv_pool_tokens
from iserve.fingerprint.estimator.batching import step_model
from iserve.loadgen.replica import serve_alone
from iserve.loadgen.synthetic import synthetic_map
from iserve.stats import percentile

CASES = [  # model, configuration key, max_batch, prompt, output
    ("llama-2-7b", "tp1-pp1-wfp16-kvfp16-pnone", 8, 512, 128),
    ("llama-2-7b", "tp1-pp1-wint8-kvint8-pnone", 32, 256, 256),
    ("llama-2-13b", "tp2-pp1-wfp16-kvfp16-pnone", 16, 1024, 64),
]
UTILIZATIONS = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9)


def workload(rate: float, prompt: int, output: int, n: int, exp_lengths: bool, rng: random.Random):
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        o = max(1, min(4 * output, round(rng.expovariate(1 / output)))) if exp_lengths else output
        out.append((t, prompt, o))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--percentile", type=float, default=95.0)
    args = ap.parse_args()
    rows = []
    worst = {"mean": 0.0, "p": 0.0}
    for model, key, b, p, o in CASES:
        cmap = synthetic_map(model, gpu_type="H100", context_tokens=2048)
        est = next(e for e in cmap.estimates if e.config.key() == key)
        sm = step_model(cmap.estimates, est, cmap.context_tokens)
        pool = kv_pool_tokens(b, 0, cmap.context_tokens)
        for exp_lengths in (False, True):
            cv2 = 1.0 if exp_lengths else 0.0
            rep = Replica(sm, batch_limit(b, pool, p, o), p, o)
            for u in UTILIZATIONS:
                rate = u * rep.throughput
                reqs = workload(rate, p, o, args.requests, exp_lengths, random.Random(args.seed))
                t0 = time.perf_counter()
                lat = serve_alone(sm, reqs, max_batch=b, kv_tokens=pool)
                sim_ms = (time.perf_counter() - t0) * 1000
                lat = lat[len(lat) // 10 :]  # drop the warm-up
                t0 = time.perf_counter()
                for _ in range(100):
                    pt = rep.at(rate, cv2, args.percentile)
                model_us = (time.perf_counter() - t0) * 1e4
                mean, pq = statistics.fmean(lat), percentile(lat, args.percentile)
                e_mean, e_p = pt.mean_ms / mean - 1, pt.p_ms / pq - 1
                if u <= 0.8:
                    worst["mean"] = max(worst["mean"], abs(e_mean))
                    worst["p"] = max(worst["p"], abs(e_p))
                lengths = "exp" if exp_lengths else "fixed"
                rows.append(
                    (f"{model} {key} b{b} {p}+{o} {lengths}", f"{u:.1f}", f"{rate:.2f}", f"{mean:.0f}",
                     f"{pt.mean_ms:.0f}", f"{100 * e_mean:+.1f}%", f"{pq:.0f}", f"{pt.p_ms:.0f}",
                     f"{100 * e_p:+.1f}%", f"{model_us:.1f}", f"{sim_ms:.0f}")
                )  # fmt: skip
    head = ("case", "util", "req/s", "sim mean", "model mean", "err", "sim p", "model p", "err", "model us", "sim ms")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(
        f"\np = p{args.percentile:g}; {args.requests} requests per row, first 10% dropped; worst |error| up to "
        f"utilization 0.8: mean {100 * worst['mean']:.1f}%, p{args.percentile:g} {100 * worst['p']:.1f}%"
    )


if __name__ == "__main__":
    main()
