"""``iserve simulate``: one simulated run of a compressed Azure trace, written as a run directory
(:mod:`.records`, ``kind="simulated"``) that the report reads as it reads a live one. The event loop
is :mod:`.simulation`, the oracle :mod:`.oracle`, synthetic maps :mod:`.synthetic`; what is
simulated is described in docs/simulator.md.

    iserve simulate --models llama-2-70b falcon-40b:2 llama-2-7b \\
        --trace code --rate 0.4 --system iserve --intent min-latency --out runs/sim-iserve
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import msgspec

from iserve.deployer.config import DEFAULT_MAX_BATCH, DeployerConfig, autoscale_policy
from iserve.deployer.units import GIB
from iserve.fingerprint.estimator import repair_tp_host_floors
from iserve.messages import COST_MODELS, INTENT_KINDS, PLACEMENT_POLICIES, ConfigurationMap, Intent, IntentKind
from iserve.quality import ANY
from iserve.settings import flag

from .oracle import oracle_search
from .policies import ALL_SYSTEMS
from .records import summarize
from .simspec import SimResult, SimSpec
from .simulation import Simulation
from .synthetic import synthetic_map
from .traces import TraceRequest, compress, fit_lengths, load_trace, slice_trace, trace_name


def simulate(spec: SimSpec, *, oracle_candidates: int = 6, oracle_evals: int = 40) -> SimResult:
    """Run one simulation; ``spec.system == "oracle"`` runs :func:`oracle_search` with that budget
    and returns its best run."""
    if spec.system == "oracle":
        return oracle_search(spec, candidates=oracle_candidates, max_evals=oracle_evals).result
    return Simulation(spec).run()


def load_maps(directory: str | Path) -> dict[str, ConfigurationMap]:
    """Every ``*.json`` ConfigurationMap in ``directory``, by model name (several GPU types of one
    model: the last file wins; keep one GPU type per directory). Other JSON files there (a JSON
    object whose ``type`` is not ``configuration_map``, e.g. ``bench/profile_maps.py``'s
    ``profile_maps.json`` summary) are skipped; a file that claims to be a map but is not one is an
    error."""
    out: dict[str, ConfigurationMap] = {}
    paths = sorted(Path(directory).glob("*.json"))
    if not paths:
        raise FileNotFoundError(f"{directory} holds no *.json configuration maps")
    dec = msgspec.json.Decoder(ConfigurationMap)

    class _Tag(msgspec.Struct):
        type: str = ""

    tag_dec = msgspec.json.Decoder(_Tag)
    for p in paths:
        data = p.read_bytes()
        try:
            tag = tag_dec.decode(data).type
        except (msgspec.DecodeError, msgspec.ValidationError):
            tag = None  # not a JSON object: let the map decoder say why
        if tag is not None and tag != "configuration_map":
            continue
        try:
            cmap = dec.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ValueError(f"{p}: not a ConfigurationMap: {e}") from None
        out[cmap.model] = repair_tp_host_floors(cmap)  # maps made before the TP floor fix
    if not out:
        raise FileNotFoundError(f"{directory} holds no configuration maps (*.json with type configuration_map)")
    return out


def expand_models(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``["llama-2-70b", "falcon-40b:2"]`` -> ``[(instance, model), ...]``: ``name:N`` deploys N
    instances named ``name#1`` .. ``name#N``; a single one keeps its name."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, _, count = spec.partition(":")
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"bad model count in {spec!r}")
        out.extend([(name, name)] if n == 1 else [(f"{name}#{i}", name) for i in range(1, n + 1)])
    names = [i for i, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"model instances must be unique: {names}")
    return out


# ---------------------------------------------------------------------------------------------------
# building a spec from arguments (shared with the sweep)


@functools.lru_cache(maxsize=4)
def _loaded(trace: str) -> tuple[TraceRequest, ...]:
    return tuple(load_trace(trace))


def build_trace(
    trace: str,
    *,
    rate: float,
    interval_s: float = 60.0,
    aggregate: int = 1,
    seed: int = 0,
    start_s: float = 0.0,
    duration_s: float = 0.0,
    max_requests: int = 0,
) -> list[TraceRequest]:
    """Load (once per process), compress (paper: intervals, aggregation, rate factor) and slice a trace."""
    t = compress(_loaded(str(trace)), interval_s=interval_s, aggregate=aggregate, rate=rate, seed=seed)
    t = slice_trace(t, start_s, duration_s if duration_s > 0 else None)
    return t[:max_requests] if max_requests > 0 else t


def median_lengths(trace: Sequence[TraceRequest], max_context: int) -> tuple[int, int]:
    """The trace's median prompt (capped at ``max_context``) and output lengths: the request size the
    simulator's intents are computed for unless given."""
    if not trace:
        return 512, 128
    lens = [fit_lengths(r.context_tokens, r.generated_tokens, max_context=max_context) for r in trace]
    return (
        max(1, round(statistics.median(x.prompt_tokens for x in lens))),
        max(1, round(statistics.median(x.output_tokens for x in lens))),
    )


