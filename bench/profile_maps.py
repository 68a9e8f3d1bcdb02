"""Configuration maps measured on one GPU, for the trace simulator.

For each model shape (default: the simulator's default scenario, Llama-2-70B, Falcon-40B and
Llama-2-7B, then Llama-2-13B, Llama-3-8B and Mistral-7B with what time is left): write a random-weight
checkpoint, cut its 1- and 2-layer fingerprints (the fingerprint service's generator), profile every
one-GPU variant (weight format x KV format x pruning) with the service's own job code
(``measure.profile_locally``, which runs ``profiling.run_profile_job`` in this process), and
estimate every configuration on up to ``--max-gpus`` (8) GPUs of this GPU's type. One
``ConfigurationMap`` JSON per model goes to ``OUT/maps/<model>.json``, the format
``loadgen.simulator.load_maps`` reads (``iserve simulate --maps OUT/maps``).

What is measured and what is modeled
    * Only TP=1 is measured (one GPU). TP = 2, 4, 8 configurations are derived from their TP=1 twin
      by the estimator's communication model (``estimator.derive_tp_fit``, method
      ``fingerprint+comm``: device terms divided by TP, two all-reduces per layer, NVLink defaults
      ``estimator.COMM_DEFAULTS`` on an H100 SXM), exactly as the fingerprint service does on a
      one-GPU agent; the map's ``cost.comm_model`` says so. PP > 1 reuses PP = 1 latency (paper L1).
    * Memory per GPU: weights exact from the shapes, KV exact, activations and overhead from the
      fingerprints (docs/fingerprint.md).

Sparse checkpoints (why a 70B model fits a 64 GB disk)
    A 70B fp16 checkpoint is 140 GB. The model is written with ``make_checkpoint(...,
    dense_layers=2)``: a valid safetensors file whose header lists every tensor, but where only the
    embedding, final norm, LM head and hidden layers 0-1 hold (random) data; the other layers' bytes
    are a filesystem hole (never written, no disk blocks, read back as zeros). The fingerprint
    generator reads exactly those tensors (``generator.fingerprint_tensor_names``; this script checks
    it for every model and stops if not), so the fingerprints are byte for byte what the dense
    checkpoint of the same seed would give, and the checkpoint's digest, weight breakdown and
    configuration space come from its header, as for a real one. Latency and memory depend on the
    shapes and formats, not on the weight values (random weights, as every benchmark here). The
    summary reports each checkpoint's apparent size and its size on disk (``du``).

Time (``--budget-s``, default 540): the first three models (the simulator's) share the budget
evenly, the others share what is left; unused time passes on. Within a model the variants run
coverage first (fp16, then each weight format, KV format and pruning alone, then combinations), one
profiling job each, and a variant starts only if the model's median variant time still fits its
share, so a model cut short still has its main formats; cut variants are excluded in the map with
the reason. Each map is written as soon as its model is done, and ``profile_maps.json`` (the
summary) after every model. Estimated cost on an H100: about 6 GPU-seconds per variant with 3
repeats (the fingerprint benchmark, results/2026-11-22-h100-fingerprint-runs1-4/run1.json), 18
variants per model, plus 5-20 s per model to write the sparse checkpoint and the fingerprints.

Usage (on an H100)::

    python3 bench/profile_maps.py --out $OUT --budget-s 540
    python3 bench/profile_maps.py --out $OUT --budget-s 540 --models llama-2-13b,llama-3-8b,mistral-7b
    python3 bench/profile_maps.py --tiny --out /tmp/maps    # CPU, tiny shapes: checks the script

Output (``--out``): ``maps/<model>.json`` (one per model) and ``profile_maps.json``; the table of
models, variants profiled, configurations estimated, GPU-seconds and wall time is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import int_list, model_list, run_meta, torch_device  # noqa: E402
from _importable import ensure_importable  # noqa: E402

DENSE_LAYERS = 2  # the deepest fingerprint: generator.FINGERPRINT_LAYERS
GPU_MODELS = [  # (preset, layers or None, required): the simulator's default scenario first
    ("llama-2-7b", None, True),
    ("llama-2-70b", None, True),
    ("falcon-40b", None, True),
    ("llama-2-13b", None, False),
    ("llama-3-8b", None, False),
    ("mistral-7b", None, False),
]
TINY_MODELS = [("tiny-llama", 8, True), ("tiny-falcon", 6, False)]
VARIANT_GUESS_S = {"gpu": 6.0, "tiny": 1.0}  # before a model's first variant is timed
KNOB_ORDER = {
    "weight_quant": ("fp16", "int8", "int4"),
    "kv_quant": ("fp16", "int8"),
    "pruning": ("none", "structured", "2:4"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=os.environ.get("OUT", "maps-out"), help="output folder (default $OUT, else ./maps-out)"
    )
    p.add_argument(
        "--budget-s", type=float, default=0.0, help="start no work after this many seconds (default 540; tiny 300)"
    )
    p.add_argument(
        "--models",
        default="",
        help="comma-separated presets, optionally PRESET:LAYERS (default: the list for the mode)",
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny shapes on the CPU (checks the script; timings mean nothing)"
    )
    p.add_argument("--device", default="", help="torch device (default cuda:0, or cpu with --tiny)")
    p.add_argument(
        "--max-gpus", type=int, default=8, help="configurations on up to this many GPUs of this type (default 8)"
    )
    p.add_argument("--repeats", type=int, default=0, help="timed repeats of each fingerprint run (default 3; tiny 1)")
    p.add_argument(
        "--max-variants", type=int, default=-1, help="at most this many variants per model (default all; tiny 3)"
    )
    p.add_argument("--prompt-lengths", default="", help="comma-separated (default 128,512,1024; tiny 16,32,64)")
    p.add_argument("--output-lengths", default="", help="comma-separated (default 16,64, the service's; tiny 4,12)")
    p.add_argument(
        "--context-tokens", type=int, default=0, help="context the maps are estimated for (default 2048; tiny 128)"
    )
    p.add_argument(
        "--work-dir", default="", help="checkpoints and fingerprints (default /tmp/iserve-maps; deleted per model)"
    )
    return p.parse_args(argv)


def coverage_order(variants: list) -> list:
    """Variants with fewer non-default knobs first (fp16; each format alone; pairs; triples), then by
    knob value order, so a model cut short by time still has every single format."""

    def key(v):
        idx = [KNOB_ORDER[k].index(getattr(v, k)) if getattr(v, k) in KNOB_ORDER[k] else 9 for k in KNOB_ORDER]
        return (sum(i > 0 for i in idx), [i == 0 for i in idx], idx)  # then weight format, KV format, pruning

    return sorted(variants, key=key)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


class ProfileMaps:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = time.monotonic()
        self.deadline = self.t0 + (a.budget_s or (300.0 if a.tiny else 540.0))
        self.device = torch_device(a.device, a.tiny)
        self.mode = "tiny" if a.tiny else "gpu"
        self.repeats = a.repeats or (1 if a.tiny else 3)
        self.max_variants = a.max_variants if a.max_variants >= 0 else (3 if a.tiny else 0)
        self.prompts = int_list(a.prompt_lengths, [16, 32, 64] if a.tiny else [128, 512, 1024])
        self.outputs = int_list(a.output_lengths, [4, 12] if a.tiny else [16, 64])
        self.context = a.context_tokens or (128 if a.tiny else 2048)
        self.out = Path(a.out)
        self.maps_dir = self.out / "maps"
        self.maps_dir.mkdir(parents=True, exist_ok=True)
        self.work = Path(a.work_dir or "/tmp/iserve-maps")
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []
        self.first_job = True
        self.holes_ok = _holes_supported(self.work)
        self.meta = self._meta()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def _meta(self) -> dict:
        return {
            **run_meta(self.device),
            "max_gpus": self.a.max_gpus,
            "budget_s": round(self.deadline - self.t0),
            "protocol": {
                "prompt_lengths": self.prompts,
                "output_lengths": self.outputs,
                "repeats": self.repeats,
                "context_tokens": self.context,
            },
            "checkpoints": "random weights, sparse: only the embedding, final norm, LM head and layers "
            f"0-{DENSE_LAYERS - 1} "
            "are written, the rest are filesystem holes (zeros); fingerprints read only those tensors",
            "filesystem_holes": self.holes_ok,
            "tp": "TP=1 measured; TP>1 derived from TP=1 by the estimator's communication model (fingerprint+comm)",
        }

    # -- one model -------------------------------------------------------------------------------

    def run_model(self, preset: str, layers: int | None, model_deadline: float) -> dict:
        import msgspec
        import torch

        from iserve import checkpoint
        from iserve.fingerprint import estimator, generator, measure
        from iserve.messages import ProfileResult
        from iserve.modelmaker import dense_tensor_names, disk_bytes, make_checkpoint, preset_config

        name = preset
        arch = checkpoint.arch_from_config(preset_config(preset, num_layers=layers))
        res: dict = {
            "model": name,
            "family": arch.family,
            "layers": arch.num_layers,
            "hidden": arch.hidden_size,
            "variants": [],
            "variants_total": 0,
            "variants_profiled": 0,
        }
        t_model = time.perf_counter()
        dtype = "bfloat16" if arch.torch_dtype == "bfloat16" else "float16"
        dense = dense_tensor_names(arch, DENSE_LAYERS)
        shapes = checkpoint.expected_tensors(arch)
        dense_bytes = sum(_numel(shapes[n]) for n in dense) * 2
        setup_guess = (1.0 if self.a.tiny else 5.0) + dense_bytes / 1e9 * (3.0 if not self.a.tiny else 1.0)
        guess = VARIANT_GUESS_S[self.mode]
        if time.monotonic() + setup_guess + guess > min(model_deadline, self.deadline):
            res["note"] = (
                f"skipped: {min(model_deadline, self.deadline) - time.monotonic():.0f} s left for it, about "
                f"{setup_guess + guess:.0f} s needed"
            )
            self.log(f"{name}: {res['note']}")
            return res
        free = shutil.disk_usage(self.work).free
        if not self.holes_ok and sum(_numel(x) for x in shapes.values()) * 2 > free / 2:
            res["note"] = (
                f"skipped: {self.work} does not keep filesystem holes, and the dense checkpoint does not fit its disk"
            )
            self.log(f"{name}: {res['note']}")
            return res
        if free < dense_bytes * 3 + 2**30:
            res["note"] = (
                f"skipped: {_gib(free)} GiB of disk free, the sparse checkpoint and fingerprints need about "
                f"{_gib(dense_bytes * 3)}"
            )
            self.log(f"{name}: {res['note']}")
            return res
        model_dir, fp_dir = self.work / name, self.work / f"{name}-fingerprints"
        try:
            t = time.perf_counter()
            gen_device = "cpu" if torch.device(self.device).type == "cpu" else self.device
            make_checkpoint(
                model_dir, preset, num_layers=layers, dtype=dtype, device=gen_device, dense_layers=DENSE_LAYERS
            )
            apparent, on_disk = disk_bytes(model_dir)
            res.update(
                make_checkpoint_s=round(time.perf_counter() - t, 1),
                checkpoint_bytes=apparent,
                checkpoint_disk_bytes=on_disk,
            )
            ck = checkpoint.scan_checkpoint(model_dir)
            read = {n for k in generator.FINGERPRINT_LAYERS for n in generator.fingerprint_tensor_names(ck, k)}
            if not read <= set(dense):
                raise RuntimeError(
                    "the fingerprint generator reads tensors the sparse checkpoint left as holes: "
                    f"{sorted(read - set(dense))[:3]}"
                )
            t = time.perf_counter()
            infos = generator.make_fingerprints(ck, fp_dir)
            res["fingerprints_s"] = round(time.perf_counter() - t, 1)
            res["fingerprint_bytes"] = [i.bytes for i in infos]
            self.log(
                f"{name}: sparse checkpoint {_gib(apparent)} GiB ({_gib(on_disk)} GiB on disk) in "
                f"{res['make_checkpoint_s']} s, "
                f"fingerprints {' + '.join(_gib(i.bytes) for i in infos)} GiB in {res['fingerprints_s']} s"
            )

            caps = measure.engine_capabilities()
            configs = estimator.enumerate_configurations(ck.arch, self.a.max_gpus)
            supported, _ = estimator.split_supported(configs, caps, arch=ck.arch)
            variants = coverage_order(estimator.measurement_variants(supported, max_tp=1))
            res["variants_total"] = len(variants)
            if self.max_variants:
                variants = variants[: self.max_variants]
            measurements, skipped, walls = [], {}, []
            gpu_s = wall_s = 0.0
            peak = nvml_peak = 0
            for i, v in enumerate(variants):
                key = v.key()
                now = time.monotonic()
                need = statistics.median(walls) if walls else guess
                worst = max(walls) if walls else guess
                if now + need * 1.1 > model_deadline or now + worst > self.deadline:
                    skipped[key] = "cut: out of time (bench/profile_maps.py --budget-s)"
                    res["variants"].append({"variant": key, "note": "cut: out of time"})
                    continue
                t = time.perf_counter()
                entry: dict = {"variant": key}
                try:
                    local = measure.profile_locally(
                        model_dir,
                        [self.device],
                        prompt_lengths=self.prompts,
                        output_lengths=self.outputs,
                        repeats=self.repeats,
                        warmup=1,
                        context_tokens=self.context,
                        work_dir=fp_dir,
                        name=name,
                        capabilities=caps,
                        max_gpus=self.a.max_gpus,
                        gpu_warmup_s=(1.0 if self.first_job and not self.a.tiny else 0.0),
                        variants_filter=lambda x, want=v: x == want,
                    )
                    self.first_job = False
                    r = local.result
                    measurements += r.measurements
                    skipped.update(r.skipped)
                    gpu_s += r.gpu_seconds
                    wall_s += r.wall_seconds
                    peak, nvml_peak = max(peak, r.peak_bytes), max(nvml_peak, r.nvml_peak_bytes)
                    entry["gpu_seconds"] = round(r.gpu_seconds, 2)
                    if r.measurements:
                        entry["tpot_ms"] = [round(m.tpot_ms, 4) for m in r.measurements]
                        entry["tpot_device_ms"] = [round(m.tpot_device_ms, 4) for m in r.measurements]
                        entry["ttft_ms"] = [[round(x.ttft_ms, 3) for x in m.ttft] for m in r.measurements]
                        res["variants_profiled"] += 1
                        what = "TPOT " + " / ".join(f"{m.tpot_ms:.3f}" for m in r.measurements) + " ms (L1 / L2)"
                    else:
                        entry["note"] = "engine refused: " + "; ".join(r.skipped.values())
                        what = entry["note"]
                except Exception as e:  # noqa: BLE001 - one variant's failure must not lose the model
                    entry["note"] = f"error: {type(e).__name__}: {e}"
                    skipped[key] = f"profiling failed: {type(e).__name__}: {e}"
                    what = entry["note"]
                gc.collect()  # nothing of one job's engines may stay for the next (also after an error)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                took = time.perf_counter() - t
                walls.append(took)
                entry["wall_s"] = round(took, 2)
                res["variants"].append(entry)
                self.log(f"{name}: [{i + 1}/{len(variants)}] {key}: {what}; {took:.1f} s")
            if not measurements:
                raise RuntimeError(
                    "no variant could be profiled: " + "; ".join(f"{k}: {w}" for k, w in skipped.items())
                )
            merged = ProfileResult(
                job_id="profile-maps",
                device=self.device,
                gpu_type=self.meta["gpu"],
                measurements=measurements,
                gpu_seconds=gpu_s,
                wall_seconds=wall_s,
                peak_bytes=peak,
                skipped=skipped,
                nvml_peak_bytes=nvml_peak,
            )
            cmap = measure.local_map(
                ck,
                infos,
                merged,
                [self.device],
                name=name,
                capabilities=caps,
                max_gpus=self.a.max_gpus,
                context_tokens=min(self.context, ck.arch.max_position),
            )
            path = self.maps_dir / f"{name}.json"
            tmp = path.with_name(path.name + ".tmp")  # not *.json: load_maps must never see half a map
            tmp.write_bytes(msgspec.json.format(msgspec.json.encode(cmap), indent=1))
            tmp.replace(path)
            tp_methods = sorted({e.method for e in cmap.estimates if e.config.tp > 1})
            res.update(
                map=str(path),
                estimates=len(cmap.estimates),
                excluded=len(cmap.excluded),
                configurations=len(cmap.estimates) + len(cmap.excluded),
                gpu_seconds=round(gpu_s, 1),
                comm_model=cmap.cost.comm_model,
                tp_methods=tp_methods,
                gpu_type=cmap.gpu_type,
            )
            fastest = min(cmap.estimates, key=lambda e: e.latency_ms(512, 128), default=None)
            if fastest is not None:
                res["fastest_512_128"] = {
                    "config": fastest.config.key(),
                    "latency_ms": round(fastest.latency_ms(512, 128), 1),
                }
            self.log(
                f"{name}: map {path.name}: {len(cmap.estimates)} configurations estimated, {len(cmap.excluded)} "
                "excluded; "
                f"{res['variants_profiled']}/{res['variants_total']} variants, {gpu_s:.1f} GPU-s"
            )
        except Exception as e:  # noqa: BLE001 - one model's failure must not lose the others
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc(limit=8)
            self.log(f"{name}: FAILED: {res['error']}")
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
            shutil.rmtree(fp_dir, ignore_errors=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            res["wall_s"] = round(time.perf_counter() - t_model, 1)
        return res

    # -- all -------------------------------------------------------------------------------------

    def run(self) -> int:
        self.log(
            f"profile_maps on {self.meta['gpu']} ({self.device}), budget {self.deadline - self.t0:.0f} s, "
            f"repeats {self.repeats}, up to {self.a.max_gpus} GPUs per configuration"
        )
        try:
            models = model_list(self.a.models, TINY_MODELS if self.a.tiny else GPU_MODELS)
            for i, (preset, layers, required) in enumerate(models):
                later = [r for _, _, r in models[i + 1 :]]
                # required models share what is left evenly; the others share what the required ones leave
                share = self.left() / (1 + sum(later)) if required else self.left() / (1 + len(later))
                self.results.append(self.run_model(preset, layers, time.monotonic() + share))
                self.write_json()
        except KeyboardInterrupt:
            self.log("interrupted; writing what was profiled")
        finally:
            self.write_json()
            self.print_summary()
        return 0 if any(r.get("map") for r in self.results) else 1

    def write_json(self) -> None:
        doc = {"meta": self.meta, "elapsed_s": round(time.monotonic() - self.t0, 1), "models": self.results}
        tmp = self.out / "profile_maps.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(self.out / "profile_maps.json")

    def print_summary(self) -> None:
        from iserve.fingerprint import comparison

        rows = []
        for r in self.results:
            ck = (
                f"{_gib(r['checkpoint_bytes'])} / {_gib(r['checkpoint_disk_bytes'])}"
                if "checkpoint_bytes" in r
                else "-"
            )
            if r.get("map"):
                rows.append(
                    [
                        r["model"],
                        f"{r['variants_profiled']}/{r['variants_total']}",
                        f"{r['estimates']} of {r['configurations']}",
                        f"{r['gpu_seconds']:.1f}",
                        f"{r['wall_s']:.0f}",
                        ck,
                        r.get("fastest_512_128", {}).get("config", ""),
                    ]
                )
            else:
                rows.append(
                    [
                        r["model"],
                        "-",
                        "-",
                        "-",
                        f"{r.get('wall_s', 0):.0f}",
                        ck,
                        (r.get("note") or r.get("error", ""))[:80],
                    ]
                )
        print()
        print(
            f"iServe configuration maps, {self.meta['date']}, {self.meta['gpu']}, torch {self.meta['torch']}; prompts "
            f"{self.prompts}, "
            f"outputs {self.outputs}, repeats {self.repeats}, context {self.context}; TP>1 from the communication model"
        )
        comparison.print_table(
            [
                "model",
                "variants",
                "configs estimated",
                "GPU-s",
                "wall s",
                "ckpt GiB (apparent / disk)",
                "fastest at 512+128 (or why not)",
            ],
            rows,
        )
        print(
            f"elapsed {time.monotonic() - self.t0:.0f} s; maps: {self.maps_dir} (iserve simulate --maps "
            f"{self.maps_dir}); "
            f"summary: {self.out / 'profile_maps.json'}"
        )


def _holes_supported(folder: Path) -> bool:
    """Whether files in ``folder`` keep holes (a 64 MiB hole must take almost no disk blocks)."""
    probe = folder / ".hole-probe"
    try:
        with open(probe, "wb") as f:
            f.seek(64 << 20)
            f.write(b"\0")
        return probe.stat().st_blocks * 512 < (1 << 20)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ensure_importable("iserve.fingerprint.validate", script="profile_maps")
    return ProfileMaps(a).run()


if __name__ == "__main__":
    raise SystemExit(main())
