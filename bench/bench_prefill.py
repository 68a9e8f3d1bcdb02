"""Time to first token with eager prefill against captured (CUDA-graph) prefill, side by side.

For each model shape (random weights, written under ``--work-dir``) and each variant, two engines are
loaded at once: one with prefill graphs (the default, prompts up to 2048 tokens), one without
(``prefill_graph_tokens=0``); both capture their decode step. Each prompt length is then timed on
both, alternating, ``--repeats`` times: ``generate(max_tokens=1)``, host wall time from the call to
the first token (what a client waits for). The table gives the median of each, the ratio, and the
spread (max - min over the repeats, as a share of the median): an eager prefill of a few hundred
tokens is bound by the host's kernel launches, which vary from run to run.

Usage (on the GPU machine)::

    python3 bench/bench_prefill.py --out OUT_DIR [--models llama-2-7b,llama-3-8b,llama-2-13b]
        [--variants fp16,kv-int8,int8,int4] [--prompts 16,128,200,256,512,1024] [--repeats 15]
    python3 bench/bench_prefill.py --tiny --out OUT_DIR   # CPU: checks the script (no graphs there)

Writes OUT_DIR/bench_prefill.json and prints the table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cli import int_list, model_list, run_meta, torch_device  # noqa: E402
from bench_fingerprint import ensure_importable  # noqa: E402

VARIANTS = {
    "fp16": dict(),
    "kv-int8": dict(kv_quant="int8"),
    "int8": dict(weight_quant="int8"),
    "int4": dict(weight_quant="int4"),
    "structured": dict(pruning="structured"),
    "2:4": dict(pruning="2:4"),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument(
        "--tiny", action="store_true", help="a tiny model on the CPU (checks the script; timings mean nothing)"
    )
    p.add_argument("--models", default="", help="presets (default llama-2-7b,llama-3-8b,llama-2-13b; tiny: tiny-llama)")
    p.add_argument("--variants", default="fp16,kv-int8,int8,int4")
    p.add_argument("--first-only", default="int8,int4", help="variants run on the first model only")
    p.add_argument("--prompts", default="", help="prompt lengths (default 16,128,200,256,512,1024; tiny 8,40)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="")
    p.add_argument("--work-dir", default="/dev/shm/iserve-bench-prefill")
    return p.parse_args(argv)


def _time(engine, ids: list[int]) -> float:
    t = time.perf_counter()
    engine.generate(ids, max_tokens=1, ignore_eos=True)
    return (time.perf_counter() - t) * 1e3


def bench_variant(
    path: Path, device: str, name: str, kwargs: dict, prompts: list[int], repeats: int, context: int
) -> list[dict]:
    import torch

    from iserve.gpu_agent.engine import Engine

    n = _layers(path)
    graphs = Engine.load(path, [(device, 0, n)], context, **kwargs)
    eager = Engine.load(path, [(device, 0, n)], context, prefill_graph_tokens=0, **kwargs)
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        for p in prompts:
            ids = torch.randint(3, graphs.arch.vocab_size, (p,), generator=g).tolist()
            for e in (graphs, eager):  # warm-up: lazily loaded kernels, allocator growth
                _time(e, ids)
            t_graph, t_eager = [], []
            gc.disable()
            try:
                for _ in range(repeats):
                    t_graph.append(_time(graphs, ids))
                    t_eager.append(_time(eager, ids))
            finally:
                gc.enable()
            mg, me = statistics.median(t_graph), statistics.median(t_eager)
            rows.append(
                {
                    "variant": name,
                    "prompt": p,
                    "padded_to": graphs._prefill_length(p) or p,
                    "graph_ms": round(mg, 3),
                    "eager_ms": round(me, 3),
                    "speedup": round(me / mg, 3),
                    "graph_spread": round((max(t_graph) - min(t_graph)) / mg, 4),
                    "eager_spread": round((max(t_eager) - min(t_eager)) / me, 4),
                    "captured": graphs.prefill_graph_tokens,
                    "capture_error": graphs.prefill_graph_error,
                }
            )
            print(f"  {name} {p:5d} tokens: graph {mg:8.3f} ms  eager {me:8.3f} ms  x{me / mg:.2f}", flush=True)
    finally:
        graphs.close()
        eager.close()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def _layers(path: Path) -> int:
    from iserve.checkpoint import scan_checkpoint

    return scan_checkpoint(path).arch.num_layers


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    ensure_importable()
    import torch

    import iserve.gpu_agent.engine  # noqa: F401 - before CUDA starts: the engine sets the allocator's options
    from iserve.fingerprint import comparison
    from iserve.modelmaker import make_checkpoint

    device = torch_device(a.device, a.tiny)
    if a.tiny:
        torch.set_num_threads(1)
    models = model_list(
        a.models,
        [("tiny-llama", 4, True)]
        if a.tiny
        else [("llama-2-7b", None, True), ("llama-3-8b", None, True), ("llama-2-13b", None, True)],
    )
    prompts = int_list(a.prompts, [8, 40] if a.tiny else [16, 128, 200, 256, 512, 1024])
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    first_only = set(x for x in a.first_only.split(",") if x)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work_dir)
    meta = run_meta(device) | {"repeats": a.repeats, "prompts": prompts}
    results = []
    print(f"bench_prefill on {meta['gpu']} ({device}), torch {meta['torch']}", flush=True)
    for i, (preset, layers, _) in enumerate(models):
        path = work / preset
        try:
            make_checkpoint(path, preset, num_layers=layers, dtype="float16", device="cpu" if a.tiny else device)
            for v in variants:
                if i > 0 and v in first_only:
                    continue
                print(f"{preset} {v}", flush=True)
                rows = bench_variant(
                    path, device, v, VARIANTS[v], prompts, a.repeats, context=2048 if not a.tiny else 64
                )
                results += [{"model": preset} | r for r in rows]
        finally:
            shutil.rmtree(path, ignore_errors=True)
        (out / "bench_prefill.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))

    print(
        f"\nTTFT, eager vs captured prefill, {meta['date']}, {meta['gpu']}, torch {meta['torch']}; median of "
        f"{a.repeats} "
        "generate(max_tokens=1), host wall; spread = (max - min) / median"
    )
    head = [
        "model",
        "variant",
        "prompt",
        "padded",
        "graph ms",
        "eager ms",
        "eager/graph",
        "graph spread",
        "eager spread",
    ]
    table = [
        [
            r["model"],
            r["variant"],
            str(r["prompt"]),
            str(r["padded_to"]),
            f"{r['graph_ms']:.2f}",
            f"{r['eager_ms']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{100 * r['graph_spread']:.1f}%",
            f"{100 * r['eager_spread']:.1f}%",
        ]
        for r in results
    ]
    comparison.print_table(head, table)
    errors = {r["capture_error"] for r in results if r["capture_error"]}
    for e in errors:
        print("capture error:", e)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
