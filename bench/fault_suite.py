"""Fault suite: ``kill -9`` each part of the real stack under steady load and account for every request.

    python bench/fault_suite.py --out OUT                       # every fault, then the hostile inputs
    python bench/fault_suite.py --out OUT --faults worker,scheduler --loops 2

It starts ``iserve up``'s stack (``iserve.stack.Stack``: an authenticated nats-server and every service
as its own process, simulated GPUs, workers on the CPU), registers and deploys a tiny random-weight
checkpoint, then runs ``--loops`` client loops, each sending short ``generate`` requests one after the
other, while it kills one part after another. Every request ends in exactly one of: completed, a
coded ``IServeError`` (by code), or lost (neither within its timeout plus ``--margin-s``). A request
counts in the window of the last fault killed before it ended. Time to serve again: from the kill to
the completion of the first request submitted after it (after the old worker exited, for a fault that
takes the worker down with it: the agent's workers exit a moment after it). Then the hostile inputs go to the live stack
(each must get a coded error, and the stack must serve afterwards). Writes ``results.json`` and
``table.md`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _importable import ensure_importable  # noqa: E402

ensure_importable("iserve.stack", script="fault_suite.py")

from iserve import auth, bus, errors, subjects  # noqa: E402
from iserve.client import Client, CompletionStream  # noqa: E402
from iserve.messages import Accepted, Configuration, InferRequest, LaunchWorker, encode  # noqa: E402
from iserve.settings import add_flags, from_args, option  # noqa: E402
from iserve.stack import Stack, StackOptions, api_key_of  # noqa: E402

SERVICE_FAULTS = ("gpu-agent", "deployer", "scheduler", "gateway", "fingerprint")
FAULTS = ("worker", *SERVICE_FAULTS, "nats-server")
QUICK_FAULTS = ("worker", "scheduler", "nats-server", "deployer")
WORKER_FAULTS = ("worker", "gpu-agent")  # faults that take the worker down with them
# Fast reconciliation for every service (each reads the twins of its own flags).
FAST_ENV = {
    "ISERVE_RECONCILE_S": "0.5",  # deployer
    "ISERVE_GPU_STALE_S": "2",  # deployer, fingerprint
    "ISERVE_INTERVAL_S": "0.25",  # gpu-agent
    "ISERVE_REFRESH_S": "0.5",  # scheduler
}
FAST_PROFILE = [
    "--prompt-lengths",
    "16,32",
    "--output-lengths",
    "4,8",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--replay-depth",
    "0",
    "--gpu-warmup-s",
    "0",
    "--quality-method",  # faults, not quality, are measured here (docs/quality.md has its own tests)
    "off",
]


@dataclass
class SuiteConfig:
    out: Path = option(Path("fault-suite"), help="folder for results.json and table.md", env="ISERVE_FAULTS_OUT")
    faults: str = option(",".join(FAULTS), help="faults to apply, in order", env="ISERVE_FAULTS_FAULTS")
    loops: int = option(4, help="concurrent client loops", env="ISERVE_FAULTS_LOOPS")
    max_tokens: int = option(8, help="tokens per request (ignore_eos)", env="ISERVE_FAULTS_MAX_TOKENS")
    request_timeout_s: float = option(20.0, help="timeout_s of each request", env="ISERVE_FAULTS_REQUEST_TIMEOUT_S")
    margin_s: float = option(
        10.0, help="a request silent past its timeout by this is lost", env="ISERVE_FAULTS_MARGIN_S"
    )
    warmup_s: float = option(5.0, help="load before the first fault (the baseline)", env="ISERVE_FAULTS_WARMUP_S")
    settle_s: float = option(3.0, help="load between recovery and the next fault", env="ISERVE_FAULTS_SETTLE_S")
    recover_timeout_s: float = option(
        90.0, help="a fault not served again within this fails the suite", env="ISERVE_FAULTS_RECOVER_TIMEOUT_S"
    )
    max_batch: int = option(4, help="the deployment's batch size", env="ISERVE_FAULTS_MAX_BATCH")
    layers: int = option(2, help="hidden layers of the tiny checkpoint", env="ISERVE_FAULTS_LAYERS")
    hostile: bool = option(True, help="send the hostile inputs after the faults", env="ISERVE_FAULTS_HOSTILE")
    data_dir: str = option(
        "", help="the stack's data dir, kept (default: a temporary one)", env="ISERVE_FAULTS_DATA_DIR"
    )


@dataclass
class Outcome:
    start: float
    end: float
    kind: str  # completed | error | lost
    code: str = ""
    detail: str = ""


@dataclass
class Load:
    """``loops`` client loops sending one request after the other until ``stop`` is set."""

    client: Client
    model: str
    cfg: SuiteConfig
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._loop(i)) for i in range(self.cfg.loops)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    async def one(self, prompt: str) -> Outcome:
        t0 = time.monotonic()
        s = CompletionStream()

        async def consume() -> None:
            async for _ in self.client.generate(
                self.model,
                prompt,
                max_tokens=self.cfg.max_tokens,
                ignore_eos=True,
                timeout_s=self.cfg.request_timeout_s,
                stream=s,
            ):
                pass

        try:
            await asyncio.wait_for(consume(), self.cfg.request_timeout_s + self.cfg.margin_s)
        except errors.IServeError as e:
            return Outcome(t0, time.monotonic(), "error", e.code, e.message[:200])
        except asyncio.TimeoutError:
            return Outcome(t0, time.monotonic(), "lost", "", "no outcome within timeout + margin")
        except Exception as e:  # neither completed nor coded: lost too
            return Outcome(t0, time.monotonic(), "lost", "", f"uncoded {type(e).__name__}: {e}"[:200])
        done = s.completion
        if done is None or done.completion_tokens != self.cfg.max_tokens:
            return Outcome(t0, time.monotonic(), "lost", "", f"completion without its tokens: {done}"[:200])
        return Outcome(t0, time.monotonic(), "completed")

    async def _loop(self, i: int) -> None:
        n = 0
        while not self.stop.is_set():
            o = await self.one(f"loop {i} request {n}")
            self.outcomes.append(o)
            n += 1
            if o.kind != "completed":
                await asyncio.sleep(0.2)  # a dead service answers at once: do not spin


# ---------------------------------------------------------------------------------------------- faults


def worker_pids(url: str) -> list[int]:
    """Serving worker processes of the stack at ``url`` (their command line names its NATS URL)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"iserve.gpu_agent.worker" in cmd and b"serve" in cmd and url.encode() in cmd:
            pids.append(int(p.name))
    return pids


