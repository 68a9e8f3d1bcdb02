"""Load generator settings: every flag has an ISERVE_* environment twin (``--rate`` is
``ISERVE_RATE``, ``--prompts`` is ``ISERVE_PROMPTS``, ...); ``--help`` lists them."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from iserve.messages import Intent
from iserve.settings import common_flags, flag

from .traces import DEFAULT_MAX_CONTEXT

INTENTS = ["min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget"]
COST_MODELS = ["mem-x-latency", "memory", "gpu-hours"]


@dataclass
class LoadgenConfig:
    nats_url: str = "nats://127.0.0.1:4222"
    log_level: str = "info"
    log_json: bool | None = None
    models: list[str] = field(default_factory=list)  # checkpoint folders to register, or registered names
    trace: str = "code"
    out: Path | None = None  # run directory; None: runs/<trace>-<time>
    interval_s: float = 60.0
    aggregate: int = 1
    rate: float = 0.2
    start_s: float = 0.0
    duration_s: float = 0.0  # 0: to the end of the compressed trace
    max_requests: int = 0  # 0: all
    seed: int = 0
    deploy_every_s: float = 300.0
    intent: str = "min-cost"
    cost_model: str = "mem-x-latency"
    slo_ms: float | None = None
    slo_scale: float | None = None
    budget: float | None = None
    prompt_tokens: int = 0  # 0: the median prompt length of the replayed requests
    output_tokens: int = 0  # 0: the median output length of the replayed requests
    placement: str = ""
    prompts: str = ""  # "" : $ISERVE_PROMPTS (read by the flag), the ShareGPT sample next to the repo, or built-in
    max_context: int = DEFAULT_MAX_CONTEXT
    max_inflight: int = 2000
    request_timeout_s: float = 600.0
    sample_s: float = 1.0
    ready_timeout_s: float = 900.0
    reuse_deployments: bool = False
    undeploy: bool = True
    system: str = "iserve"
    progress: bool | None = None  # None: when stderr is a terminal
    dry_run: bool = False
    command: list[str] = field(default_factory=list)

    def intent_for(self, prompt_tokens: int, output_tokens: int, slo_ms: float | None = None) -> Intent:
        """The deployment intent; latency is estimated for ``--prompt-tokens``/``--output-tokens``
        when given, else for the lengths passed in (the replayed requests' medians)."""
        return Intent(
            kind=self.intent,  # type: ignore[arg-type]
            cost_model=self.cost_model,  # type: ignore[arg-type]
            slo_ms=slo_ms if slo_ms is not None else self.slo_ms,
            budget=self.budget,
            prompt_tokens=self.prompt_tokens or prompt_tokens,
            output_tokens=self.output_tokens or output_tokens,
        )

    def run_dir(self) -> Path:
        return self.out or Path("runs") / f"{Path(self.trace).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iserve loadgen",
        description=(
            "Replay an Azure LLM inference trace against iServe, open loop: compress it as the paper does "
            "(intervals, aggregation, rate factor), deploy the models one every --deploy-every-s, send each request "
            "to a random deployed model with exactly its token counts, and record every request, GPU sample and "
            "deployment in a run directory. Ctrl-C stops and keeps what was collected."
        ),
    )
    common_flags(p)
    flag(p, "--models", default="", help="comma-separated checkpoint folders (registered and profiled first) or names already registered")
    flag(p, "--trace", default="code", help="'code' or 'conv' (the shipped Azure traces) or a CSV path of the same format")
    flag(p, "--out", default="", help="run directory (default runs/<trace>-<time>); must not hold a run already")
    flag(p, "--interval-s", default=60.0, type=float, help="compression: interval length in seconds")
    flag(p, "--aggregate", default=1, type=int, help="compression: adjacent intervals merged into one (time runs this many times faster)")
    flag(p, "--rate", default=0.2, type=float, help="compression: fraction of requests kept in each interval, in (0, 1] (paper 0.1-0.4)")
    flag(p, "--start-s", default=0.0, type=float, help="replay the compressed trace from this second")
    flag(p, "--duration-s", default=0.0, type=float, help="replay this many seconds of the compressed trace (0: to its end)")
    flag(p, "--max-requests", default=0, type=int, help="replay at most this many requests (0: all)")
    flag(p, "--seed", default=0, type=int, help="seed of compression and model assignment")
    flag(p, "--deploy-every-s", default=300.0, type=float, help="deploy the next model this many seconds after the previous one (paper: 5 minutes; 0: all before the replay)")
    flag(p, "--intent", default="min-cost", choices=INTENTS, help="deployment intent")
    flag(p, "--cost-model", default="mem-x-latency", choices=COST_MODELS, help="how cost is counted (paper section 4.1)")
    flag(p, "--slo-ms", default=None, type=float, help="latency SLO of every request (and of --intent latency-slo)")
    flag(p, "--slo-scale", default=None, type=float, help="SLO per request = this x the model's estimated latency at minimum parallelism, fp16 (paper 2.5-7.5)")
    flag(p, "--budget", default=None, type=float, help="cost budget for --intent cost-budget")
    flag(p, "--prompt-tokens", default=0, type=int, help="prompt length the intent's latency is estimated for (0: median of the replayed requests)")
    flag(p, "--output-tokens", default=0, type=int, help="output length the intent's latency is estimated for (0: median of the replayed requests)")
    flag(p, "--placement", default="", choices=["", "hybrid", "least-loaded", "packing"], help="placement policy (default: the deployer's)")
    flag(p, "--prompts", default="", help="prompt file (ShareGPT JSON, JSONL or one per line); default: the ShareGPT sample in ../shared/data if present, else built-in synthetic prompts")
    flag(p, "--max-context", default=DEFAULT_MAX_CONTEXT, type=int, help="cap of ContextTokens (paper: 1K tokens; 0: no cap)")
    flag(p, "--max-inflight", default=2000, type=int, help="safety limit on requests in flight; a request beyond it waits to be sent (its lag is recorded); 0: no limit")
    flag(p, "--request-timeout-s", default=600.0, type=float, help="a request not finished within this many seconds counts as timed out")
    flag(p, "--sample-s", default=1.0, type=float, help="seconds between GPU samples")
    flag(p, "--ready-timeout-s", default=900.0, type=float, help="how long profiling and a deployment may take")
    flag(p, "--reuse-deployments", default=False, type=bool, help="use a model's ready deployment instead of deploying it again")
    flag(p, "--undeploy", default=True, type=bool, help="undeploy the deployments this run made when it ends")
    flag(p, "--system", default="iserve", help="system name recorded in the run metadata")
    flag(p, "--progress", default=None, type=bool, help="show a progress bar (default: when stderr is a terminal)")
    flag(p, "--dry-run", default=False, type=bool, help="print the compressed trace's statistics and exit without connecting")
    return p


