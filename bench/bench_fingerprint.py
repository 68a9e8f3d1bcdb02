"""Fingerprint estimation accuracy and profiling cost, on one GPU.

For each model shape (random weights, drawn on the GPU): write the checkpoint; then, for each
one-GPU configuration in coverage-first order (the fp16 baseline, each weight format, KV format and
pruning once, then combinations): profile that configuration's variant on the model's 1- and
2-layer fingerprints (the fingerprint service's profiling job, in this process), estimate it, load
the FULL model as that configuration, measure it with the same protocol, and compare. Prints, per
model and over all, the median and p90 absolute relative error of TTFT (every prompt length), TPOT
(every decode run) and peak memory per GPU; the same errors for plain wall-time extrapolation of the
same fingerprint runs (the paper's L2 without the host/device split, to show what the split buys);
and the GPU-seconds of fingerprint profiling against full-model profiling of those configurations.

Time: the required models share ``--budget-s`` (510 s) evenly, extras take what is left, and a
configuration is started only if the time its predecessors took still fits; what is cut is counted
("(N cut)") and listed. Loading a 7B-13B model takes 3-15 s per configuration (quantizing or
compressing on load), so one call measures roughly a third to a half of the 54 one-GPU
configurations of the three Llama shapes; run it again with ``--configs`` for the rest, or with
``--models`` for other architectures.

Usage (on an H100, through the device tool)::

    python bench/bench_fingerprint.py      # Llama-2-7B, Llama-3-8B, Llama-2-13B; then extras if time is left
    python bench/bench_fingerprint.py --models mistral-7b,qwen2-7b,mixtral-8x7b:8,falcon-7b,gpt-j-6b,pythia-6.9b
    python bench/bench_fingerprint.py --tiny   # CPU, tiny shapes: checks the script (timings mean nothing)
    python bench/bench_fingerprint.py --merge run-a.json run-b.json   # one table over earlier runs' JSON

``--merge`` pools the JSON files of earlier runs (no GPU needed) into one summary table: per model, a
configuration measured in a later file replaces the earlier file's measurement of it.

Writes ``$OUT/bench_fingerprint.json`` (everything, rewritten after each model) and
``$OUT/bench_fingerprint_details.txt`` (every point), and prints the summary table last. A model that
fails is reported and the rest go on.

Targets (docs/fingerprint.md): median |error| <= 2% latency, <= 1% memory; >= 10x fewer GPU-seconds.
The GPU-seconds ratio is given two ways: measured over the configurations measured here (one GPU:
one variant per configuration, so fingerprints save per run only), and projected over the
configuration map of an 8-GPU host (one fingerprint run serves every PP degree, while the full model
would need a run on ``TP x PP`` GPUs for each configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import int_list, model_list, run_meta, torch_device  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {  # pyproject.toml's [tool.setuptools.package-dir], for a checkout that is not installed
    "iserve": "shared",
    "iserve.fingerprint": "services/fingerprint",
    "iserve.gpu_agent": "services/gpu-agent",
    "iserve.gpu_agent.engine": "services/gpu-agent/engine",
}


def ensure_importable() -> None:
    """Make ``iserve`` importable from this checkout when it is not installed (the GPU machine)."""
    try:
        import iserve.fingerprint.validate  # noqa: F401

        return
    except ImportError as e:
        if "msgspec" in str(e):
            raise SystemExit("bench_fingerprint needs msgspec (pip install msgspec, or carry its wheel).") from None
    import importlib.util

    for name, rel in PACKAGE_DIRS.items():
        if name in sys.modules:
            continue
        path = ROOT / rel
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)


GPU_MODELS = [  # (preset, layers or None, required)
    ("llama-2-7b", None, True),
    ("llama-3-8b", None, True),
    ("llama-2-13b", None, True),
    ("mistral-7b", None, False),
    ("qwen2-7b", None, False),
    ("mixtral-8x7b", 8, False),  # MoE with 8 of its 32 layers: 23 GiB in fp16, fits one GPU and the disk
    ("falcon-7b", None, False),
    ("gpt-j-6b", None, False),
    ("pythia-6.9b", None, False),
]
TINY_MODELS = [
    ("tiny-llama", 8, True),
    ("tiny-mixtral", 6, False),
    ("tiny-gptj", 6, False),
    ("tiny-neox", 6, False),
    ("tiny-falcon", 6, False),
]
# Extra models measure these configurations only (the required ones measure every one that fits).
EXTRA_CONFIGS = (
    "tp1-pp1-wfp16-kvfp16-pnone",
    "tp1-pp1-wint8-kvfp16-pnone",
    "tp1-pp1-wint4-kvfp16-pnone",
    "tp1-pp1-wfp16-kvint8-pnone",
)
HOST_GPUS = 8  # the host of the projected GPU-seconds ratio


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU (checks the script; timings mean nothing)"
    )
    p.add_argument(
        "--models",
        default="",
        help="comma-separated presets, optionally PRESET:LAYERS (default: the list for the mode)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting work after this many seconds (default 510 GPU, 600 tiny)",
    )
    p.add_argument(
        "--out", default=os.environ.get("OUT", "bench-out"), help="output folder (default $OUT, else ./bench-out)"
    )
    p.add_argument("--work-dir", default="", help="where checkpoints and fingerprints go (default /tmp/iserve-bench)")
    p.add_argument("--max-configs", type=int, default=0, help="at most this many full-model configurations per model")
    p.add_argument("--configs", default="", help="only these configuration keys (comma-separated), for every model")
    p.add_argument("--device", default="", help="torch device (default cuda:0, or cpu with --tiny)")
    p.add_argument("--prompt-lengths", default="", help="comma-separated (default 128,512,1024; tiny 16,32,64)")
    p.add_argument("--output-lengths", default="", help="comma-separated (default 8,32; tiny 4,12)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each full-model run (default 3)")
    p.add_argument(
        "--fp-repeats", type=int, default=7, help="timed repeats of each fingerprint run (default 7: they are cheap)"
    )
    p.add_argument("--context-tokens", type=int, default=0, help="default 2048 (tiny 128)")
    p.add_argument(
        "--replay-distinct",
        action="store_true",
        help="the deep run's replayed layers get tensors of their own (the model's memory footprint; an experiment)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="JSON",
        help="print one summary over these runs' bench_fingerprint.json files "
        "(later files replace earlier configurations)",
    )
    return p.parse_args(argv)


def config_order(arch) -> list:
    """Every one-GPU configuration, coverage first: the fp16 baseline, then each knob value once,
    then combinations, so that a run cut short by time still covers every format."""
    from iserve.fingerprint import estimator
    from iserve.messages import Configuration

    first = [
        Configuration(),
        Configuration(weight_quant="int8"),
        Configuration(weight_quant="int4"),
        Configuration(kv_quant="int8"),
        Configuration(pruning="structured"),
        Configuration(pruning="2:4"),
        Configuration(weight_quant="int8", kv_quant="int8"),
        Configuration(weight_quant="int4", kv_quant="int8", pruning="structured"),
    ]
    rest = [c for c in estimator.enumerate_configurations(arch, 1) if c not in first]
    return first + rest


def _comparison(d: dict):
    from iserve.fingerprint import comparison

    return comparison.Comparison(
        config=d["config"],
        points=[comparison.Point(**p) for p in d["points"]],
        gpu_seconds=d.get("gpu_seconds", 0.0),
        note=d.get("note", ""),
        measured=d.get("measured", {}),
    )


def _fmt_pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


class Bench:
    def __init__(self, a: argparse.Namespace):
        import torch

        self.a = a
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (a.budget_s or (600.0 if a.tiny else 510.0))
        self.device = torch_device(a.device, a.tiny)
        if torch.device(self.device).type == "cpu":
            torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and a busy CPU makes them stall
        self.prompts = int_list(a.prompt_lengths, [16, 32, 64] if a.tiny else [128, 512, 1024])
        self.outputs = int_list(a.output_lengths, [4, 12] if a.tiny else [8, 32])
        self.context = a.context_tokens or (128 if a.tiny else 2048)
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work_dir or "/tmp/iserve-bench")
        self.work.mkdir(parents=True, exist_ok=True)
        self.details = open(self.out / "bench_fingerprint_details.txt", "w")
        self.results: list[dict] = []
        self._warmed: set = set()
        self.kernel_warmup_s: dict[str, float] = {}  # untimed, see _warm_kernels
        self.meta = self._meta()

    def log(self, text: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        print(line, file=self.details, flush=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def _meta(self) -> dict:
        from iserve.gpu_agent.engine.capabilities import CAPABILITIES

        return {
            **run_meta(self.device),
            "capabilities": CAPABILITIES,
            "protocol": {
                "prompt_lengths": self.prompts,
                "output_lengths": self.outputs,
                "repeats": self.a.repeats,
                "fingerprint_repeats": self.a.fp_repeats,
                "context_tokens": self.context,
                "replay_distinct": self.a.replay_distinct,
            },
        }

    # -- one model -------------------------------------------------------------------------------

    def run_model(self, preset: str, layers: int | None, required: bool, model_deadline: float) -> dict:
        """One model: write it, then for each configuration in coverage-first order (while
        ``model_deadline`` allows): profile its variant's fingerprints, estimate it, measure it in
        full, compare; the same fingerprint runs are also extrapolated on wall time alone."""
        import torch

        from iserve import checkpoint
        from iserve.modelmaker import make_checkpoint, preset_config

        name = preset + (f"@{layers}L" if layers else "")
        arch = checkpoint.arch_from_config(preset_config(preset, num_layers=layers))
        self.fractions: list[float] = []
        res: dict = {
            "model": name,
            "family": arch.family,
            "layers": arch.num_layers,
            "hidden": arch.hidden_size,
            "heads": arch.num_attention_heads,
            "kv_heads": arch.num_kv_heads,
            "experts": arch.num_experts,
            "configs": [],
            "comparisons": [],
            "naive": [],
            "no_replay": [],
            "fingerprint_gpu_seconds": {},
        }
        dtype = "bfloat16" if arch.torch_dtype == "bfloat16" else "float16"
        ckpt_bytes = sum(math.prod(s) for s in checkpoint.expected_tensors(arch).values()) * 2
        res["checkpoint_gib"] = round(ckpt_bytes / 2**30, 2)
        free = shutil.disk_usage(self.work).free
        if free < ckpt_bytes * 1.15 + 2 * 2**30:
            res["note"] = f"skipped: {free / 2**30:.0f} GiB of disk free, the checkpoint needs {ckpt_bytes / 2**30:.0f}"
            return res
        guess = (1 if self.a.tiny else 10) + ckpt_bytes / 1.0e9 * 3.0  # writing it, and one configuration
        if time.monotonic() + guess > model_deadline:
            res["note"] = f"skipped: {model_deadline - time.monotonic():.0f} s left for it, about {guess:.0f} s needed"
            return res
        model_dir = self.work / name
        fp_dir = self.work / f"{name}-fingerprints"
        try:
            t = time.perf_counter()
            gen_device = "cpu" if torch.device(self.device).type == "cpu" else self.device
            make_checkpoint(model_dir, preset, num_layers=layers, dtype=dtype, device=gen_device)
            res["make_checkpoint_s"] = round(time.perf_counter() - t, 1)
            self.log(f"{name}: wrote {res['checkpoint_gib']} GiB in {res['make_checkpoint_s']} s")

            only = [k for k in self.a.configs.split(",") if k] or (None if required else list(EXTRA_CONFIGS))
            order = config_order(arch)
            if only is not None:
                order = [c for c in order if c.key() in only]
            if self.a.max_configs:
                order = order[: self.a.max_configs]
            res["configs"] = [c.key() for c in order]
            profiled = self._profile(arch, model_dir, fp_dir, order)
            res["profile_job"] = profiled[2]
            cost_guess = 0.0
            for config in order:
                if time.monotonic() + cost_guess * 1.15 > model_deadline:
                    res["comparisons"].append(
                        {"config": config.key(), "points": [], "gpu_seconds": 0.0, "note": "skipped: out of time"}
                    )
                    continue
                t0 = time.perf_counter()
                c, naive, plain, fp_seconds = self._one_config(arch, model_dir, config, profiled)
                res["comparisons"].append(asdict(c))
                if plain is not None:
                    res["no_replay"].append(asdict(plain))
                if naive is not None:
                    res["naive"].append(asdict(naive))
                    res["fingerprint_gpu_seconds"][config.key()] = round(fp_seconds, 2)
                    cost_guess = max(cost_guess, time.perf_counter() - t0)
            self._finish_model(res, arch)
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc(limit=6)
            self.log(f"{name}: FAILED: {res['error']}")
            self._finish_model(res, arch)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(fp_dir, ignore_errors=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return res

    def _profile(self, arch, model_dir: Path, fp_dir: Path, order: list) -> tuple:
        """Profile every variant of ``order``'s configurations in one job, as registration does (one
        job per model: the fingerprints' tensors are read once, the GPU warmed once). Returns
        ``(map, result, job summary)``; a variant's cost is its measurements' GPU-seconds plus an
        equal share of the job's own (reading, warm-up)."""
        from iserve.fingerprint import estimator, measure

        variants = {estimator.variant_of(c) for c in order}
        for v in sorted(variants, key=lambda v: (v.weight_quant, v.kv_quant, v.pruning)):
            self._warm_kernels(arch, model_dir, fp_dir, v)
        local = measure.profile_locally(
            model_dir,
            [self.device],
            prompt_lengths=self.prompts,
            output_lengths=self.outputs,
            repeats=self.a.fp_repeats,
            warmup=1,
            context_tokens=self.context,
            work_dir=fp_dir,
            max_gpus=1,
            variants_filter=lambda v: v in variants,
            replay_distinct=self.a.replay_distinct,
            gpu_warmup_s=0.0 if self.a.tiny else 1.0,
            log=lambda s: print(s, file=self.details, flush=True),
        )
        self.fractions = [round(f, 4) for f in local.cmap.cost.fingerprint_fraction]
        measured = sum(m.gpu_seconds for m in local.result.measurements)
        summary = {
            "variants": len(variants),
            "gpu_seconds": round(local.result.gpu_seconds, 2),
            "in_measurements": round(measured, 2),
            "peak_bytes": local.result.peak_bytes,
        }
        self.log(
            f"  profiled {len(variants)} variants in one job: {local.result.gpu_seconds:.1f} GPU-s "
            f"({measured:.1f} in measurements, the rest reading and warm-up)"
        )
        return local.cmap, local.result, summary

    def _one_config(self, arch, model_dir: Path, config, profiled: tuple):
        """Estimate ``config`` from the profiled map, then measure the model in full and compare.
        Returns ``(comparison, wall-only comparison or None, 1+2-only comparison or None,
        fingerprint GPU-seconds of its variant)``."""
        import msgspec

        from iserve.fingerprint import comparison, estimator, measure, validate

        cmap, result, summary = profiled
        variant = estimator.variant_of(config)
        overhead = (summary["gpu_seconds"] - summary["in_measurements"]) / max(1, summary["variants"])
        fp_seconds = sum(m.gpu_seconds for m in result.measurements if m.variant == variant) + overhead
        est = {e.config.key(): e for e in cmap.estimates}.get(config.key())
        if est is None:
            why = next((x.reason for x in cmap.excluded if x.config == config), "not estimated")
            self.log(f"  {config.key()}: {why}")
            return comparison.Comparison(config=config.key(), note=f"not estimated: {why}"), None, None, fp_seconds
        if est not in validate.fitting_configs(cmap, memory_bytes=measure.device_memory_bytes(self.device)):
            return (
                comparison.Comparison(config=config.key(), note="estimated not to fit this GPU"),
                None,
                None,
                fp_seconds,
            )
        [c] = validate.validate(
            model_dir,
            cmap,
            [est],
            [self.device],
            prompt_lengths=self.prompts,
            output_lengths=self.outputs,
            repeats=self.a.repeats,
            warmup=1,
        )
        if c.note:
            self.log(f"  {c.config}: {c.note}")
            return c, None, None, fp_seconds
        c.measured["fingerprints"] = [
            msgspec.to_builtins(m) for m in result.measurements if m.variant == variant
        ]  # for diagnosis
        naive = self._wall_only(arch, model_dir, result, cmap, c)
        plain = self._no_replay(arch, model_dir, result, cmap, c)
        worst = ", ".join(f"{w} {_fmt_pct(max(c.errors(w)))}" for w in ("ttft", "tpot", "memory"))
        self.log(f"  {c.config}: worst |error| {worst}; GPU-s fingerprints {fp_seconds:.1f}, full {c.gpu_seconds:.1f}")
        return c, naive, plain, fp_seconds

    def _warm_kernels(self, arch, model_dir: Path, fp_dir: Path, variant) -> None:
        """Untimed, charged to neither side: the first engine of a variant in this process compiles
        and tunes its Triton kernels and creates library handles (11-12 s for fp16 and int8 on an
        H100, 1-3 s for the others); fingerprints and full model share those kernels, so whichever ran
        first would pay them for both. A serving or profiling worker pays them once per variant and
        process (Triton keeps compiled kernels on disk). Loads the 1-layer fingerprint as
        ``variant`` and generates a few tokens."""
        from iserve import checkpoint
        from iserve.fingerprint import generator
        from iserve.gpu_agent.profiling import load_engine

        if self.a.tiny or (model_dir, variant) in self._warmed:
            return
        t = time.perf_counter()
        infos = generator.make_fingerprints(checkpoint.scan_checkpoint(model_dir), fp_dir)
        engine = load_engine(infos[0].path, self.device, self.context, variant)
        try:
            engine.generate(list(range(3, 3 + max(self.prompts))), max_tokens=4, ignore_eos=True)
        finally:
            engine.close()
        self._warmed.add((model_dir, variant))
        self.kernel_warmup_s[f"{model_dir.name}:{variant.weight_quant}-{variant.kv_quant}-{variant.pruning}"] = round(
            time.perf_counter() - t, 2
        )

    def _wall_only(self, arch, model_dir: Path, result, cmap, c):
        """The same fingerprint runs extrapolated on wall time alone (plain L2), against the same truth."""
        import msgspec

        wall_only = [
            msgspec.structs.replace(m, ttft_device=[], decode_device=[], tpot_device_ms=0.0)
            for m in result.measurements
        ]
        return self._refit(arch, model_dir, wall_only, cmap, c)

    def _no_replay(self, arch, model_dir: Path, result, cmap, c):
        """The estimate from the 1- and 2-layer fingerprints alone (without the replayed deep run),
        against the same truth; None when nothing was replayed."""
        if not any(m.replayed_from for m in result.measurements):
            return None
        return self._refit(arch, model_dir, [m for m in result.measurements if not m.replayed_from], cmap, c)

    def _refit(self, arch, model_dir: Path, measurements, cmap, c):
        from iserve import checkpoint
        from iserve.fingerprint import comparison, estimator

        ck = checkpoint.scan_checkpoint(model_dir)
        config = next(e.config for e in cmap.estimates if e.config.key() == c.config)
        [e] = estimator.fit_estimates(
            arch, checkpoint.weight_breakdown(ck), measurements, [config], context_tokens=cmap.context_tokens
        )
        pts = []
        for p in c.points:
            if p.what == "ttft":
                est = e.ttft_ms(int(p.at.split("=")[1]))
            elif p.what == "tpot":
                pp, oo = (int(x.split("=")[1]) for x in p.at.split(","))
                est = e.tpot_for(pp, oo)
            else:
                est = p.estimated
            pts.append(comparison.Point(p.what, p.at, est, p.measured))
        return comparison.Comparison(config=c.config, points=pts)

    def _finish_model(self, res: dict, arch) -> None:
        from iserve.fingerprint import comparison

        measured = [_comparison(c) for c in res["comparisons"] if not c.get("note")]
        res["summary"] = comparison.summarize(measured)
        res["summary_wall_only"] = comparison.summarize([_comparison(c) for c in res["naive"]])
        res["summary_no_replay"] = comparison.summarize([_comparison(c) for c in res["no_replay"]])
        res["fingerprint_fraction"] = self.fractions
        fp = sum(res["fingerprint_gpu_seconds"].get(c.config, 0.0) for c in measured)
        full = sum(c.gpu_seconds for c in measured)
        res["gpu_seconds"] = {
            "fingerprints": round(fp, 2),
            "full_model": round(full, 2),
            "ratio": round(full / fp, 2) if fp else None,
            "projected_ratio_8gpu_host": self._projected_ratio(arch, res["fingerprint_gpu_seconds"], measured),
        }
        s = res["summary"]
        self.log(
            f"{res['model']}: {len(measured)}/{len(res['configs'])} configurations measured; |error| median TTFT "
            f"{_fmt_pct(s['ttft']['median'])} TPOT {_fmt_pct(s['tpot']['median'])} memory "
            f"{_fmt_pct(s['memory']['median'])}; "
            f"GPU-s {fp:.1f} vs {full:.1f}"
        )
        print(f"\n{res['model']}", file=self.details)
        comparison.print_table(
            ["config", "what", "at", "estimated", "measured", "unit", "error", "GPU-s"],
            comparison.report_rows([_comparison(c) for c in res["comparisons"]]),
            out=self.details,
        )

    def _projected_ratio(self, arch, fp_by_config: dict[str, float], measured: list) -> float | None:
        """Full-model GPU-seconds for every configuration of an 8-GPU host whose one-GPU variant was
        measured (each costing that variant's one-GPU time on every one of its TP x PP GPUs), over the
        fingerprint GPU-seconds of those variants: one fingerprint run serves every PP degree, and
        (measured or modeled) every TP degree."""
        from iserve.fingerprint import estimator

        full_by_variant = {c.config.replace("-pp1", ""): c.gpu_seconds for c in measured}
        fp = sum(fp_by_config.get(c.config, 0.0) for c in measured)
        if not full_by_variant or not fp:
            return None
        total = 0.0
        for c in estimator.enumerate_configurations(arch, HOST_GPUS):
            key = estimator.replace_variant(estimator.variant_of(c), tp=1).key()
            if key in full_by_variant:
                total += c.gpus * full_by_variant[key]
        return round(total / fp, 1)

    # -- all -------------------------------------------------------------------------------------

    def run(self) -> int:
        self.log(
            f"bench_fingerprint on {self.meta['gpu']} ({self.device}), torch {self.meta['torch']}, "
            f"budget {self.deadline - self.t0:.0f} s"
        )
        try:
            models = model_list(self.a.models, TINY_MODELS if self.a.tiny else GPU_MODELS)
            for i, (preset, layers, required) in enumerate(models):
                if self.left() < (2 if self.a.tiny else 15):
                    self.results.append({"model": preset, "note": "skipped: out of time"})
                    continue
                # The required models share what is left evenly; extras take whatever remains.
                later_required = sum(1 for _, _, r in models[i + 1 :] if r)
                share = self.left() / (1 + later_required) if required else self.left()
                self.results.append(self.run_model(preset, layers, required, time.monotonic() + share))
                self.write_json()
        except KeyboardInterrupt:
            self.log("interrupted; reporting what was measured")
        finally:
            self.write_json()
            self.print_summary()
            self.details.close()
        measured = [r for r in self.results if r.get("summary")]
        return 0 if measured else 1

    def write_json(self) -> None:
        doc = {
            "meta": self.meta,
            "elapsed_s": round(time.monotonic() - self.t0, 1),
            "models": self.results,
            "overall": self.overall(),
            "kernel_warmup_s": self.kernel_warmup_s,
        }
        tmp = self.out / "bench_fingerprint.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "bench_fingerprint.json")

    def overall(self) -> dict:
        from iserve.fingerprint import comparison

        comps, naive, plain = [], [], []
        fp = full = 0.0
        for r in self.results:
            comps += [_comparison(c) for c in r.get("comparisons", []) if not c.get("note")]
            naive += [_comparison(c) for c in r.get("naive", [])]
            plain += [_comparison(c) for c in r.get("no_replay", [])]
            g = r.get("gpu_seconds") or {}
            fp += g.get("fingerprints") or 0.0
            full += g.get("full_model") or 0.0
        out = comparison.summarize(comps)
        out["wall_only"] = comparison.summarize(naive)
        out["no_replay"] = comparison.summarize(plain)
        out["gpu_seconds"] = {
            "fingerprints": round(fp, 1),
            "full_model": round(full, 1),
            "ratio": round(full / fp, 2) if fp else None,
        }
        return out

    def print_summary(self) -> None:
        from iserve.fingerprint import comparison

        rows = []
        for r in self.results:
            s = r.get("summary")
            if not s or not s["ttft"]["points"]:
                rows.append(
                    [
                        r["model"],
                        r.get("family", ""),
                        "-",
                        (r.get("note") or r.get("error", "") or "nothing measured")[:70],
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                        "",
                    ]
                )
                continue
            w = r.get("summary_wall_only", {})
            nr = r.get("summary_no_replay", {})
            g = r.get("gpu_seconds", {})
            n = sum(1 for c in r["comparisons"] if not c.get("note"))
            skipped = sum(1 for c in r["comparisons"] if c.get("note", "").startswith("skipped"))
            rows.append(
                [
                    r["model"],
                    r["family"],
                    f"{n}/{len(r['configs'])}" + (f" ({skipped} cut)" if skipped else ""),
                    f"{_fmt_pct(s['ttft']['median'])} / {_fmt_pct(s['ttft']['p90'])}",
                    f"{_fmt_pct(s['tpot']['median'])} / {_fmt_pct(s['tpot']['p90'])}",
                    f"{_fmt_pct(s['memory']['median'])} / {_fmt_pct(s['memory']['p90'])}",
                    f"{_fmt_pct(w.get('ttft', {}).get('median'))} / {_fmt_pct(w.get('tpot', {}).get('median'))}",
                    f"{_fmt_pct(nr.get('ttft', {}).get('median'))} / {_fmt_pct(nr.get('tpot', {}).get('median'))}",
                    f"{g.get('fingerprints', 0):.1f}",
                    f"{g.get('full_model', 0):.1f}",
                    f"{g.get('ratio') or 0:.1f}x",
                    f"{g.get('projected_ratio_8gpu_host') or 0:.0f}x",
                ]
            )
        o = self.overall()
        w, nr = o["wall_only"], o["no_replay"]
        rows.append(
            [
                "ALL",
                "",
                str(o["memory"]["points"]) + " cfgs",
                f"{_fmt_pct(o['ttft']['median'])} / {_fmt_pct(o['ttft']['p90'])}",
                f"{_fmt_pct(o['tpot']['median'])} / {_fmt_pct(o['tpot']['p90'])}",
                f"{_fmt_pct(o['memory']['median'])} / {_fmt_pct(o['memory']['p90'])}",
                f"{_fmt_pct(w['ttft']['median'])} / {_fmt_pct(w['tpot']['median'])}",
                f"{_fmt_pct(nr['ttft']['median'])} / {_fmt_pct(nr['tpot']['median'])}",
                f"{o['gpu_seconds']['fingerprints']:.1f}",
                f"{o['gpu_seconds']['full_model']:.1f}",
                f"{o['gpu_seconds']['ratio'] or 0:.1f}x",
                "",
            ]
        )
        print()
        print(
            f"iServe fingerprint benchmark, {self.meta['date']}, {self.meta['gpu']}, torch {self.meta['torch']}; "
            f"prompts {self.prompts}, outputs {self.outputs}, repeats {self.a.repeats} (fingerprints "
            f"{self.a.fp_repeats}), "
            f"context {self.context}"
        )
        print(
            "|error| as median / p90 over every (configuration, prompt length | decode run); 'wall-only' = the same "
            "fingerprint "
            "runs extrapolated on wall time alone (plain L2); '1+2 only' = without the replayed deep run"
        )
        comparison.print_table(
            [
                "model",
                "family",
                "configs",
                "TTFT err",
                "TPOT err",
                "memory err",
                "wall-only TTFT/TPOT",
                "1+2 only TTFT/TPOT",
                "FP GPU-s",
                "full GPU-s",
                "ratio",
                "8-GPU map",
            ],
            rows,
        )
        print(
            f"targets: median TTFT/TPOT <= 2%, memory <= 1%, ratio >= 10x; elapsed {time.monotonic() - self.t0:.0f} s; "
            f"JSON: {self.out / 'bench_fingerprint.json'}"
        )


