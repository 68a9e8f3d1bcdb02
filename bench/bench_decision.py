"""Deployment decision time: rank + feasibility + placement (paper section 6) for 1,000 configurations
on 64 GPUs (8 hosts x 8 H100 80GB). Target: < 20 ms per ``plan()`` call, worst case.

The estimates are synthetic but shaped like a real profile of a Llama-2-70B-like model (80 layers,
GQA, 32k vocabulary): tp in 1, 2, 4, 8 x pp in 1..14 x 3 weight quantizations x 2 KV-cache
quantizations x 3 pruning modes, per-rank layer bytes from the parameter counts, a 4,096-token KV
cache, first/last-stage embedding and LM head, and latencies from an HBM-bandwidth decode model.
Clusters come from a seeded RNG:

* empty: every GPU idle with 79.5 GiB free;
* fragmented: free memory 2 to 60 GiB and load 0 to 1 on each GPU;
* nearly-full: 0.5 to 9 GiB free, loads 0.5 to 1: almost every configuration misses, the walk is long;
* full: 0.2 to 1.5 GiB free: nothing fits, so ``plan`` raises ``Infeasible`` after explaining the
  closest miss (the error path is timed too);
* worst-case: the nearly-full cluster with the few configurations that fit made 20x slower, so they
  rank last: the walk rejects (and explains) every other configuration before it finds one.

Every intent is timed twice: alone, and at an expected load (``--rate``, 20 requests/s of the
intent's 512+128 tokens), where each configuration that fits is sized with the capacity model and
its replicas are placed one after the other.

Run: ``python bench/bench_decision.py [--reps 300] [--seed 7] [--rate 20]``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time

import msgspec

from iserve.deployer.feasibility import ClusterView
from iserve.deployer.loadplan import LoadSpec, load_of
from iserve.deployer.placement import GpuState
from iserve.deployer.planner import plan
from iserve.deployer.units import GIB
from iserve.errors import Infeasible
from iserve.fingerprint.estimator.batching import step_models
from iserve.messages import ConfigEstimate, Configuration, Intent
from iserve.stats import percentile

# Llama-2-70B-like shape
LAYERS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 80, 8192, 28672, 64, 8, 128, 32000
CONTEXT = 4096
BATCH = 8  # a loaded intent's replica batch (its KV pool: BATCH x CONTEXT)
HBM_BYTES_PER_MS = 3.0e9 * 0.8  # 3.0 TB/s copy bandwidth, 80% achieved on decode
FLOPS_PER_MS = 400e9  # effective dense prefill throughput per GPU

WEIGHT_BYTES = {"fp16": 2.0, "int8": 1.02, "int4": 0.53}  # per element, with scales
KV_BYTES = {"fp16": 2, "int8": 1}
PRUNE = {"none": 1.0, "2:4": 0.5625, "structured": 0.75}  # kept fraction of linear bytes (with metadata)


def make_estimates(count: int = 1000) -> list[ConfigEstimate]:
    linear = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM + 3 * HIDDEN * INTER
    other = 2 * HIDDEN
    embed = VOCAB * HIDDEN
    out = []
    for tp, pp, wq, kv, pr in itertools.product([1, 2, 4, 8], range(1, 15), WEIGHT_BYTES, KV_BYTES, PRUNE):
        w_layer = linear * WEIGHT_BYTES[wq] * PRUNE[pr] / tp + other * 2
        kv_layer = 2 * KV_HEADS * HEAD_DIM * CONTEXT * KV_BYTES[kv] / tp
        act_layer = 4 * CONTEXT * HIDDEN / tp
        layer_bytes = int(w_layer + kv_layer + act_layer)
        first = int(embed * 2 / tp)
        last = int((embed * 2 + HIDDEN * 2) / tp)
        overhead = int(1.25 * GIB)
        total = tp * (pp * overhead + LAYERS * layer_bytes + first + last)
        # batch-1 decode: every stage reads its weights once per token, one after the other
        tpot = (LAYERS * w_layer + last) / HBM_BYTES_PER_MS + 0.04 * (pp - 1) + 0.012 * LAYERS * (tp > 1)
        tpot *= {"fp16": 1.0, "int8": 1.08, "int4": 1.15}[wq] if tp == 1 else 1.0
        prefill_per_token = 2 * (LAYERS * linear * PRUNE[pr]) / (tp * FLOPS_PER_MS)
        out.append(
            ConfigEstimate(
                config=Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pr),
                ttft_base_ms=8.0 + 0.3 * pp + 0.5 * tp,
                ttft_per_token_ms=prefill_per_token,
                ttft_per_token2_ms=1e-6,
                tpot_ms=tpot,
                layer_bytes=layer_bytes,
                first_stage_bytes=first,
                last_stage_bytes=last,
                gpu_overhead_bytes=overhead,
                total_bytes=total,
                num_layers=LAYERS,
            )
        )
    out.sort(key=lambda e: (e.config.gpus, e.config.key()))
    return out[:count]


def make_cluster(scenario: str, rng: random.Random, hosts: int = 8, per_host: int = 8) -> list[GpuState]:
    total = 80 * GIB
    gpus = []
    for h in range(hosts):
        for i in range(per_host):
            if scenario == "empty":
                free, load = int(79.5 * GIB), 0.0
            elif scenario == "fragmented":
                free, load = int(rng.uniform(2, 60) * GIB), rng.random()
            elif scenario in ("nearly-full", "worst-case"):
                free, load = int(rng.uniform(0.5, 9) * GIB), rng.uniform(0.5, 1.0)
            elif scenario == "full":
                free, load = int(rng.uniform(0.2, 1.5) * GIB), rng.uniform(0.5, 1.0)
            else:
                raise ValueError(scenario)
            gpus.append(
                GpuState(
                    agent_id=f"host{h}", gpu_index=i, gpu_type="H100", total_bytes=total, free_bytes=free, load=load
                )
            )
    return gpus


def load_spec(estimates, intent: Intent) -> LoadSpec | None:
    """The load part of the decision, as ``planner.plan_gpu_types`` builds it (inside the timed call)."""
    load = load_of(intent)
    if load is None:
        return None
    return LoadSpec(load, step_models(estimates, CONTEXT), BATCH, BATCH * CONTEXT, intent.slo_percentile)


def time_plan(estimates, intent, gpus, reps: int, clock=time.perf_counter) -> tuple[list[float], str]:
    def once():
        try:
            d = plan(estimates, intent, gpus, policy="hybrid", theta=0.5, load=load_spec(estimates, intent))
            reps = f", {len(d.replicas)} replicas" if d.replicas else ""
            return f"{d.estimate.config.key()} ({len(d.rejected)} better missed, {d.fitting} fit{reps})"
        except Infeasible:
            return "Infeasible (nothing fits)"

    outcome = once()
    for _ in range(5):
        once()
    times = []
    for _ in range(reps):
        t0 = clock()
        once()
        times.append((clock() - t0) * 1000.0)
    return times, outcome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--rate", type=float, default=20.0, help="requests/s of the loaded intents (0: none)")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time (this process's CPU time, unaffected by "
        "other jobs on a shared machine)",
    )
    args = ap.parse_args()

    estimates = make_estimates(1000)
    intents = {
        "min-cost": Intent(kind="min-cost"),
        "min-latency": Intent(kind="min-latency"),
        "latency-slo": Intent(kind="latency-slo", slo_ms=3000.0, cost_model="gpu-hours"),
    }
    if args.rate > 0:  # the same intents at an expected load: replicas sized by the capacity model
        intents |= {f"{k}@{args.rate:g}/s": msgspec.structs.replace(i, rate=args.rate) for k, i in intents.items()}
    rows = []
    for scenario in ("empty", "fragmented", "nearly-full", "full", "worst-case"):
        gpus = make_cluster(scenario, random.Random(args.seed))
        if scenario == "worst-case":
            view = ClusterView(gpus)
            estimates = [
                msgspec.structs.replace(e, tpot_ms=e.tpot_ms * 20) if view.fits(e) else e for e in make_estimates(1000)
            ]
        for name, intent in intents.items():
            clock = time.process_time if args.clock == "cpu" else time.perf_counter
            times, outcome = time_plan(estimates, intent, gpus, args.reps, clock)
            p99 = percentile(times, 99)
            rows.append((scenario, name, len(estimates), len(gpus), statistics.median(times), p99, outcome))

    header = ("scenario", "intent", "configs", "GPUs", "median ms", "p99 ms", "target", "decision")
    table = [header] + [
        (s, i, str(c), str(g), f"{m:.2f}", f"{p:.2f}", "< 20 ms " + ("ok" if p < 20 else "MISSED"), o)
        for s, i, c, g, m, p, o in rows
    ]
    widths = [max(len(r[k]) for r in table) for k in range(len(header))]
    for n, r in enumerate(table):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    clock_name = "time.process_time" if args.clock == "cpu" else "time.perf_counter"
    print(f"\n{args.reps} repetitions per row, {clock_name}, placement policy hybrid (theta 0.5)")


if __name__ == "__main__":
    main()
