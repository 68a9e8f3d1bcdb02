"""Diagnostic for the fingerprint method: where an engine load's time goes, and whether
the device time of a decode step, timed over many back-to-back steps, extrapolates from the 1- and
2-layer fingerprints to the model in a straight line.

For each model and variant it loads the 1- and 2-layer fingerprints, the 2-layer one replayed to
the model's depth (shared layers, and with ``--distinct`` distinct copies), and the full model, and
prints one row per variant:

* load phases of each engine (tensor reading and building, fused-kernel check, decode and prefill
  graph captures, the rest);
* device ms per decode step at two positions: ``K`` steps queued behind a GPU spin between two CUDA
  events (``Engine._decode``, what ``generate`` runs per token less sampling and the host's wait);
* the line through the two fingerprints at the model's depth against the replayed and full models;
* the full model's wall TPOT through ``generate`` (what a request pays), to see the host's gap.

GPU only. Usage: ``python bench/probes/probe_fingerprint_timing.py --out DIR [--models llama-2-7b,llama-2-13b]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _importable import ensure_importable  # noqa: E402

ensure_importable()
import torch  # noqa: E402

import iserve.gpu_agent.engine  # noqa: E402,F401
from iserve import checkpoint  # noqa: E402
from iserve.fingerprint import generator  # noqa: E402
from iserve.gpu_agent import profiling  # noqa: E402
from iserve.gpu_agent.engine import graphs, loading, runner  # noqa: E402
from iserve.gpu_agent.engine import stage as stage_mod  # noqa: E402
from iserve.gpu_agent.profiling import timing  # noqa: E402
from iserve.messages import ProfileVariant  # noqa: E402
from iserve.modelmaker import make_checkpoint  # noqa: E402

VARIANTS = {
    "fp16": ProfileVariant(),
    "int8": ProfileVariant(weight_quant="int8"),
    "int4": ProfileVariant(weight_quant="int4"),
    "kvint8": ProfileVariant(kv_quant="int8"),
    "structured": ProfileVariant(pruning="structured"),
    "p24": ProfileVariant(pruning="2:4"),
    "int4-kvint8-structured": ProfileVariant(weight_quant="int4", kv_quant="int8", pruning="structured"),
}
CONTEXT = 2048
POSITIONS = (512, 1536)

_phases: dict[str, float] = {}


def _timed(name, fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            _phases[name] = _phases.get(name, 0.0) + time.perf_counter() - t

    return wrap


graphs.DecodeGraphs.__init__ = _timed("decode_graphs", graphs.DecodeGraphs.__init__)
graphs.PrefillGraphs.__init__ = _timed("prefill_graphs", graphs.PrefillGraphs.__init__)
runner.Engine._enable_fused = _timed("fused_check", runner.Engine._enable_fused)
loading.load_tokenizer = _timed("tokenizer", loading.load_tokenizer)
stage_mod.Stage.__init__ = _timed("build_stage", stage_mod.Stage.__init__)


def load(path, variant: ProfileVariant, replay: int = 0, distinct: bool = False):
    _phases.clear()
    t = time.perf_counter()
    engine = profiling.load_engine(path, "cuda:0", CONTEXT, variant, replay_layers=replay, replay_distinct=distinct)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
    phases = dict(_phases)
    phases["other"] = total - sum(phases.values())
    phases["total"] = total
    return engine, {k: round(v, 3) for k, v in phases.items()}


def device_decode_ms(engine, clock, pos: int, k: int = 48, reps: int = 5) -> float:
    """Median over ``reps`` of the mean device time of ``k`` back-to-back decode steps at ``pos``."""
    out = []
    with runner._compute():
        engine._token.fill_(7)
        for _ in range(3):
            engine._decode(pos)
        clock.sync()
        for _ in range(reps):
            clock.spin(4.0 + 0.05 * k)
            a = clock.mark()
            for _ in range(k):
                engine._decode(pos)
            b = clock.mark()
            clock.sync()
            out.append(clock.elapsed(a, b) / k)
    return statistics.median(out)


def wall_tpot_ms(engine, prompt: int = 512, outputs: int = 32, reps: int = 3) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, engine.arch.vocab_size, (prompt,), generator=g).tolist()
    steps: list[float] = []
    for _ in range(reps + 1):
        _, s = timing._run_wall(engine, ids, outputs)
        steps += s
    return statistics.median(steps[outputs - 1 :])  # the first run is a warm-up


def measure(path, variant, clock, *, replay=0, distinct=False, wall=False) -> dict:
    engine, phases = load(path, variant, replay, distinct)
    try:
        row = {"load": phases, "replay_copies": sum(s.replay_copies for s in engine.stages)}
        row["device"] = {p: device_decode_ms(engine, clock, p) for p in POSITIONS}
        if wall:
            row["wall_tpot"] = wall_tpot_ms(engine)
        return row
    finally:
        engine.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--models",
        default="llama-2-7b:fp16,int8,int4,kvint8,structured,p24;llama-2-13b:fp16,int4,int4-kvint8-structured",
    )
    ap.add_argument(
        "--distinct", default="llama-2-13b", help="models whose replayed run is also timed with distinct copies"
    )
    ap.add_argument("--budget-s", type=float, default=560)
    ap.add_argument("--work", default="/dev/shm/probe")
    a = ap.parse_args()
    deadline = time.monotonic() + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = profiling.DeviceClock(torch.device("cuda:0"))
    results: list[dict] = []
    print(
        f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        flush=True,
    )
    for spec in a.models.split(";"):
        preset, variants = spec.split(":")
        t = time.perf_counter()
        mdir = make_checkpoint(Path(a.work) / preset, preset, dtype="float16", device="cuda")
        ck = checkpoint.scan_checkpoint(mdir)
        fps = [i.path for i in generator.make_fingerprints(ck, Path(a.work) / f"{preset}-fp")]
        L = ck.arch.num_layers
        print(f"# {preset}: {L} layers, written with its fingerprints in {time.perf_counter() - t:.1f} s", flush=True)
        for name in variants.split(","):
            if time.monotonic() > deadline:
                print(f"# out of time before {preset} {name}", flush=True)
                break
            v = VARIANTS[name]
            row: dict = {"model": preset, "variant": name, "layers": L}
            row["fp1"] = measure(fps[0], v, clock, wall=True)
            row["fp2"] = measure(fps[1], v, clock, wall=True)
            row["deep"] = measure(fps[1], v, clock, replay=L)
            if preset in a.distinct.split(","):
                row["deep_distinct"] = measure(fps[1], v, clock, replay=L, distinct=True)
            row["full"] = measure(mdir, v, clock, wall=True)
            results.append(row)
            (out / "probe.json").write_text(json.dumps(results, indent=1))
            for p in POSITIONS:
                d1, d2 = row["fp1"]["device"][p], row["fp2"]["device"][p]
                pred = d1 + (L - 1) * (d2 - d1)
                full = row["full"]["device"][p]
                deep = row["deep"]["device"][p]
                dd = row.get("deep_distinct", {}).get("device", {}).get(p)
                print(
                    f"{preset} {name:24s} pos {p:5d}: dev1 {d1:.4f} dev2 {d2:.4f} line@{L} {pred:7.3f} deep {deep:7.3f}"
                    + (f" deep-distinct {dd:7.3f}" if dd else "")
                    + f" full {full:7.3f} | line err {pred / full - 1:+.2%} deep err {deep / full - 1:+.2%}"
                    + (f" distinct err {dd / full - 1:+.2%}" if dd else ""),
                    flush=True,
                )
            gap1 = row["fp1"]["wall_tpot"] - statistics.mean(row["fp1"]["device"].values())
            print(
                f"{preset} {name:24s} wall TPOT fp1 {row['fp1']['wall_tpot']:.4f} fp2 {row['fp2']['wall_tpot']:.4f} "
                f"full {row['full']['wall_tpot']:.3f} (full device@512 {row['full']['device'][512]:.3f}; fp1 "
                f"wall-device {gap1:.4f})",
                flush=True,
            )
            for k in ("fp1", "fp2", "deep", "full"):
                print(f"   load {k:5s}: " + ", ".join(f"{n} {s:.2f}" for n, s in row[k]["load"].items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