def _merged_models(paths: list[str]) -> tuple[dict, list[dict]]:
    """The models of several runs' JSON, per model the union of their configurations (a later file's
    measurement of a configuration replaces an earlier one's; a cut or failed one replaces nothing)."""
    meta: dict = {}
    merged: dict[str, dict] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        meta = meta or doc["meta"]
        for m in doc["models"]:
            if "comparisons" not in m:
                continue
            cur = merged.setdefault(
                m["model"],
                {**m, "comparisons": [], "naive": [], "no_replay": [], "fingerprint_gpu_seconds": {}, "configs": []},
            )
            cur["configs"] = sorted(set(cur["configs"]) | set(m["configs"]))
            measured = {c["config"] for c in m["comparisons"] if not c.get("note")}
            for key in ("comparisons", "naive", "no_replay"):
                cur[key] = [c for c in cur[key] if c["config"] not in measured] + [
                    c for c in m[key] if c["config"] in measured
                ]
            tried = {c["config"] for c in cur["comparisons"]}
            cur["comparisons"] += [c for c in m["comparisons"] if c["config"] not in tried]
            cur["fingerprint_gpu_seconds"].update(
                {k: v for k, v in m["fingerprint_gpu_seconds"].items() if k in measured}
            )
    return meta, list(merged.values())


