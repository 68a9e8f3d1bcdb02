"""The ``iserve`` command: one sub-command per persona's action.

    iserve up                       start NATS (embedded) and every service; Ctrl-C stops them
    iserve demo                     the whole flow in one command
    iserve make-model DIR           a random-weight checkpoint (no hub downloads here)
    iserve register PATH            register a checkpoint; it is profiled in the background
    iserve deploy MODEL --intent …  deploy with an intent; prints the choice and why
    iserve generate MODEL PROMPT    stream a completion
    iserve status                   GPUs, models, deployments, queues
    iserve profile show MODEL       a model's configuration map
    iserve undeploy DEPLOYMENT
    iserve validate MODEL           measure the full model, compare with the estimates
    iserve loadgen / simulate / report   trace replay (live or simulated) and its report
    iserve gpu-agent|fingerprint|deployer|scheduler|gateway   run one service in the foreground

Every flag that names the NATS server also reads ``ISERVE_NATS_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import msgspec
from rich.console import Console
from rich.markup import escape

from . import auth, errors
from .messages import COST_MODELS, INTENT_KINDS, Intent, ModelRecord, PlacementChoice, values
from .progress import Steps
from .quality import parse_policy
from .runtime import run_async
from .settings import add_env_twins
from .tables import (
    ESTIMATE_COLUMNS,
    GIB,
    autoscale_table,
    deployments_table,
    estimates_table,
    excluded_table,
    fmt_gib,
    gpus_table,
    models_table,
    quality_caption,
    quality_table,
    queues_table,
)
from .up import default_data_dir

console = Console()
err_console = Console(stderr=True)

SERVICES = {
    "gpu-agent": "iserve.gpu_agent.__main__",
    "fingerprint": "iserve.fingerprint.__main__",
    "deployer": "iserve.deployer.__main__",
    "scheduler": "iserve.scheduler.__main__",
    "gateway": "iserve.gateway.__main__",
}
# sub-commands that own their flags: ``iserve NAME ...`` calls ``MODULE.main(argv)``
TOOLS = {
    "validate": ("iserve.fingerprint.validate", "measure the full model and compare with the estimates"),
    "loadgen": ("iserve.loadgen.__main__", "replay an Azure trace against the live system"),
    "simulate": ("iserve.loadgen.simulator", "replay a trace in the cluster simulator"),
    "report": ("iserve.loadgen.report", "turn runs into tables and plots (also: report sweep)"),
}
PASSTHROUGH = {**SERVICES, **{k: v[0] for k, v in TOOLS.items()}}


def default_url() -> str:
    return os.environ.get("ISERVE_NATS_URL", "nats://127.0.0.1:4222")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iserve")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "(not installed)"


def default_creds() -> str:
    """``$ISERVE_NATS_CREDS``, else the client credentials ``iserve up`` wrote in the default data
    directory when they exist (so a second shell on the same host needs no set-up)."""
    env = os.environ.get(auth.CREDS_ENV, "")
    if env:
        return env
    path = auth.creds_path(default_data_dir(), "client")
    return str(path) if path.is_file() else ""


async def _client(a: argparse.Namespace):
    from .client import Client

    return await Client.connect(a.nats_url, creds=a.nats_creds or None)


def intent_from_args(a: argparse.Namespace) -> Intent:
    """The intent of ``iserve deploy``'s flags; ``--trace`` fills the load (rate unless ``--rate`` is
    given, lengths and their spread) from a trace."""
    rate, prompt, output, cv2 = a.rate, a.prompt_tokens, a.output_tokens, a.output_cv2
    if a.trace:
        from iserve.loadgen.traces import expected_load, load_trace

        try:
            load = expected_load(load_trace(a.trace))
        except (OSError, ValueError) as e:
            raise SystemExit(f"--trace {a.trace}: {e}; name a trace (code, conv) or a CSV of one") from None
        rate, prompt, output, cv2 = rate or load.rate, load.prompt_tokens, load.output_tokens, load.output_cv2
    return Intent(
        kind=a.intent,
        cost_model=a.cost_model,
        slo_ms=a.slo_ms,
        budget=a.budget,
        prompt_tokens=prompt,
        output_tokens=output,
        quality=parse_policy(a.quality),
        rate=rate,
        slo_percentile=a.slo_percentile,
        output_cv2=cv2,
    )


# ---------------------------------------------------------------------------------------------------
# commands


def cmd_nats_config(a: argparse.Namespace) -> int:
    conf = auth.write_server_files(Path(a.data_dir), tls_cert=a.tls_cert, tls_key=a.tls_key)
    console.print(f"wrote {conf} and {Path(a.data_dir) / 'credentials'} (one file per role; clients use client.json)")
    return 0


def cmd_make_model(a: argparse.Namespace) -> int:
    from .modelmaker import make_checkpoint

    path = make_checkpoint(a.out_dir, a.preset, num_layers=a.layers, seed=a.seed, dtype=a.dtype, shards=a.shards)
    if a.tokenizer:
        from .tokenizer_files import write_byte_tokenizer

        write_byte_tokenizer(path)
    console.print(
        f"wrote {a.preset} checkpoint ({'all' if a.layers is None else a.layers} layers, random weights) to {path}"
    )
    return 0


async def _register(a: argparse.Namespace) -> int:
    async with await _client(a) as c:
        info = await c.register(str(Path(a.path).resolve()), a.name)
        r = info.record
        verb = "registered" if info.created else "already registered"
        console.print(
            f"{verb} [bold]{r.name}[/]: {r.arch.model_type}, {r.arch.num_layers} layers, hidden {r.arch.hidden_size}, "
            f"{r.arch.num_attention_heads}/{r.arch.num_kv_heads} heads, {r.weights.checkpoint_bytes / GIB:.2f} GiB; "
            f"status {r.status}"
        )
        if a.wait:
            with Steps(err_console) as steps:

                def show(rec: ModelRecord) -> None:
                    for gpu_type, text in sorted(rec.profiling.items()):
                        steps.show(gpu_type or rec.name, text)

                done = await c.wait_profiled(r.name, timeout=a.timeout, on_record=show)
            cmap = await c.profile(r.name, done.gpu_type)
            console.print(
                f"profiled on {cmap.gpu_type} ({cmap.device}): {len(cmap.estimates)} configurations estimated, "
                f"{len(cmap.excluded)} excluded, {cmap.cost.gpu_seconds:.1f} GPU-seconds"
            )
    return 0


async def _deploy(a: argparse.Namespace) -> int:
    intent = intent_from_args(a)  # a bad --quality is refused before connecting
    async with await _client(a) as c:
        rep = await c.deploy(
            a.model,
            intent,
            placement=a.placement,
            context_tokens=a.context_tokens,
            gpu_type=a.gpu_type,
            max_batch=a.max_batch,
            kv_tokens=a.kv_tokens,
            config=a.config,
        )
        d = rep.deployment
        if a.json:
            if a.wait:
                await c.wait_ready(d.deployment_id, timeout=a.timeout)
            print_json(rep)
            return 0
        console.print(f"deployment [bold]{d.deployment_id}[/]: {d.config.key()} on {d.gpu_type}")
        console.print(
            f"  up to {d.max_batch} request{'s' if d.max_batch != 1 else ''} at once, context {d.context_tokens} "
            f"tokens, KV pool {d.kv_tokens or d.context_tokens} tokens"
        )
        console.print(f"  why: {escape(rep.why)}")
        if rep.replicas_why:
            others = "".join(f", {o.deployment_id}" for o in rep.others)
            console.print(f"  replicas: {rep.replicas} ({d.deployment_id}{others}): {escape(rep.replicas_why)}")
        for g in d.gpus:
            console.print(
                f"  {g.agent_id} GPU {g.gpu_index}: layers {g.first_layer}-"
                f"{g.first_layer + g.num_layers - 1} ({g.num_layers}), {fmt_gib(g.memory_bytes)} GiB"
            )
        console.print(
            f"  estimated latency {rep.latency_ms:.1f} ms for {d.intent.prompt_tokens}+{d.intent.output_tokens} "
            f"tokens, memory {fmt_gib(d.estimate.total_bytes)} GiB, cost {rep.cost:.4g} ({d.intent.cost_model}); "
            f"decided in {rep.decision_ms:.2f} ms"
        )
        for rj in rep.rejected[:5]:
            console.print(f"  [dim]not {rj.config}: {escape(rj.reason)}[/]")
        if len(rep.rejected) > 5:
            console.print(f"  [dim]... and {len(rep.rejected) - 5} more better-ranked ones that did not fit[/]")
        if rep.quality:
            console.print(f"  quality: {escape(rep.quality)}")
        for rj in [r for r in rep.filtered if not r.reason.startswith("quality:")][:3]:
            console.print(f"  [dim]ruled out {rj.config}: {escape(rj.reason)}[/]")
        by_quality: dict[str, list[str]] = {}  # one line per reason (a variant's TP/PP degrees share it)
        for rj in rep.filtered:
            if rj.reason.startswith("quality:"):
                by_quality.setdefault(rj.reason, []).append(rj.config)
        for reason, configs in list(by_quality.items())[:4]:
            more = f" (and {len(configs) - 1} more of its TP/PP degrees)" if len(configs) > 1 else ""
            console.print(f"  [dim]ruled out {configs[0]}{more}: {escape(reason)}[/]")
        if len(by_quality) > 4:
            console.print(f"  [dim]... and {len(by_quality) - 4} more variants ruled out by quality[/]")
        if a.wait:
            for dep in [d, *rep.others]:
                await c.wait_ready(dep.deployment_id, timeout=a.timeout)
            console.print("  [green]ready[/]")
    return 0


async def _unregister(a: argparse.Namespace) -> int:
    async with await _client(a) as c:
        rep = await c.unregister(a.model)
        console.print(f"{rep.name}: unregistered ({rep.profiles_removed} profile(s) removed)")
    return 0


async def _undeploy(a: argparse.Namespace) -> int:
    async with await _client(a) as c:
        rep = await c.undeploy(a.deployment_id)
        console.print(f"{rep.deployment_id}: {rep.status}")
    return 0


async def _generate(a: argparse.Namespace) -> int:
    from .client import CompletionStream

    async with await _client(a) as c:
        s = CompletionStream()
        async for chunk in c.generate(
            a.model,
            a.prompt,
            max_tokens=a.max_tokens,
            temperature=a.temperature,
            seed=a.seed,
            ignore_eos=a.ignore_eos,
            timeout_s=a.timeout,
            stream=s,
        ):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        done = s.completion
        if done is not None:
            err_console.print(
                f"[dim]{done.completion_tokens} tokens ({done.finish_reason}); queue {done.queue_ms:.1f} ms, "
                f"TTFT {done.ttft_ms:.1f} ms, "
                f"TPOT {done.tpot_ms:.2f} ms, end-to-end {done.e2e_ms:.1f} ms on {done.deployment_id}[/]"
            )
    return 0


def print_json(obj: object) -> None:
    """One JSON document on stdout (``--json``): the wire's own field names."""
    sys.stdout.write(msgspec.json.encode(msgspec.to_builtins(obj)).decode() + "\n")


