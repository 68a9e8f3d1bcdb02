"""Where a fingerprint profiling job's GPU-seconds go (load, warm-up, timed passes per engine), with
and without the replayed deep run. Diagnostic; prints a table. Usage: python bench/probes/probe_profile_cost.py OUT"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _importable import ensure_importable  # noqa: E402

ensure_importable()
import iserve.gpu_agent.engine  # noqa: E402,F401
from iserve import checkpoint  # noqa: E402
from iserve.fingerprint import generator  # noqa: E402
from iserve.gpu_agent import profiling  # noqa: E402
from iserve.gpu_agent.profiling import measure, timing  # noqa: E402
from iserve.messages import ProfileVariant  # noqa: E402
from iserve.modelmaker import make_checkpoint  # noqa: E402

work = Path("/tmp/probe")
model = make_checkpoint(work / "l7", "llama-2-7b", dtype="float16", device="cuda")
infos = generator.make_fingerprints(checkpoint.scan_checkpoint(model), work / "fp")
paths = [i.path for i in infos]
phases: list[tuple[str, float]] = []


def timed(name, fn):
    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases.append((name, time.perf_counter() - t))

    return wrap


measure.load_engine = timed("load_engine", measure.load_engine)
measure.warm_up = timed("warm_up", measure.warm_up)
timing._wall_pass = timed("wall_pass", timing._wall_pass)
timing._device_pass = timed("device_pass", timing._device_pass)
for replay in (0, 32, 32):
    for variant in (ProfileVariant(), ProfileVariant(weight_quant="int4")):
        phases.clear()
        proto = profiling.Protocol(
            prompt_lengths=(128, 512, 1024), output_lengths=(8, 32), repeats=7, context_tokens=2048, replay_depth=replay
        )
        t = time.perf_counter()
        profiling.measure_models(paths, "cuda:0", protocol=proto, variant=variant)
        total = time.perf_counter() - t
        print(
            f"replay {replay:2d} {variant.weight_quant}: total {total:6.2f} s | "
            + ", ".join(f"{n} {s:.2f}" for n, s in phases),
            flush=True,
        )