def merge(a: argparse.Namespace) -> int:
    """``--merge``: one summary table over earlier runs (see the module docstring)."""
    from iserve import checkpoint
    from iserve.modelmaker import preset_config

    meta, models = _merged_models(a.merge)
    bench = Bench(
        parse_args(["--device", "cpu", "--out", a.out, "--work-dir", a.work_dir or str(Path(a.out) / "work")])
    )  # no GPU work
    bench.meta = meta
    protocol = meta.get("protocol", {})
    bench.prompts, bench.outputs = protocol.get("prompt_lengths", []), protocol.get("output_lengths", [])
    bench.context = protocol.get("context_tokens", 0)
    bench.a.repeats, bench.a.fp_repeats = protocol.get("repeats", 0), protocol.get("fingerprint_repeats", 0)
    for res in models:
        preset, _, layers = res["model"].partition("@")
        arch = checkpoint.arch_from_config(
            preset_config(preset, num_layers=int(layers.removesuffix("L")) if layers else None)
        )
        bench.fractions = res.get("fingerprint_fraction", [])
        bench._finish_model(res, arch)
        bench.results.append(res)
    bench.write_json()
    print(f"merged {len(a.merge)} runs: {', '.join(a.merge)}")
    bench.print_summary()
    bench.details.close()
    return 0 if bench.results else 1


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ensure_importable()
    import iserve.gpu_agent.engine  # noqa: F401 - before CUDA starts: the engine sets the allocator's options

    if a.merge:
        return merge(a)
    return Bench(a).run()


if __name__ == "__main__":
    raise SystemExit(main())