async def _status_json(c) -> int:
    async def safe(call):
        try:
            return await call()
        except errors.IServeError as e:
            return {"error": {"code": e.code, "message": e.message}}

    print_json(
        {
            "gpus": await c.gpu_loads(1.5),
            "models": await safe(c.models),
            "deployments": await safe(c.deployments),
            "queues": await safe(c.scheduler_stats),
        }
    )
    return 0


async def _status(a: argparse.Namespace) -> int:
    async with await _client(a) as c:
        if a.json:
            return await _status_json(c)
        console.print(gpus_table(await c.gpu_loads(1.5)))
        try:
            models = (await c.models()).models
        except errors.IServeError as e:
            models = []
            err_console.print(f"models: {e}")
        console.print(models_table(models))
        try:
            listing = await c.deployments()
            deps, scaling = listing.deployments, listing.autoscaling
        except errors.IServeError as e:
            deps, scaling = [], []
            err_console.print(f"deployments: {e}")
        try:
            queues = {q.deployment_id: q for q in (await c.scheduler_stats()).queues}
        except errors.IServeError:
            queues = {}
        console.print(deployments_table(deps))
        console.print(queues_table(deps, queues))
        if scaling:
            console.print(autoscale_table(scaling, time.time()))
    return 0


async def _profile_show(a: argparse.Namespace) -> int:
    async with await _client(a) as c:
        cmap = await c.profile(a.model, a.gpu_type)
        if a.json:
            print_json(cmap)
            return 0
        title = (
            f"{cmap.model} on {cmap.gpu_type} (measured on {cmap.device}; context {cmap.context_tokens}; "
            f"latency for {a.prompt_tokens}+{a.output_tokens} tokens)"
        )
        console.print(
            estimates_table(
                cmap.estimates, prompt=a.prompt_tokens, output=a.output_tokens, sort=a.sort, limit=a.limit, title=title
            )
        )
        if cmap.excluded and a.show_excluded:
            console.print(excluded_table(cmap.excluded))
        elif cmap.excluded:
            console.print(
                f"[dim]{len(cmap.excluded)} configurations excluded (--show-excluded lists them with reasons)[/]"
            )
        if cmap.quality is None:
            console.print("[dim]quality cost: not measured (every lossy variant is admitted by --quality any only)[/]")
        elif cmap.quality.error:
            console.print(f"[dim]quality cost: not measured ({escape(cmap.quality.error)})[/]")
        elif not cmap.quality.variants:
            console.print("[dim]quality cost: no lossy variant in this map[/]")
        else:
            console.print(quality_table(cmap.quality))
            console.print(f"[dim]{escape(quality_caption(cmap.quality))}[/]")
        cost = cmap.cost
        console.print(
            f"profiling cost: {cost.gpu_seconds:.1f} GPU-seconds, peak {fmt_gib(cost.peak_bytes)} GiB; "
            f"fingerprints are {', '.join(f'{x:.2%}' for x in cost.fingerprint_fraction)} of the model"
        )
    return 0


