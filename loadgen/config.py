"""Load generator settings: every flag has an ISERVE_* environment twin (``--rate`` is
``ISERVE_RATE``, ``--prompts`` is ``ISERVE_PROMPTS``, ...); ``--help`` lists them."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from iserve.errors import BadRequest
from iserve.messages import CostModel, Intent, IntentKind, PlacementChoice
from iserve.quality import parse_policy
from iserve.settings import ServiceConfig, add_flags, from_args, option

from .traces import DEFAULT_MAX_CONTEXT


def _models(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _out(text: str) -> Path | None:
    return Path(text) if text else None


def quality_flag(text: str) -> str:
    """``--quality``'s parser: the text, once :func:`~iserve.quality.parse_policy` accepts it."""
    try:
        parse_policy(text)
    except BadRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


@dataclass
class LoadgenConfig(ServiceConfig):
    models: list[str] = option(
        [],
        type=_models,
        help="comma-separated checkpoint folders (registered and profiled first) or names already registered",
    )
    trace: str = option("code", help="'code' or 'conv' (the shipped Azure traces) or a CSV path of the same format")
    out: Path | None = option(
        None, type=_out, help="run directory (default runs/<trace>-<time>); must not hold a run already"
    )
    interval_s: float = option(60.0, help="compression: interval length in seconds")
    aggregate: int = option(
        1, help="compression: adjacent intervals merged into one (time runs this many times faster)"
    )
    rate: float = option(0.2, help="compression: fraction of requests kept in each interval, in (0, 1] (paper 0.1-0.4)")
    start_s: float = option(0.0, help="replay the compressed trace from this second")
    duration_s: float = option(0.0, help="replay this many seconds of the compressed trace (0: to its end)")
    max_requests: int = option(0, help="replay at most this many requests (0: all)")
    seed: int = option(0, help="seed of compression and model assignment")
    deploy_every_s: float = option(
        300.0,
        help="deploy the next model this many seconds after the previous one "
        "(paper: 5 minutes; 0: all before the replay)",
    )
    intent: IntentKind = option("min-cost", help="deployment intent")
    cost_model: CostModel = option("mem-x-latency", help="how cost is counted (paper section 4.1)")
    slo_ms: float | None = option(None, type=float, help="latency SLO of every request (and of --intent latency-slo)")
    slo_scale: float | None = option(
        None,
        type=float,
        help="SLO per request = this x the model's estimated latency at minimum parallelism, fp16 (paper 2.5-7.5)",
    )
    budget: float | None = option(None, type=float, help="cost budget for --intent cost-budget")
    prompt_tokens: int = option(
        0, help="prompt length the intent's latency is estimated for (0: median of the replayed requests)"
    )
    output_tokens: int = option(
        0, help="output length the intent's latency is estimated for (0: median of the replayed requests)"
    )
    quality: str = option(
        "any",
        type=quality_flag,
        help="the intent's quality policy (default any: the paper's free search; lossless, default, max-kl=X, "
        "min-top1=Y; docs/quality.md)",
    )
    placement: PlacementChoice = option("", help="placement policy (default: the deployer's)")
    max_batch: int = option(
        0, help="requests each deployed replica runs at once; 0: the deployer's default, 1: the paper's one at a time"
    )
    prompts: str = option(
        "",
        help="prompt file (ShareGPT JSON, JSONL or one per line); default: the ShareGPT "
        "sample in ../shared/data if present, else built-in synthetic prompts",
    )
    max_context: int = option(DEFAULT_MAX_CONTEXT, help="cap of ContextTokens (paper: 1K tokens; 0: no cap)")
    max_inflight: int = option(
        2000,
        help="safety limit on requests in flight; a request beyond it waits to be "
        "sent (its lag is recorded); 0: no limit",
    )
    request_timeout_s: float = option(600.0, help="a request not finished within this many seconds counts as timed out")
    sample_s: float = option(1.0, help="seconds between GPU samples")
    ready_timeout_s: float = option(900.0, help="how long profiling and a deployment may take")
    reuse_deployments: bool = option(False, help="use a model's ready deployment instead of deploying it again")
    undeploy: bool = option(True, help="undeploy the deployments this run made when it ends")
    system: str = option("iserve", help="system name recorded in the run metadata")
    progress: bool | None = option(None, help="show a progress bar (default: when stderr is a terminal)")
    dry_run: bool = option(False, help="print the compressed trace's statistics and exit without connecting")
    command: list[str] = field(default_factory=list)

    def intent_for(self, prompt_tokens: int, output_tokens: int, slo_ms: float | None = None) -> Intent:
        """The deployment intent; latency is estimated for ``--prompt-tokens``/``--output-tokens``
        when given, else for the lengths passed in (the replayed requests' medians)."""
        return Intent(
            kind=self.intent,
            cost_model=self.cost_model,
            slo_ms=slo_ms if slo_ms is not None else self.slo_ms,
            budget=self.budget,
            prompt_tokens=self.prompt_tokens or prompt_tokens,
            output_tokens=self.output_tokens or output_tokens,
            quality=parse_policy(self.quality),
        )

    def run_dir(self) -> Path:
        return self.out or Path("runs") / f"{Path(self.trace).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    add_flags(p, LoadgenConfig)
    return p


def parse(argv: list[str] | None = None) -> LoadgenConfig:
    p = build_parser()
    a = p.parse_args(argv)
    if not a.models and not a.dry_run:
        p.error("--models is required (checkpoint folders or registered model names, comma-separated)")
    if a.slo_ms is not None and a.slo_scale is not None:
        p.error("give --slo-ms or --slo-scale, not both")
    if a.intent == "latency-slo" and a.slo_ms is None and a.slo_scale is None:
        p.error("--intent latency-slo needs --slo-ms or --slo-scale")
    if a.intent == "cost-budget" and a.budget is None:
        p.error("--intent cost-budget needs --budget")
    if not (0 < a.rate <= 1):
        p.error(f"--rate must be in (0, 1], not {a.rate}; raise the load with --aggregate")
    if a.max_batch < 0:
        p.error("--max-batch must be 0 (the deployer's default) or more")
    if a.aggregate < 1 or a.interval_s <= 0:
        p.error("--aggregate must be >= 1 and --interval-s positive")
    return from_args(LoadgenConfig, a, command=["iserve", "loadgen", *(argv if argv is not None else sys.argv[1:])])