def parse(argv: list[str] | None = None) -> LoadgenConfig:
    p = build_parser()
    a = p.parse_args(argv)
    models = _models(a.models)
    if not models and not a.dry_run:
        p.error("--models is required (checkpoint folders or registered model names, comma-separated)")
    if a.slo_ms is not None and a.slo_scale is not None:
        p.error("give --slo-ms or --slo-scale, not both")
    if a.intent == "latency-slo" and a.slo_ms is None and a.slo_scale is None:
        p.error("--intent latency-slo needs --slo-ms or --slo-scale")
    if a.intent == "cost-budget" and a.budget is None:
        p.error("--intent cost-budget needs --budget")
    if not (0 < a.rate <= 1):
        p.error(f"--rate must be in (0, 1], not {a.rate}; raise the load with --aggregate")
    if a.aggregate < 1 or a.interval_s <= 0:
        p.error("--aggregate must be >= 1 and --interval-s positive")
    return LoadgenConfig(
        nats_url=a.nats_url,
        log_level=a.log_level,
        log_json=a.log_json,
        models=models,
        trace=a.trace,
        out=Path(a.out) if a.out else None,
        interval_s=a.interval_s,
        aggregate=a.aggregate,
        rate=a.rate,
        start_s=a.start_s,
        duration_s=a.duration_s,
        max_requests=a.max_requests,
        seed=a.seed,
        deploy_every_s=a.deploy_every_s,
        intent=a.intent,
        cost_model=a.cost_model,
        slo_ms=a.slo_ms,
        slo_scale=a.slo_scale,
        budget=a.budget,
        prompt_tokens=a.prompt_tokens,
        output_tokens=a.output_tokens,
        placement=a.placement,
        prompts=a.prompts,
        max_context=a.max_context,
        max_inflight=a.max_inflight,
        request_timeout_s=a.request_timeout_s,
        sample_s=a.sample_s,
        ready_timeout_s=a.ready_timeout_s,
        reuse_deployments=bool(a.reuse_deployments),
        undeploy=bool(a.undeploy),
        system=a.system,
        progress=a.progress,
        dry_run=bool(a.dry_run),
        command=["iserve", "loadgen", *(argv if argv is not None else sys.argv[1:])],
    )