# ---------------------------------------------------------------------------------------------------
# parser


def _non_negative(text: str) -> int:
    """A count flag's parser (argparse also applies it to a default read from the environment)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give 0 or more")
    return n


def add_nats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats-url", default=default_url(), help="NATS server [env ISERVE_NATS_URL]")
    p.add_argument(
        "--nats-creds",
        default=default_creds(),
        help=f"NATS credentials file (`iserve up` writes <data dir>/credentials/client.json) [env {auth.CREDS_ENV}]",
    )


def add_intent(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intent", default="min-cost", choices=INTENT_KINDS, help="what to optimize (default min-cost)")
    p.add_argument(
        "--cost-model", default="mem-x-latency", choices=COST_MODELS, help="how cost is counted (paper section 4.1)"
    )
    p.add_argument("--slo-ms", type=float, default=None, help="latency SLO for --intent latency-slo")
    p.add_argument(
        "--budget", type=float, default=None, help="cost budget for --intent cost-budget, in --cost-model units"
    )
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length latency is estimated for")
    p.add_argument("--output-tokens", type=int, default=128, help="output length latency is estimated for")
    p.add_argument(
        "--quality",
        default="default",
        help="lossy variants the intent admits: default (measured within KL <= 0.01, top-1 >= 95%%), lossless, "
        "any (the paper's free search), max-kl=X and/or min-top1=Y (docs/quality.md)",
    )
    p.add_argument(
        "--rate", type=float, default=0.0, help="expected requests/s: sizes the replicas (0: none, one replica)"
    )
    p.add_argument("--slo-percentile", type=float, default=95.0, help="share of requests latency-slo meets the SLO for")
    p.add_argument("--output-cv2", type=float, default=1.0, help="spread of output lengths (0: equal, 1: exponential)")
    p.add_argument("--trace", default="", help="take the load (rate, lengths) from a trace: code, conv or a CSV")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iserve", description="Intent-based LLM serving over NATS.")
    p.add_argument("--version", action="version", version=f"iserve {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("up", help="start NATS and every service; Ctrl-C stops them")
    from .up import add_arguments as add_up

    add_up(s)

    s = sub.add_parser("nats-config", help="write NATS credentials per role and the server config that checks them")
    s.add_argument("--data-dir", default=str(default_data_dir()), help="where credentials/ and nats/nats.conf go")
    s.add_argument("--tls-cert", default="", help="the server speaks TLS with this certificate (PEM)")
    s.add_argument("--tls-key", default="", help="the private key of --tls-cert (PEM)")

    s = sub.add_parser("demo", help="start the stack, make/register/profile/deploy a model, stream a completion, stop")
    from .demo import add_arguments as add_demo

    add_demo(s)

    s = sub.add_parser("make-model", help="write a random-weight checkpoint of a known architecture")
    s.add_argument("out_dir")
    s.add_argument("--preset", default="tiny-llama")
    s.add_argument("--layers", type=int, default=None, help="override the number of hidden layers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    s.add_argument("--shards", type=int, default=1)
    s.add_argument(
        "--tokenizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write a byte-level tokenizer.json with a chat template (for the HTTP API's chat endpoint)",
    )

    s = sub.add_parser("unregister", help="forget a model and its profiles (refused while it is deployed)")
    s.add_argument("model")
    add_nats(s)

    s = sub.add_parser("register", help="register a checkpoint folder (config.json + safetensors)")
    s.add_argument("path")
    s.add_argument("--name", default="", help="model name (default: the folder name)")
    s.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="wait for profiling to finish")
    s.add_argument(
        "--timeout-s", "--timeout", dest="timeout", type=float, default=1800.0, help="how long to wait for profiling"
    )
    add_nats(s)

    s = sub.add_parser("deploy", help="deploy a profiled model with an intent")
    s.add_argument("--json", action="store_true", help="the deployer's reply as JSON")
    s.add_argument("model")
    add_intent(s)
    s.add_argument(
        "--placement", default="", choices=values(PlacementChoice), help="placement policy (default: the deployer's)"
    )
    s.add_argument(
        "--context-tokens", type=int, default=0, help="the deployment's context (KV cache) in tokens; 0: the profile's"
    )
    s.add_argument("--gpu-type", default="", help="deploy on this GPU type only (default: the best of those profiled)")
    s.add_argument(
        "--max-batch",
        type=_non_negative,
        default=0,
        help="requests the replica runs at once; 0: the deployer's default, 1: one at a time",
    )
    s.add_argument(
        "--kv-tokens",
        type=_non_negative,
        default=0,
        help="the replica's KV pool in tokens; 0: max batch x context, never short",
    )
    s.add_argument(
        "--config",
        default="",
        help="pin this configuration (a key `iserve profile show` lists, e.g. tp1-pp1-wint8-kvfp16-pnone)",
    )
    s.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="wait until the worker is ready")
    s.add_argument(
        "--timeout-s", "--timeout", dest="timeout", type=float, default=600.0, help="how long to wait until ready"
    )
    add_nats(s)

    s = sub.add_parser("undeploy", help="stop a deployment and free its GPUs")
    s.add_argument("deployment_id")
    add_nats(s)

    s = sub.add_parser("generate", help="stream a completion from a deployed model")
    s.add_argument("model")
    s.add_argument("prompt")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    s.add_argument(
        "--timeout-s", dest="timeout", type=float, default=300.0, help="the request's timeout (queued and running)"
    )
    add_nats(s)

    s = sub.add_parser("status", help="GPUs, models, deployments and queues")
    s.add_argument("--json", action="store_true", help="one JSON document instead of tables")
    add_nats(s)

    s = sub.add_parser("profile", help="configuration maps")
    psub = s.add_subparsers(dest="profile_command", required=True)
    ps = psub.add_parser("show", help="print a model's configuration map as a table")
    ps.add_argument("--json", action="store_true", help="the whole configuration map as JSON")
    ps.add_argument("model")
    ps.add_argument("--gpu-type", default="")
    ps.add_argument("--sort", default="latency_ms", choices=ESTIMATE_COLUMNS)
    ps.add_argument("--limit", type=int, default=0, help="show only the first N rows")
    ps.add_argument("--prompt-tokens", type=int, default=512)
    ps.add_argument("--output-tokens", type=int, default=128)
    ps.add_argument("--show-excluded", action="store_true")
    add_nats(ps)

    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service in the foreground (its own flags follow)", add_help=False)
    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=f"{text} (its own flags follow; --help lists them)", add_help=False)
    add_env_twins(p)  # every flag above reads ISERVE_<FLAG> when set
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:  # pass the tool's own flags through untouched
        mod = __import__(PASSTHROUGH[argv[0]], fromlist=["main"])
        try:
            code = mod.main(argv[1:])
        except errors.IServeError as e:
            err_console.print(f"[red]error[/] {escape(str(e))}")
            code = 2
        sys.exit(code or 0)
    a = build_parser().parse_args(argv)
    handlers = {
        "up": lambda: __import__("iserve.up", fromlist=["run"]).run(a),
        "demo": lambda: __import__("iserve.demo", fromlist=["run"]).run(a),
        "make-model": lambda: cmd_make_model(a),
        "nats-config": lambda: cmd_nats_config(a),
        "register": lambda: run_async(_register(a)),
        "deploy": lambda: run_async(_deploy(a)),
        "undeploy": lambda: run_async(_undeploy(a)),
        "unregister": lambda: run_async(_unregister(a)),
        "generate": lambda: run_async(_generate(a)),
        "status": lambda: run_async(_status(a)),
        "profile": lambda: run_async(_profile_show(a)),
    }
    try:
        code = handlers[a.command]()
    except errors.IServeError as e:
        err_console.print(f"[red]error[/] {escape(str(e))}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code or 0)