def resolve_models(
    specs: Sequence[str], *, maps_dir: str | None, gpu_type: str, max_gpus: int, context_tokens: int = 2048
) -> list[tuple[str, ConfigurationMap]]:
    """Instances and their maps: from ``maps_dir`` (by the map's model name) or synthetic."""
    loaded = load_maps(maps_dir) if maps_dir else {}
    cache: dict[str, ConfigurationMap] = {}
    out = []
    for inst, model in expand_models(specs):
        if maps_dir:
            if model not in loaded:
                raise ValueError(f"no configuration map for {model!r} in {maps_dir} (has: {', '.join(sorted(loaded))})")
            cmap = loaded[model]
        else:
            if model not in cache:
                cache[model] = synthetic_map(model, gpu_type=gpu_type, max_gpus=max_gpus, context_tokens=context_tokens)
            cmap = cache[model]
        out.append((inst, cmap))
    return out


def _max_batch(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"--max-batch must be 0 or more, not {n}")
    return n


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Arguments shared by ``iserve simulate`` and ``iserve report sweep``."""
    # NOTE: default 1 (the paper's mode), not the deployer's 8: the paper's figures are simulated at 1.
    flag(
        ap,
        "--max-batch",
        default=1,
        type=_max_batch,
        help=f"requests a replica runs at once (continuous batching); 1: one at a time, as the paper; "
        f"0: the deployer's default ({DEFAULT_MAX_BATCH})",
    )
    ap.add_argument(
        "--maps", default="", help="directory of ConfigurationMap JSON files (real profiles); default: synthetic maps"
    )
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the cluster (default 8)")
    ap.add_argument("--gpus-per-host", type=int, default=0, help="GPUs per host (default: all on one host)")
    ap.add_argument("--gpu-type", default="A6000", help="GPU type (synthetic maps: A6000 or H100; default A6000)")
    ap.add_argument(
        "--gpu-memory-gib", type=float, default=0.0, help="memory per GPU in GiB (default: the maps' GPU memory)"
    )
    ap.add_argument("--interval-s", type=float, default=60.0, help="trace compression interval (default 60 s)")
    ap.add_argument("--aggregate", type=int, default=1, help="adjacent intervals aggregated into one (default 1)")
    ap.add_argument(
        "--duration-s", type=float, default=0.0, help="replay only this much of the compressed trace (default: all)"
    )
    ap.add_argument(
        "--intent-load",
        action="store_true",
        help="iServe's intent states each model's mean request rate over the trace: the deployer sizes its replicas",
    )
    ap.add_argument(
        "--autoscale",
        action="store_true",
        help="run iServe's autoscaler (the deployer's defaults: docs/deployment.md#autoscaling)",
    )
    ap.add_argument("--autoscale-interval-s", type=float, default=5.0, help="seconds between its evaluations")
    ap.add_argument("--autoscale-max-replicas", type=int, default=4, help="replicas of a model it runs at most")
    ap.add_argument("--policy", default="hybrid", choices=PLACEMENT_POLICIES, help="iServe's placement policy")
    ap.add_argument("--theta", type=float, default=0.5, help="hybrid policy load threshold (default 0.5)")
    ap.add_argument("--max-context", type=int, default=1024, help="prompt cap in tokens (paper: 1K; default 1024)")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="intent request size in (default: the trace's median)")
    ap.add_argument(
        "--output-tokens", type=int, default=0, help="intent request size out (default: the trace's median)"
    )
    ap.add_argument("--cost-model", default="mem-x-latency", choices=COST_MODELS)
    ap.add_argument(
        "--allgather-gbps",
        type=float,
        default=25.0,
        help="accelerate's all-gather bandwidth in GB/s (default 25, PCIe 4.0 x16)",
    )
    ap.add_argument("--sample-s", type=float, default=10.0, help="GPU sample period in gpus.jsonl (default 10 s)")
    ap.add_argument(
        "--timeout-s", type=float, default=0.0, help="drop requests queued longer than this (default: never)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--oracle-candidates", type=int, default=6, help="oracle: configurations tried per model (default 6)"
    )
    ap.add_argument(
        "--oracle-evals", type=int, default=40, help="oracle: most simulations the search spends (default 40)"
    )


def spec_from_args(
    args: argparse.Namespace,
    *,
    models: list[tuple[str, ConfigurationMap]],
    trace_label: str,
    trace: list[TraceRequest],
    system: str,
    intent_kind: IntentKind,
    rate: float,
    slo_scale: float,
    deploy_every_s: float,
    deploy_batch: int,
    notes: str = "",
) -> SimSpec:
    """A :class:`SimSpec` from parsed arguments and one point of a sweep."""
    p, o = median_lengths(trace, args.max_context)
    intent = Intent(
        kind=intent_kind,
        cost_model=args.cost_model,
        prompt_tokens=args.prompt_tokens or p,
        output_tokens=args.output_tokens or o,
        quality=ANY,  # the paper's evaluation searches every variant (docs/quality.md)
    )
    mem = int(args.gpu_memory_gib * GIB) if args.gpu_memory_gib else models[0][1].gpu_memory_bytes
    return SimSpec(
        models=models,
        trace=trace,
        system=system,
        intent=intent,
        gpus=args.gpus,
        gpu_type=models[0][1].gpu_type,
        gpu_memory_bytes=mem,
        gpus_per_host=args.gpus_per_host,
        policy=args.policy,
        theta=args.theta,
        deploy_every_s=deploy_every_s,
        deploy_batch=deploy_batch,
        max_context=args.max_context,
        slo_scale=slo_scale,
        sample_s=args.sample_s,
        timeout_s=args.timeout_s,
        seed=args.seed,
        allgather_bytes_per_s=args.allgather_gbps * 1e9,
        max_batch=args.max_batch or DEFAULT_MAX_BATCH,
        intent_load=args.intent_load,
        autoscale=(
            dataclasses.replace(autoscale_policy(DeployerConfig()), max_replicas=args.autoscale_max_replicas)
            if args.autoscale
            else None
        ),
        autoscale_interval_s=args.autoscale_interval_s,
        trace_label=trace_label,
        rate=rate,
        interval_s=args.interval_s,
        aggregate=args.aggregate,
        notes=notes,
    )


def main(argv: list[str] | None = None) -> int:
    """``iserve simulate``: one simulated run, written as a run directory; prints its summary."""
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(
        prog="iserve simulate",
        description="Simulate a GPU cluster serving a compressed Azure "
        "trace with iServe's own deployer and scheduler decisions, or a baseline's.",
    )
    ap.add_argument(
        "--models",
        nargs="+",
        default=["llama-2-70b", "falcon-40b:2", "llama-2-7b"],
        help="models to deploy in order; name:N deploys N instances (default: the paper's 70B, 2x40B, 7B)",
    )
    ap.add_argument("--trace", default="code", help="code, conv or a CSV path (default code)")
    ap.add_argument("--rate", type=float, default=0.4, help="rate scale factor (paper: 0.1-0.4; default 0.4)")
    ap.add_argument("--system", default="iserve", choices=list(ALL_SYSTEMS))
    ap.add_argument(
        "--intent",
        default="min-latency",
        choices=[k for k in INTENT_KINDS if k != "cost-budget"],
    )
    ap.add_argument(
        "--slo-scale",
        type=float,
        default=0.0,
        help="per-request SLO = scale x latency at minimum parallelism (paper: 2.5-7.5)",
    )
    ap.add_argument("--deploy-every-s", type=float, default=300.0, help="seconds between deployments (paper: 300)")
    ap.add_argument("--deploy-batch", type=int, default=1, help="models per deployment (paper's 21-model run: 2)")
    ap.add_argument("--out", required=True, help="run directory to write")
    add_common_args(ap)
    args = ap.parse_args(argv)
    console = Console()
    try:
        models = resolve_models(args.models, maps_dir=args.maps or None, gpu_type=args.gpu_type, max_gpus=args.gpus)
        trace = build_trace(
            args.trace,
            rate=args.rate,
            interval_s=args.interval_s,
            aggregate=args.aggregate,
            seed=args.seed,
            duration_s=args.duration_s,
        )
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/red] {e}")
        return 2
    spec = spec_from_args(
        args,
        models=models,
        trace_label=trace_name(args.trace),
        trace=trace,
        system=args.system,
        intent_kind=args.intent,
        rate=args.rate,
        slo_scale=args.slo_scale,
        deploy_every_s=args.deploy_every_s,
        deploy_batch=args.deploy_batch,
    )
    t0 = time.perf_counter()
    res = simulate(spec, oracle_candidates=args.oracle_candidates, oracle_evals=args.oracle_evals)
    wall = time.perf_counter() - t0
    res.meta = msgspec.structs.replace(
        res.meta,
        command=["iserve", "simulate", *(argv if argv is not None else sys.argv[1:])],
        started_at=time.time() - wall,
        ended_at=time.time(),
    )
    res.write(args.out)
    s = summarize(res.requests)
    t = Table(
        title=f"{spec.system} on {spec.trace_label} x{spec.rate:g}, {len(trace)} requests, simulated in {wall:.2f} s"
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("requests at once per replica", str(spec.max_batch))
    t.add_row("requests ok / failed", f"{s.ok} / {s.errors}")
    t.add_row("latency p50 / p95 / p99", f"{s.e2e_p50_ms:.0f} / {s.e2e_p95_ms:.0f} / {s.e2e_p99_ms:.0f} ms")
    t.add_row("SLO attainment", f"{s.slo_attainment:.1%}" if s.slo_attainment is not None else "no SLO")
    for model, keys in res.choices.items():
        t.add_row(f"deployed {model}", ", ".join(keys) if keys else "not deployed")
    console.print(t)
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