def kill(stack: Stack, fault: str) -> list[int]:
    """``kill -9`` the part named ``fault``; returns the pids killed."""
    if fault == "worker":
        pids = worker_pids(stack.url)
    elif fault == "nats-server":
        assert stack.nats is not None and stack.nats.proc is not None
        pids = [stack.nats.proc.pid]
    else:
        child = next(c for c in stack.children if c.name == fault)
        assert child.proc is not None, f"{fault} is not running"
        pids = [child.proc.pid]
    if not pids:
        raise RuntimeError(f"no process to kill for {fault}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def restarted(stack: Stack, fault: str, old: list[int]) -> bool:
    """Whether the killed part runs again (a worker: any serving worker other than the killed ones)."""
    if fault in WORKER_FAULTS and not set(worker_pids(stack.url)) - set(old):
        return False
    if fault == "worker":
        return True
    if fault == "nats-server":
        assert stack.nats is not None
        return stack.nats.running() and stack.nats.proc is not None and stack.nats.proc.pid not in old
    child = next(c for c in stack.children if c.name == fault)
    return child.proc is not None and child.proc.poll() is None and child.proc.pid not in old


def served_again(load: Load, t_kill: float) -> float | None:
    """Seconds from the kill to the completion of the first request submitted after it."""
    ends = [o.end for o in load.outcomes if o.kind == "completed" and o.start >= t_kill]
    return min(ends) - t_kill if ends else None


async def apply_faults(stack: Stack, load: Load, faults: list[str], cfg: SuiteConfig, say=print) -> list[dict]:
    """Kill each part in turn; wait until it is served again and restarted, then ``settle_s``."""
    windows = []
    for fault in faults:
        old_workers = worker_pids(stack.url) if fault in WORKER_FAULTS else []
        t_kill = time.monotonic()
        pids = kill(stack, fault)
        t_down = t_kill if not old_workers else None  # a dead agent's workers exit a moment later
        say(f"killed {fault} (pid {', '.join(map(str, pids))})")
        deadline = t_kill + cfg.recover_timeout_s
        back = None
        while time.monotonic() < deadline:
            if t_down is None and not set(old_workers) & set(worker_pids(stack.url)):
                t_down = time.monotonic()
            back = None if t_down is None else served_again(load, t_down)
            back = None if back is None else back + t_down - t_kill
            if back is not None and restarted(stack, fault, pids + old_workers):
                break
            await asyncio.sleep(0.2)
        windows.append(
            {
                "fault": fault,
                "t_kill": t_kill,
                "pids": pids,
                "restarted": restarted(stack, fault, pids + old_workers),
                "serve_again_s": None if back is None else round(back, 2),
            }
        )
        say(f"  {fault}: served again after {back if back is None else round(back, 2)} s")
        if back is None:
            break  # the stack does not serve: later faults would measure nothing
        await asyncio.sleep(cfg.settle_s)
    return windows


def tally(outcomes: list[Outcome], windows: list[dict], t0: float) -> list[dict]:
    """Per window (``baseline`` before the first fault, then one per fault): what the requests ending
    in it came to. A window runs from its kill to the next kill."""
    bounds = [("baseline", t0, None)] + [(w["fault"], w["t_kill"], w) for w in windows]
    rows = []
    for i, (name, start, w) in enumerate(bounds):
        stop = bounds[i + 1][1] if i + 1 < len(bounds) else float("inf")
        mine = [o for o in outcomes if start <= o.end < stop]
        kinds = Counter(o.kind for o in mine)
        rows.append(
            {
                "fault": name,
                "requests": len(mine),
                "completed": kinds["completed"],
                "errors": dict(sorted(Counter(o.code for o in mine if o.kind == "error").items())),
                "lost": kinds["lost"],
                "not_completed": [
                    [round(o.start - start, 2), round(o.end - start, 2), o.code or o.kind, o.detail[:120]]
                    for o in mine
                    if o.kind != "completed"
                ][:12],
                "serve_again_s": w["serve_again_s"] if w is not None else None,
                "window_s": round(
                    (stop if stop != float("inf") else max((o.end for o in mine), default=start)) - start, 1
                ),
                "restarted": w["restarted"] if w is not None else None,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- hostile


async def _coded(what: str, call) -> dict:
    """Run ``call``; the row records the coded error it raised (``ok``), or what it did instead."""
    try:
        got = await asyncio.wait_for(call(), 60)
    except errors.IServeError as e:
        return {"input": what, "code": e.code, "reply": e.message[:240], "ok": True}
    except Exception as e:
        return {"input": what, "code": "", "reply": f"uncoded {type(e).__name__}: {e}"[:240], "ok": False}
    return {"input": what, "code": "", "reply": f"accepted: {got!r}"[:240], "ok": False}


def _model_copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


async def hostile_inputs(stack: Stack, client: Client, model: str, model_dir: Path, tmp: Path) -> list[dict]:
    rows = []
    fifo = _model_copy(model_dir, tmp / "fifo-model")
    for f in fifo.glob("*.safetensors*"):
        f.unlink()
    os.mkfifo(fifo / "model.safetensors")
    rows.append(await _coded("FIFO named model.safetensors", lambda: client.register(str(fifo), "hostile-fifo")))

    deep = _model_copy(model_dir, tmp / "deep-model")
    cfg = json.loads((deep / "config.json").read_text())
    cfg["num_hidden_layers"] = 1_000_000
    (deep / "config.json").write_text(json.dumps(cfg))
    rows.append(await _coded("num_hidden_layers: 1000000", lambda: client.register(str(deep), "hostile-deep")))

    async def gen(**kw) -> None:
        async for _ in client.generate(model, "x", max_tokens=2, **kw):
            pass

    rows.append(await _coded("prompt_tokens: 360000000", lambda: gen(prompt_tokens=360_000_000)))
    rows.append(await _coded("timeout_s: 1e308", lambda: gen(timeout_s=1e308)))
    sys_subject = subjects.WORKER_EXITED
    req = InferRequest(request_id="hostile-stream-to", model=model, prompt="x", max_tokens=2, stream_to=sys_subject)
    rows.append(
        await _coded(f"stream_to: {sys_subject}", lambda: bus.request(client.nc, subjects.INFER, req, Accepted))
    )
    rows.append(await _forged_launch(stack, model, model_dir))
    return rows


async def _forged_launch(stack: Stack, model: str, model_dir: Path) -> dict:
    """A launch published with the client's credentials: the server must refuse it (no worker starts)."""
    import nats

    creds = auth.load_credentials(stack.creds("client"))
    said: list[str] = []

    async def on_error(e: Exception) -> None:
        said.append(str(e))

    nc = await nats.connect(
        stack.url,
        user=creds.user,
        password=creds.password,
        inbox_prefix=auth.inbox_prefix(creds.user),
        error_cb=on_error,
    )
    wid = "w-hostile-launch"
    launch = LaunchWorker(
        worker_id=wid,
        deployment_id="hostile",
        model=model,
        model_path=str(model_dir),
        config=Configuration(),
        stages=[],
    )
    subject = subjects.agent_launch(stack.opts.agent_id)
    reply = ""
    try:
        await nc.request(subject, encode(launch), timeout=3)
        reply = "answered"
    except Exception as e:
        reply = f"no reply ({type(e).__name__})"
    finally:
        await nc.close()
    started = (stack.opts.data_dir / "agent" / "workers" / f"{wid}.log").exists() or any(
        wid.encode() in Path(f"/proc/{p}/cmdline").read_bytes() for p in worker_pids(stack.url)
    )
    violation = next((s for s in said if "permissions violation" in s.lower()), "")
    return {
        "input": f"launch on {subject} with client credentials",
        "code": "permissions_violation" if violation else "",
        "reply": f"{reply}; server: {violation or ', '.join(said) or 'nothing'}; worker started: {started}"[:240],
        "ok": bool(violation) and not started and reply != "answered",
    }


# ---------------------------------------------------------------------------------------------- the run


def make_model(dest: Path, layers: int) -> Path:
    from iserve.modelmaker import make_checkpoint
    from iserve.tokenizer_files import write_byte_tokenizer

    path = make_checkpoint(dest, "tiny-llama", num_layers=layers)
    write_byte_tokenizer(path)
    return path


def stack_options(data_dir: Path) -> StackOptions:
    from iserve.natsserver import free_port

    return StackOptions(
        data_dir=data_dir,
        simulate_gpus="1x24GB",
        gpu_type="sim-24GB",
        log_to_files=True,
        log_level="info",
        extra_env=FAST_ENV,
        fingerprint_args=FAST_PROFILE,
        http_port=free_port(),
        api_key=api_key_of(data_dir),
    )


async def deploy_model(stack: Stack, model_dir: Path, cfg: SuiteConfig, say=print) -> tuple[Client, str]:
    t0 = time.monotonic()
    deadline = time.monotonic() + 120
    client = await Client.connect(stack.url, "fault-suite", creds=stack.creds(), give_up_after=30)
    while True:  # the services start in parallel with this
        try:
            info = await client.register(str(model_dir), "fault-tiny")
            break
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    say(f"registered after {time.monotonic() - t0:.1f} s")
    await client.wait_profiled(info.record.name, timeout=300)
    say(f"profiled after {time.monotonic() - t0:.1f} s")
    rep = await client.deploy(info.record.name, max_batch=cfg.max_batch, context_tokens=256)
    await client.wait_ready(rep.deployment.deployment_id, timeout=120)
    say(f"ready after {time.monotonic() - t0:.1f} s")
    return client, info.record.name


async def run_suite(cfg: SuiteConfig, say=print) -> dict:
    faults = [f.strip() for f in cfg.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    tmp = Path(tempfile.mkdtemp(prefix="iserve-faults-"))
    data_dir = Path(cfg.data_dir) if cfg.data_dir else tmp / "stack"
    t_setup = time.monotonic()
    model_dir = make_model(tmp / "model", cfg.layers)
    with Stack(stack_options(data_dir)) as stack:
        client, model = await deploy_model(stack, model_dir, cfg, say)
        say(f"stack up, {model} deployed after {time.monotonic() - t_setup:.1f} s")
        load = Load(client, model, cfg)
        t0 = time.monotonic()
        load.start()
        await asyncio.sleep(cfg.warmup_s)
        windows = await apply_faults(stack, load, faults, cfg, say)
        await load.finish()
        rows = tally(load.outcomes, windows, t0)
        hostile = await hostile_inputs(stack, client, model, model_dir, tmp) if cfg.hostile else []
        after = await load.one("still serving?") if cfg.hostile else None
        await client.close()
        failed = stack.failed
    result = {
        "config": {k: str(v) for k, v in asdict(cfg).items()},
        "stack_env": FAST_ENV,
        "faults": rows,
        "hostile": hostile,
        "serves_after_hostile": None if after is None else after.kind == "completed",
        "stack_failed": failed,
        "total_s": round(time.monotonic() - t_setup, 1),
    }
    bad = any(r["lost"] for r in rows) or any(r["serve_again_s"] is None for r in rows[1:]) or len(rows) <= len(faults)
    if bad or not cfg.data_dir:
        logs = data_dir / "logs"
        if bad and logs.is_dir():
            shutil.copytree(logs, cfg.out / "logs", dirs_exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def table(result: dict) -> str:
    lines = [
        "| fault | requests | completed | coded errors | lost | served again after (s) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in result["faults"]:
        errs = ", ".join(f"{k} {v}" for k, v in r["errors"].items()) or "-"
        again = "-" if r["serve_again_s"] is None else f"{r['serve_again_s']:.2f}"
        name = r["fault"] if r["fault"] == "baseline" else f"kill -9 {r['fault']}"
        lines.append(f"| {name} | {r['requests']} | {r['completed']} | {errs} | {r['lost']} | {again} |")
    if result["hostile"]:
        lines += ["", "| hostile input | reply | coded |", "|---|---|---|"]
        for h in result["hostile"]:
            reply = h["reply"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {h['input']} | `{h['code'] or '-'}`: {reply} | {'yes' if h['ok'] else 'NO'} |")
        lines.append(f"\nServes after the hostile inputs: {result['serves_after_hostile']}")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (out / "table.md").write_text(text)
    return text


def parse(argv: list[str] | None = None) -> SuiteConfig:
    p = argparse.ArgumentParser(prog="python bench/fault_suite.py", description=__doc__.split("\n")[0])
    add_flags(p, SuiteConfig)
    return from_args(SuiteConfig, p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    result = asyncio.run(run_suite(cfg))
    print(write(result, cfg.out))
    ok = all(r["lost"] == 0 for r in result["faults"]) and all(h["ok"] for h in result["hostile"])
    return 0 if ok and not result["stack_failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
