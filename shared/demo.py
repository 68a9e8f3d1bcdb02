"""``iserve demo``: the whole flow in one command, through the real services and a real NATS.

1. start the stack (embedded nats-server with JetStream, GPU agent, fingerprint, deployer, scheduler,
   each its own process; simulated GPUs when this machine has no NVIDIA GPU),
2. make a small random-weight Llama checkpoint and register it,
3. wait while its 1- and 2-layer fingerprints are profiled and every configuration is estimated,
4. deploy it with an intent and print the chosen configuration and why,
5. stream a completion token by token, print its timings, and stop everything.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .messages import INTENT_KINDS, Intent
from .runtime import run_async
from .tables import estimates_table

console = Console()


def has_nvidia_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return n > 0
    except Exception:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    # No environment twins for these two: ISERVE_DATA_DIR and ISERVE_NATS_PORT configure `iserve up`,
    # whose data and port the demo must not take over.
    p.add_argument(
        "--data-dir", default="", help="keep the stack's data here (default: a temporary folder, removed afterwards)"
    ).env_twin = False  # type: ignore[attr-defined]
    p.add_argument(
        "--nats-port", type=int, default=0, help="port of the embedded NATS server (default: a free one)"
    ).env_twin = False  # type: ignore[attr-defined]
    p.add_argument(
        "--simulate-gpus",
        default="",
        help="simulated GPUs, e.g. 4x24GB (default: real GPUs if any, else 4x24GB)",
    )
    p.add_argument("--preset", default="tiny-llama", help="architecture of the demo model (random weights)")
    p.add_argument("--layers", type=int, default=8, help="hidden layers of the demo model")
    p.add_argument(
        "--intent", default="min-latency", choices=[k for k in INTENT_KINDS if k not in ("latency-slo", "cost-budget")]
    )
    p.add_argument("--prompt", default="The three components of iServe are")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--timeout-s", "--timeout", dest="timeout", type=float, default=600.0, help="give up after this many seconds"
    )


async def flow(url: str, creds: str, model_dir: Path, a: argparse.Namespace) -> None:
    from .client import Client, CompletionStream

    async with await Client.connect(url, "iserve-demo", creds=creds or None) as c:
        # the services start in parallel: wait until each answers
        console.rule("[bold]1. stack")
        loads = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await c.models()
                await c.deployments()
                await c.scheduler_stats()
                loads = await c.gpu_loads(1.2)
                if loads:
                    break
            except Exception:
                await asyncio.sleep(0.5)
        if not loads:
            raise RuntimeError("the services did not come up within 60 s; see the logs in the data folder")
        kind = "simulated" if loads[0].simulated else "real"
        console.print(
            f"NATS at {url}; {len(loads)} {kind} GPU(s) of type {loads[0].gpu_type}, "
            f"{loads[0].total_bytes / 2**30:.0f} GiB each"
        )

        console.rule("[bold]2. register")
        info = await c.register(str(model_dir))
        r = info.record
        console.print(
            f"registered {r.name}: {r.arch.model_type}, {r.arch.num_layers} layers, "
            f"{r.weights.checkpoint_bytes / 2**20:.1f} MiB of weights"
        )

        console.rule("[bold]3. profile fingerprints")
        t0 = time.monotonic()
        done = await c.wait_profiled(r.name, timeout=a.timeout)
        cmap = await c.profile(r.name, done.gpu_type)
        console.print(
            "profiled 1- and 2-layer fingerprints "
            f"({', '.join(f'{x:.1%}' for x in cmap.cost.fingerprint_fraction)} of the model) on {cmap.device} "
            f"in {time.monotonic() - t0:.1f} s: {len(cmap.estimates)} configurations estimated, "
            f"{len(cmap.excluded)} excluded with reasons"
        )
        console.print(
            estimates_table(
                cmap.estimates,
                prompt=512,
                output=128,
                limit=8,
                title="fastest estimated configurations (512 in, 128 out)",
            )
        )

        console.rule(f"[bold]4. deploy with intent {a.intent}")
        rep = await c.deploy(r.name, Intent(kind=a.intent))
        d = rep.deployment
        placed = ", ".join(f"{g.agent_id}/GPU{g.gpu_index} ({g.num_layers} layers)" for g in d.gpus)
        console.print(f"chose [bold]{d.config.key()}[/] on {placed}")
        console.print(f"why: {escape(rep.why)}")
        await c.wait_ready(d.deployment_id, timeout=a.timeout)
        console.print(f"worker {d.worker_id} is ready")

        console.rule("[bold]5. stream a completion")
        console.print(f"[dim]prompt:[/] {a.prompt}")
        console.print("[dim](random weights, so the text is noise; the tokens are real)[/]")
        s = CompletionStream()
        async for chunk in c.generate(r.name, a.prompt, max_tokens=a.max_tokens, ignore_eos=True, stream=s):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        comp = s.completion
        assert comp is not None, "the stream ended without its completion"
        console.print(
            f"{comp.completion_tokens} tokens streamed; TTFT {comp.ttft_ms:.1f} ms, TPOT {comp.tpot_ms:.2f} ms, "
            f"end-to-end {comp.e2e_ms:.1f} ms (estimated TPOT for this configuration: {d.estimate.tpot_ms:.2f} ms)"
        )
        console.rule("[bold]6. the same model over the OpenAI-compatible HTTP API")
        body = {
            "model": r.name,
            "messages": [{"role": "user", "content": a.prompt}],
            "max_tokens": 12,
            "temperature": 0,
        }
        reply = await asyncio.to_thread(_post_json, f"{a.http_url}/chat/completions", body)
        console.print(
            f"[dim]POST {a.http_url}/chat/completions ->[/] {escape(repr(reply['choices'][0]['message']['content']))}"
        )
        console.print(
            "try it against `iserve up` (it prints the URL; the key is in ~/.iserve/api_key):\n"
            "  curl http://127.0.0.1:8000/v1/chat/completions "
            '-H "Authorization: Bearer $(cat ~/.iserve/api_key)" -H "Content-Type: application/json" '
            f"""-d '{{"model": "{r.name}", "messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'"""
        )
        await c.undeploy(d.deployment_id)


def _post_json(url: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def run(a: argparse.Namespace) -> int:
    from .modelmaker import make_checkpoint
    from .natsserver import free_port
    from .stack import Stack, StackOptions
    from .tokenizer_files import write_byte_tokenizer

    tmp = None
    if a.data_dir:
        data_dir = Path(a.data_dir)
    else:
        tmp = tempfile.mkdtemp(prefix="iserve-demo-")
        data_dir = Path(tmp)
    simulate = a.simulate_gpus or ("" if has_nvidia_gpu() else "4x24GB")
    model_dir = data_dir / "models" / "demo-llama"
    if not (model_dir / "config.json").is_file():
        make_checkpoint(model_dir, a.preset, num_layers=a.layers, seed=0)
    if not (model_dir / "tokenizer.json").is_file():
        write_byte_tokenizer(model_dir)  # a real tokenizer.json, with a chat template
    http_port = free_port()
    a.http_url = f"http://127.0.0.1:{http_port}/v1"
    opts = StackOptions(
        http_port=http_port,
        no_auth=True,  # the demo's gateway listens on loopback only
        data_dir=data_dir,
        nats_port=a.nats_port,
        simulate_gpus=simulate,
        agent_id="demo-agent",
        log_to_files=True,
        # small measurements: the demo model is tiny and may run on a laptop CPU
        fingerprint_args=["--prompt-lengths", "32,128", "--output-lengths", "8,24", "--context-tokens", "1024"],
    )
    console.print(f"[bold]iserve demo[/]: data and service logs in {data_dir}")
    stack = Stack(opts).start()
    code = 0
    try:
        run_async(asyncio.wait_for(flow(stack.url, stack.creds(), model_dir, a), a.timeout))
        console.rule("[bold]done")
    except KeyboardInterrupt:
        code = 130
    except Exception as e:
        console.print(f"[red]demo failed:[/] {escape(str(e))} (service logs: {data_dir / 'logs'})")
        code = 1
    finally:
        stack.stop()
        if stack.failed:
            console.print(f"[red]{stack.failed}[/]")
            code = code or 1
        if tmp and code == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return code
