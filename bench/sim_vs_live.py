"""The trace simulator against the live system: one small scenario run both ways on this machine
(target: simulated vs measured median and p95 latency within 10%).

1. **Live stack.** ``iserve.stack`` (what ``iserve up`` runs) with an embedded nats-server: the GPU
   agent (NVML on CUDA; ``--tiny``: one simulated 24 GB GPU, workers on the CPU), the deployer and
   the scheduler as their own processes. The fingerprint service runs in this process (the same
   ``FingerprintService``) so that its configuration space can be narrowed: by default fp16 only
   (``--formats fp16``), the format whose fingerprint estimates are the most accurate
   (docs/fingerprint.md), so that the comparison measures the simulator and not the estimate of a
   quantized format; ``--formats all`` profiles everything the engine can run.
2. **Models.** ``--models`` presets (default ``llama-2-7b``; tiny ``tiny-llama``) are written with
   random weights (a repeated preset is hard-linked under a second name), registered and profiled
   by the fingerprint service; the maps it stored are fetched (``Client.profile``) and saved.
3. **Workload.** A slice of an Azure trace (default ``code``, the bursty one), compressed as the
   paper does (``traces.compress``; rate and aggregation arguments), ``--duration-s`` long, fixed
   ``--seed``. With ``--start-s auto`` (default) the slice is the one whose load, as the simulator
   computes it from the stored map, is closest to ``--target-util`` (0.5) among slices whose queues
   drain soon after they end: busy, not hopelessly overloaded, and the trace's own burstiness.
4. **Live run.** ``loadgen.replay`` (the ``iserve loadgen`` code) deploys every model before the
   replay (``deploy_every_s = 0``) with ``--intent`` and replays the slice open loop, recording
   every request.
5. **Simulation.** ``loadgen.simulator`` on exactly the requests the live run sent (their actual
   send times, lengths and models), the maps the live stack stored, every model deployed at t = 0
   in the configuration the live deployer chose (system ``static``, placed by iServe's planner;
   iServe's own decision is also simulated and must agree), on as many GPUs of the maps' type.
6. **Comparison.** TTFT, TPOT, end-to-end latency, queueing delay and the worker's service time:
   median and p95, live vs simulated, error ``(sim - live) / live``. Over requests that succeeded
   in both. Target: within 10% for the median and p95 of end-to-end latency.

Time (``--budget-s``, default 480): model writing overlaps the stack's start; the replay's length is
cut to what the budget leaves after profiling (``--duration-s`` is the most), and a stop at the
budget ends the replay keeping what was recorded. Estimated on an H100 for Llama-2-7B fp16: ~20 s to
write the checkpoint, ~40 s to profile (worker start, one variant, 5 repeats), ~30 s to deploy,
``--duration-s`` 240 s of replay plus the drain, ~15 s to stop: about 6 to 7 minutes.

Usage::

    python3 bench/sim_vs_live.py --out $OUT --budget-s 480        # on a GPU
    python3 bench/sim_vs_live.py --tiny --out /tmp/simlive          # CPU check of the script

Output (``--out``): ``sim_vs_live.json`` (meta, chosen slice, choices, the table, every request
live and simulated), ``sim_vs_live.txt`` (the table), ``live/`` (the live run directory:
``meta.json``, ``requests.jsonl``, ``deployments.jsonl``, ``gpus.jsonl``), ``maps/<model>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _importable import ensure_importable  # noqa: E402

METRICS = [  # (row label, RequestRecord field, only requests with more than one output token)
    ("TTFT", "ttft_ms", False),
    ("TPOT", "tpot_ms", True),
    ("e2e latency", "e2e_ms", False),
    ("queueing delay", "queue_ms", False),
    ("service (worker)", "worker_e2e_ms", False),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("OUT", "simlive-out"), help="output folder (default $OUT, else ./simlive-out)"
    )
    p.add_argument(
        "--budget-s", type=float, default=0.0, help="everything ends within this many seconds (default 480; tiny 150)"
    )
    p.add_argument("--tiny", action="store_true", help="simulated GPU, CPU workers, a tiny model (checks the script)")
    p.add_argument(
        "--models",
        default="",
        help="comma-separated presets (default llama-2-7b; tiny tiny-llama); a repeat is a second model",
    )
    p.add_argument("--layers", type=int, default=0, help="layers of every model (default the preset's; tiny 4)")
    p.add_argument(
        "--formats",
        default="fp16",
        choices=["fp16", "all"],
        help="configurations profiled (default fp16; see the docstring)",
    )
    p.add_argument("--intent", default="min-latency", help="deployment intent (default min-latency)")
    p.add_argument("--trace", default="code", help="code (bursty, default) or conv")
    p.add_argument("--rate", type=float, default=1.0, help="compression rate factor (default 1.0)")
    p.add_argument("--aggregate", type=int, default=0, help="compression: intervals aggregated (default 1; tiny 4)")
    p.add_argument("--interval-s", type=float, default=60.0, help="compression interval (default 60 s)")
    p.add_argument("--start-s", default="auto", help="start of the slice in the compressed trace, or 'auto' (default)")
    p.add_argument(
        "--duration-s", type=float, default=0.0, help="most seconds of trace to replay (default 240; tiny 12)"
    )
    p.add_argument("--target-util", type=float, default=0.5, help="--start-s auto: the load sought (default 0.5)")
    p.add_argument(
        "--max-context", type=int, default=0, help="prompt cap in tokens (default 1024, the paper's; tiny 48)"
    )
    p.add_argument(
        "--context-tokens", type=int, default=0, help="context the maps are profiled for (default 2048; tiny 256)"
    )
    p.add_argument("--fp-repeats", type=int, default=0, help="fingerprint repeats of the profile (default 5; tiny 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work-dir",
        default="",
        help="checkpoints and the stack's data (default /tmp/iserve-simlive; removed at the end)",
    )
    return p.parse_args(argv)


def _err(sim: float, live: float) -> float:
    return (sim - live) / live if live > 0 and not math.isnan(sim) else math.nan


def _fmt(x: float, digits: int = 1) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _fmt_pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"


class SimVsLive:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (a.budget_s or (150.0 if a.tiny else 480.0))
        self.tiny = a.tiny
        self.presets = [
            m.strip() for m in (a.models or ("tiny-llama" if a.tiny else "llama-2-7b")).split(",") if m.strip()
        ]
        self.layers = a.layers or (4 if a.tiny else None)
        self.aggregate = a.aggregate or (4 if a.tiny else 1)
        self.max_duration = a.duration_s or (12.0 if a.tiny else 240.0)
        self.max_context = a.max_context or (48 if a.tiny else 1024)
        self.context = a.context_tokens or (256 if a.tiny else 2048)
        self.fp_repeats = a.fp_repeats or (1 if a.tiny else 5)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work_dir or "/tmp/iserve-simlive")
        # reserves (seconds): deploying every model, the replay's drain after its last arrival, stopping
        self.deploy_reserve = (12.0 if a.tiny else 45.0) * len(self.presets)
        self.drain_reserve = 8.0 if a.tiny else 40.0
        self.teardown_reserve = 10.0 if a.tiny else 20.0
        self.doc: dict = {"meta": {}, "phases": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def phase(self, name: str, since: float) -> None:
        self.doc["phases"][name] = round(time.monotonic() - since, 1)

    def write(self) -> None:
        tmp = self.out / "sim_vs_live.json.tmp"
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.out / "sim_vs_live.json")

    # -- steps -----------------------------------------------------------------------------------

    def make_models(self) -> list[tuple[str, Path]]:
        """Write each distinct preset once; a repeated preset is hard-linked under a second name."""
        import torch

        from iserve.checkpoint import arch_from_config
        from iserve.modelmaker import make_checkpoint, preset_config

        models: list[tuple[str, Path]] = []
        written: dict[str, Path] = {}
        counts = {p: self.presets.count(p) for p in self.presets}
        seen: dict[str, int] = {}
        device = "cuda:0" if torch.cuda.is_available() and not self.tiny else "cpu"
        for preset in self.presets:
            seen[preset] = seen.get(preset, 0) + 1
            name = preset if counts[preset] == 1 else f"{preset}-{'abcdefgh'[seen[preset] - 1]}"
            path = self.work / "models" / name
            if preset not in written:
                arch = arch_from_config(preset_config(preset, num_layers=self.layers))
                dtype = "bfloat16" if arch.torch_dtype == "bfloat16" else "float16"
                t = time.monotonic()
                make_checkpoint(path, preset, num_layers=self.layers, dtype=dtype, device=device, seed=0)
                self.log(f"wrote {name} ({arch.num_layers} layers, {dtype}) in {time.monotonic() - t:.1f} s")
                written[preset] = path
            else:
                path.mkdir(parents=True, exist_ok=True)
                for f in written[preset].iterdir():
                    os.link(f, path / f.name)
            models.append((name, path))
        if device != "cpu":
            torch.cuda.empty_cache()  # the workers need the memory, not this process
        return models

    def choose_slice(self, maps: dict, names: list[str], intent, n_gpus: int, duration: float) -> dict:
        """The slice of the compressed trace to replay (see the module docstring)."""
        from iserve.loadgen import simulator as sim
        from iserve.loadgen.traces import compress, load_trace, slice_trace, stats
        from iserve.stats import percentile

        full = compress(
            load_trace(self.a.trace),
            interval_s=self.a.interval_s,
            aggregate=self.aggregate,
            rate=self.a.rate,
            seed=self.a.seed,
        )
        span = max(r.arrival_s for r in full)

        def evaluate(start: float) -> dict:
            window = slice_trace(full, start, duration)
            info = {"start_s": start, "requests": len(window)}
            if len(window) < 10:
                return {**info, "ok": False}
            spec = self.sim_spec(maps, names, window, intent, n_gpus, system="iserve")
            res = sim.simulate(spec)
            done = [r for r in res.requests if r.status == "ok"]
            busy = sum(r.worker_e2e_ms for r in done) / 1000.0
            end = max((r.end_s for r in res.requests), default=0.0)
            info.update(
                offered_util=busy / (duration * n_gpus),
                drain_s=max(0.0, end - duration),
                sim_e2e_p50_ms=percentile([r.e2e_ms for r in done], 50),
                sim_e2e_p95_ms=percentile([r.e2e_ms for r in done], 95),
                interarrival_cv=stats(window).interarrival_cv,
            )
            info["ok"] = info["drain_s"] <= 0.1 * duration and info["offered_util"] <= 0.95 and len(done) == len(window)
            return info

        if self.a.start_s != "auto":
            return {**evaluate(float(self.a.start_s)), "how": "given"}
        step = max(duration / 4, self.a.interval_s / 4)
        cands = [evaluate(k * step) for k in range(int(max(0.0, span - duration) // step) + 1)]
        good = [c for c in cands if c.get("ok")]
        pool = good or [c for c in cands if c["requests"] >= 10] or cands
        best = min(pool, key=lambda c: (abs(c.get("offered_util", 0.0) - self.a.target_util), c["start_s"]))
        how = (
            f"auto: of {len(cands)} slices ({len(good)} whose queues drain within 10% of the slice), the one with "
            "the offered "
            f"load closest to {self.a.target_util}"
        )
        return {**best, "how": how, "candidates": len(cands)}

    def sim_spec(
        self, maps: dict, names: list[str], trace, intent, n_gpus: int, *, system: str, forced=None, assignment=None
    ):
        from iserve.loadgen.simspec import SimSpec

        first = maps[names[0]]
        return SimSpec(
            models=[(n, maps[n]) for n in names],
            trace=list(trace),
            system=system,
            intent=intent,
            gpus=n_gpus,
            gpu_type=first.gpu_type,
            gpu_memory_bytes=first.gpu_memory_bytes,
            deploy_every_s=0.0,
            deploy_batch=len(names),
            max_context=self.max_context,
            seed=self.a.seed,
            forced=forced or {},
            assignment=assignment,
            trace_label=self.a.trace,
            rate=self.a.rate,
            interval_s=self.a.interval_s,
            aggregate=self.aggregate,
        )

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> int:
        import torch
        from rich.console import Console

        from iserve import bus
        from iserve.client import Client
        from iserve.fingerprint.config import FingerprintConfig
        from iserve.fingerprint.service import FingerprintService
        from iserve.gpu_agent.engine.capabilities import CAPABILITIES
        from iserve.loadgen import replay
        from iserve.loadgen.config import LoadgenConfig
        from iserve.loadgen.records import load_run
        from iserve.messages import Intent
        from iserve.stack import Stack, StackOptions

        self.doc["meta"] = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available() and not self.tiny,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not self.tiny else "simulated",
            "args": vars(self.a),
            "models": self.presets,
            "formats": self.a.formats,
        }
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        data = self.work / "stack"
        opts = StackOptions(
            data_dir=data,
            simulate_gpus="1x24GB" if self.tiny else "",
            log_to_files=True,
            log_level="warning",
            services=("gpu-agent", "deployer", "scheduler"),
            agent_id="simlive",
            extra_env={"ISERVE_DEFAULT_MAX_BATCH": "1"},  # one request at a time, as the simulator runs them
        )
        stack = Stack(opts)
        svc = nc = client = None
        rc = 1
        try:
            t = time.monotonic()
            stack.start()  # the services boot while the checkpoints are written
            self.log(
                f"stack: NATS at {stack.url}; gpu-agent, deployer, scheduler started "
                f"({'simulated GPU' if self.tiny else 'NVML'})"
            )
            models = await asyncio.to_thread(self.make_models)
            names = [n for n, _ in models]
            self.phase("write_models_s", t)

            t = time.monotonic()
            caps = dict(CAPABILITIES)
            if self.a.formats == "fp16":
                caps.update(tp=[1], weight_quant=["fp16"], kv_quant=["fp16"], pruning=["none"])
            cfg = FingerprintConfig(
                nats_url=stack.url,
                nats_creds=stack.creds("fingerprint"),
                log_level="warning",
                log_json=True,
                work_dir=self.work / "fingerprints",
                context_tokens=self.context,
                prompt_lengths=[16, 32, 64] if self.tiny else [128, 512, 1024],
                output_lengths=[4, 12] if self.tiny else [16, 64],
                repeats=self.fp_repeats,
                warmup=1,
                gpu_wait_s=60.0,
                quality_method="off",  # both sides search every variant (--quality any): no need to measure
            )
            nc = await bus.connect(stack.url, "fingerprint", creds=stack.creds("fingerprint"))
            svc = FingerprintService(cfg, nc, caps)
            await svc.start()
            client = await Client.connect(stack.url, "sim-vs-live", creds=stack.creds())
            maps = {}
            for name, path in models:
                info = await client.register(str(path.resolve()), name=name, timeout=120.0)
                await client.wait_profiled(info.record.name, timeout=max(30.0, self.left() - 60.0))
                maps[name] = await client.profile(name)
                (self.out / "maps").mkdir(exist_ok=True)
                import msgspec

                (self.out / "maps" / f"{name}.json").write_bytes(
                    msgspec.json.format(msgspec.json.encode(maps[name]), indent=1)
                )
                c = maps[name].cost
                self.log(
                    f"profiled {name} on {maps[name].gpu_type}: {len(maps[name].estimates)} configurations estimated; "
                    f"{c.gpu_seconds:.1f} GPU-s"
                )
            self.phase("profile_s", t)
            loads = await client.gpu_loads(1.5)
            n_gpus = max(1, len(loads))

            # the slice: as long as the budget allows after deploying, draining and stopping
            duration = min(
                self.max_duration, self.left() - self.deploy_reserve - self.drain_reserve - self.teardown_reserve
            )
            if duration < (5.0 if self.tiny else 30.0):
                raise RuntimeError(f"only {self.left():.0f} s of the budget are left after profiling; raise --budget-s")
            from iserve.loadgen.simulator import median_lengths
            from iserve.loadgen.traces import compress, load_trace, slice_trace

            probe = slice_trace(
                compress(
                    load_trace(self.a.trace),
                    interval_s=self.a.interval_s,
                    aggregate=self.aggregate,
                    rate=self.a.rate,
                    seed=self.a.seed,
                ),
                0.0,
                None,
            )
            p_med, o_med = median_lengths(probe, self.max_context)
            intent = Intent(
                kind=self.a.intent, prompt_tokens=p_med, output_tokens=o_med
            )  # refined below to the live one
            t = time.monotonic()
            chosen = self.choose_slice(maps, names, intent, n_gpus, duration)
            self.phase("choose_slice_s", t)
            self.doc["slice"] = {
                **chosen,
                "duration_s": duration,
                "trace": self.a.trace,
                "rate": self.a.rate,
                "aggregate": self.aggregate,
                "interval_s": self.a.interval_s,
                "seed": self.a.seed,
            }
            self.log(
                f"slice: {self.a.trace} x rate {self.a.rate} aggregate {self.aggregate}, from "
                f"{chosen['start_s']:.0f} s for "
                f"{duration:.0f} s: {chosen['requests']} requests, offered load {chosen.get('offered_util', 0):.2f} "
                f"(inter-arrival CV {chosen.get('interarrival_cv', 0):.1f}); {chosen['how']}"
            )
            self.write()

            # live
            t = time.monotonic()
            live_dir = self.out / "live"
            shutil.rmtree(live_dir, ignore_errors=True)
            lcfg = LoadgenConfig(
                nats_url=stack.url,
                nats_creds=stack.creds(),
                log_level="warning",
                models=names,
                trace=self.a.trace,
                out=live_dir,
                interval_s=self.a.interval_s,
                aggregate=self.aggregate,
                rate=self.a.rate,
                start_s=float(chosen["start_s"]),
                duration_s=duration,
                seed=self.a.seed,
                deploy_every_s=0.0,
                intent=self.a.intent,
                max_context=self.max_context,
                sample_s=1.0,
                ready_timeout_s=max(30.0, self.deploy_reserve * 2),
                request_timeout_s=max(30.0, duration + self.drain_reserve),
                progress=False,
                system="iserve",
                command=["bench/sim_vs_live.py", *sys.argv[1:]],
            )
            stop = asyncio.Event()
            stopper = asyncio.get_running_loop().call_later(max(1.0, self.left() - self.teardown_reserve), stop.set)
            console = Console(file=io.StringIO()) if self.tiny else Console(stderr=True)
            result = await replay.run(lcfg, stop=stop, console=console)
            stopper.cancel()
            self.phase("live_s", t)
            live = load_run(live_dir)
            self.log(
                f"live: {len(live.requests)} of {result.planned} requests recorded"
                f"{' (stopped at the budget)' if result.interrupted else ''}; "
                f"{sum(r.status == 'ok' for r in live.requests)} ok"
            )
            rc = self.compare(live, maps, names, n_gpus, live.meta.intent, result.interrupted)
        except Exception as e:  # noqa: BLE001 - report what happened, with the services' logs
            self.doc["error"] = f"{type(e).__name__}: {e}"
            self.doc["traceback"] = traceback.format_exc(limit=10)
            self.log(f"FAILED: {self.doc['error']}")
            self.doc["logs"] = _log_tails(data)
            rc = 1
        finally:
            t = time.monotonic()
            if svc is not None:
                await svc.close()
            for conn in (client,):
                if conn is not None:
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001
                        pass
            if nc is not None:
                try:
                    await nc.drain()
                except Exception:  # noqa: BLE001
                    pass
            await asyncio.to_thread(stack.stop)
            if stack.failed:
                self.doc["stack_failed"] = stack.failed
            self.phase("stop_s", t)
            self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            self.write()
            shutil.rmtree(self.work, ignore_errors=True)
        return rc

    def compare(self, live, maps: dict, names: list[str], n_gpus: int, intent, interrupted: bool) -> int:
        """Simulate exactly the live requests and print the table (see the module docstring)."""
        from iserve.loadgen import simulator as sim
        from iserve.loadgen.traces import TraceRequest, fit_lengths
        from iserve.stats import percentile

        reqs = sorted(live.requests, key=lambda r: (r.arrival_s, r.index))
        trace = [
            TraceRequest(
                arrival_s=r.arrival_s,
                context_tokens=r.trace_context_tokens,
                generated_tokens=r.trace_generated_tokens,
                index=r.index,
            )
            for r in reqs
        ]
        assignment = [r.model for r in reqs]
        # the configuration each model was deployed in, live
        live_cfg: dict[str, str] = {}
        for e in live.deployments:
            if e.status in ("launching", "ready") and e.config and e.model in names:
                live_cfg.setdefault(e.model, e.config)
        forced = {}
        for m, key in live_cfg.items():
            forced[m] = next(e.config for e in maps[m].estimates if e.config.key() == key)
        res = sim.simulate(
            self.sim_spec(maps, names, trace, intent, n_gpus, system="static", forced=forced, assignment=assignment)
        )
        own = sim.simulate(self.sim_spec(maps, names, trace, intent, n_gpus, system="iserve", assignment=assignment))
        sim_by = {int(r.request_id): r for r in res.requests}  # request_id = position in ``trace``
        pairs = []
        length_mismatch = 0
        for i, lr in enumerate(reqs):
            sr = sim_by.get(i)
            if sr is None:
                continue
            want = fit_lengths(
                lr.trace_context_tokens,
                lr.trace_generated_tokens,
                max_context=self.max_context,
                model_context=maps[lr.model].context_tokens,
            )
            if lr.status == "ok" and (lr.prompt_tokens, lr.output_tokens) != (want.prompt_tokens, want.output_tokens):
                length_mismatch += 1
            if lr.status == "ok" and sr.status == "ok":
                pairs.append((lr, sr))
        rows, table = [], []
        for label, field, multi in METRICS:
            use = [(lr, sr) for lr, sr in pairs if not multi or (lr.output_tokens > 1 and sr.output_tokens > 1)]
            lv = [getattr(lr, field) for lr, _ in use]
            sv = [getattr(sr, field) for _, sr in use]
            row: dict = {"metric": label, "field": field, "requests": len(use)}
            for q in (50, 95):
                row[f"live_p{q}_ms"], row[f"sim_p{q}_ms"] = percentile(lv, q), percentile(sv, q)
                row[f"error_p{q}"] = _err(row[f"sim_p{q}_ms"], row[f"live_p{q}_ms"])
            rows.append(row)
            table.append(
                [
                    label,
                    str(len(use)),
                    _fmt(row["live_p50_ms"]),
                    _fmt(row["sim_p50_ms"]),
                    _fmt_pct(row["error_p50"]),
                    _fmt(row["live_p95_ms"]),
                    _fmt(row["sim_p95_ms"]),
                    _fmt_pct(row["error_p95"]),
                ]
            )
        e2e = next(r for r in rows if r["field"] == "e2e_ms")
        within = all(abs(e2e[k]) <= 0.10 for k in ("error_p50", "error_p95") if not math.isnan(e2e[k]))
        met = within and not math.isnan(e2e["error_p50"])
        span = max((r.arrival_s for r in reqs), default=0.0) or 1.0
        busy = sum(lr.worker_e2e_ms for lr, _ in pairs) / 1000.0
        self.doc["comparison"] = {
            "rows": rows,
            "requests_live": len(reqs),
            "requests_compared": len(pairs),
            "live_failed": sum(r.status != "ok" for r in reqs),
            "sim_failed": sum(r.status != "ok" for r in res.requests),
            "live_interrupted": interrupted,
            "length_mismatches": length_mismatch,
            "live_configs": live_cfg,
            "sim_iserve_choices": own.choices,
            "sim_static_choices": res.choices,
            "iserve_decision_agrees": all(own.choices.get(m, [None])[:1] == [k] for m, k in live_cfg.items()),
            "live_busy_fraction": busy / (span * n_gpus),
            "target_e2e_within_10pct": met,
            "requests": [
                {
                    "index": lr.index,
                    "model": lr.model,
                    "arrival_s": round(lr.arrival_s, 4),
                    "prompt": lr.prompt_tokens,
                    "output": lr.output_tokens,
                    "live": {f: round(getattr(lr, f), 3) for _, f, _ in METRICS},
                    "sim": {f: round(getattr(sr, f), 3) for _, f, _ in METRICS},
                }
                for lr, sr in pairs
            ],
        }
        from iserve.fingerprint.comparison import print_table

        buf = io.StringIO()
        print(
            f"sim vs live, {self.doc['meta']['gpu']}, models {', '.join(f'{m}={k}' for m, k in live_cfg.items())}; "
            f"{self.a.trace} trace slice of {self.doc['slice']['duration_s']:.0f} s from "
            f"{self.doc['slice']['start_s']:.0f} s "
            f"(rate {self.a.rate}, aggregate {self.aggregate}, seed {self.a.seed}); {len(pairs)} of {len(reqs)} "
            "requests compared; "
            f"live busy fraction {busy / (span * n_gpus):.2f}",
            file=buf,
        )
        print_table(
            ["metric", "n", "live p50 ms", "sim p50 ms", "err p50", "live p95 ms", "sim p95 ms", "err p95"],
            table,
            out=buf,
        )
        verdict = "MET" if met else "NOT MET"
        print(
            f"target: e2e latency median and p95 within 10%: {verdict}"
            f" (p50 {_fmt_pct(e2e['error_p50'])}, p95 {_fmt_pct(e2e['error_p95'])}); error = (sim - live) / live",
            file=buf,
        )
        if not self.doc["comparison"]["iserve_decision_agrees"]:
            print(
                f"note: iServe's decision in the simulator {own.choices} differs from the live one {live_cfg}; "
                "the simulation used the live one",
                file=buf,
            )
        if length_mismatch:
            print(
                f"note: {length_mismatch} requests were served with other lengths than the simulator assumes", file=buf
            )
        text = buf.getvalue()
        print()
        print(text, flush=True)
        (self.out / "sim_vs_live.txt").write_text(text)
        self.doc["table"] = text
        return 0 if pairs else 1


def _log_tails(data: Path, chars: int = 3000) -> dict[str, str]:
    """The ends of the services' and workers' logs (for a failed run)."""
    out = {}
    for f in sorted(list(data.glob("logs/*.log")) + list(data.glob("agent/**/*.log"))):
        try:
            out[str(f.relative_to(data))] = f.read_text(errors="replace")[-chars:]
        except OSError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ensure_importable("iserve.loadgen.replay", script="sim_vs_live")
    return asyncio.run(SimVsLive(a).run())


if __name__ == "__main__":
    raise SystemExit(main())
