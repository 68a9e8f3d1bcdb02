"""Where the time of the batching engine's decode step goes, on one GPU: one run, one table.

For one model (random weights of a known architecture, made on the GPU) and a context of
``--prompt`` + ``--output`` tokens:

* the HBM copy bandwidth (``bench_engine.copy_bandwidth``, read + written) and the batch-1 engine's
  TPOT (CUDA graphs, fused Triton kernels): the reference the batched step must match at batch 1;
* each projection of a layer and the LM head alone, ``M`` rows in (cuBLAS, and the Triton GEMV for
  a few rows), against its weight bytes over the bandwidth;
* the paged split-K decode attention alone at each batch size, every sequence at the full context,
  with the split count the engine picks and the others, against the KV bytes over the bandwidth;
* the captured decode step of ``BatchEngine`` at each batch size: GPU time of a graph replay, wall
  time of ``BatchEngine.step`` (so host time = wall - GPU), against the step's roofline (weight
  bytes + KV bytes read) / bandwidth; and the same buckets captured with the fused Triton
  projections (``batch_graphs.FUSED_ROWS``) up to ``--fused-rows``;
* a kernel-by-kernel profile (torch.profiler) of the replayed step at batch 1 and at the largest
  batch, summed by kind (matrix products, attention, norms, element-wise, copies);
* one prompt chunk of ``--prompt`` tokens: its time and achieved TFLOP/s, and the bound it puts on
  the sweep's throughput (``bench_batching.py``: every request's prefill plus its share of decode).

Usage (on the GPU machine)::

    python3 bench/profile_decode.py --out OUT_DIR [--model llama-3-8b] [--batches 1,8,32,64,128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _cli import int_list, run_meta  # noqa: E402
from bench_engine import copy_bandwidth, cuda_ms, make_model  # noqa: E402


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call of ``fn``, ``calls`` captured in one CUDA graph (no launch gaps)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return cuda_ms(g.replay, 10) * 1e3 / calls


def gemm_rows(layer, lm_head: torch.Tensor, rows: list[int], bw: float, gemv_rows: int) -> list[dict]:
    from iserve.gpu_agent.engine import kernels, quant

    out = []
    weights = {
        "qkv": layer.qkv.gemv_operands()[0],
        "o": layer.o.gemv_operands()[0],
        "gate_up": layer.mlp.gate_up.gemv_operands()[0],
        "down": layer.mlp.down.gemv_operands()[0],
        "lm_head": lm_head,
    }
    for name, w in weights.items():
        n, k = w.shape
        i8 = quant.Int8Linear(w, w.dtype)
        floor_us = w.numel() * w.element_size() / bw * 1e6
        for m in rows:
            x = torch.randn(m, k, device=w.device, dtype=w.dtype)
            row = dict(weight=name, n=n, k=k, m=m, floor_us=round(floor_us, 1))
            row["cublas_us"] = round(graph_us(lambda: F.linear(x, w)), 1)
            if m <= gemv_rows:
                row["gemv_us"] = round(graph_us(lambda: kernels.gemv(x, w)), 1)
            if name != "lm_head":  # the int8 format's kernel for this many rows (``quant.Int8Linear``)
                row["int8_us"] = round(graph_us(lambda: i8(x)), 1)
            out.append(row)
            log(name, row)
    return out


def attention_rows(batches: list[int], context: int, kv_heads: int, heads: int, d: int, bw: float) -> list[dict]:
    from iserve.gpu_agent.engine import kernels

    out = []
    bs = 16
    for b in batches:
        blocks = -(-context // bs)
        slots = (b * blocks + 1) * bs
        k = torch.randn(slots, kv_heads, d, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        tables = (torch.arange(b * blocks, device="cuda", dtype=torch.int32) + 1).view(b, blocks)
        lens = torch.full((b,), context, dtype=torch.long, device="cuda")
        q = torch.randn(b, heads, d, device="cuda", dtype=torch.float16)
        floor_us = 2 * b * context * kv_heads * d * 2 / bw * 1e6
        picked = kernels.paged_splits(b, kv_heads, context)
        row = dict(batch=b, context=context, floor_us=round(floor_us, 1), picked_splits=picked)
        for s in sorted({1, 2, 4, 8, 16, 32, picked}):
            us = graph_us(lambda s=s: kernels.paged_decode_attention(q, k, v, None, None, tables, lens, bs, 0, s))
            row[f"splits_{s}_us"] = round(us, 1)
        out.append(row)
        log("attention", row)
    torch.cuda.empty_cache()
    return out


KINDS = (
    ("attention", ("paged_attn", "attn_partial", "attn_reduce", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "gemv", "cutlass", "sm90", "xmma", "cublas", "matmul", "splitk")),
    ("norm", ("rms", "norm")),
    ("copy/index", ("copy", "index", "gather", "scatter", "memcpy", "memset", "embedding", "cat")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "element-wise/other"


def profile_step(fn, reps: int, out: Path, tag: str) -> dict:
    """CUDA time per call of ``fn`` by kernel kind (torch.profiler), and the top kernels to a file."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    kernels = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(e.name)] += e.device_time_total / reps  # us
            kernels += 1
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=30, max_name_column_width=90)
    (out / f"profile-{tag}.txt").write_text(table)
    return {"kernels_per_step": kernels / reps, **{k: round(v, 1) for k, v in sorted(by_kind.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--fused-rows", type=int, default=8, help="capture buckets up to this with the Triton GEMV")
    p.add_argument("--models-dir", default="/dev/shm/iserve-profile")
    args = p.parse_args()
    from iserve.checkpoint import scan_checkpoint
    from iserve.gpu_agent.engine import Engine, batch_graphs
    from iserve.gpu_agent.engine.batch import BatchEngine
    from iserve.gpu_agent.engine.kv_pool import PagedKV

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    batches = int_list(args.batches, [])
    context = args.prompt + args.output
    res: dict = {"meta": run_meta("cuda:0"), "args": vars(args)}

    def save() -> None:
        (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))

    bw = copy_bandwidth()
    res["bandwidth"] = bw
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    path = Path(args.models_dir) / args.model
    _, params = make_model(args.model, path)
    arch = scan_checkpoint(path).arch
    engine = Engine.load(path, [("cuda:0", 0, arch.num_layers)], context_tokens=context)
    prompt = [1] + [(7 * i) % (arch.vocab_size - 2) + 2 for i in range(args.prompt - 1)]
    tpots = [engine.generate(prompt, max_tokens=64, ignore_eos=True).tpot_ms for _ in range(3)]
    weight_bytes = engine.weight_bytes()
    stage = engine.stages[0]
    res["batch1"] = dict(tpot_ms=statistics.median(tpots), fused=engine.fused_decode, weight_bytes=weight_bytes)
    res["batch1"]["floor_ms"] = weight_bytes / bw * 1e3
    log("batch-1 engine", res["batch1"])
    save()

    res["gemm"] = gemm_rows(stage.layers[0], stage.lm_head, batches, bw, args.fused_rows)
    save()
    kv_heads = stage._kv_shape[0]
    res["attention"] = attention_rows(batches, context, kv_heads, stage.layers[0].heads, arch.head_dim, bw)
    save()

    slot_bytes = PagedKV.bytes_per_slot(len(stage.layers), kv_heads, arch.head_dim, stage.dtype, "fp16")
    engine.release_static_cache()
    top = max(batches)
    # A step takes every waiting prompt at once, so no sequence decodes long before the others start.
    batch = BatchEngine(engine, max_batch=top, kv_tokens=top * context, step_tokens=8192, release_static_cache=False)
    graphs = batch._graphs
    assert graphs is not None, batch.graph_error
    batch_graphs.FUSED_ROWS = args.fused_rows
    alt = batch_graphs.DecodeStep(engine.stages, batch.pools, args.fused_rows, batch.block_size, 0, context)
    res["steps"] = []
    for b in batches:
        for i in range(b):
            batch.submit(f"b{b}-{i}", prompt, max_tokens=args.output, ignore_eos=True)
        while batch.waiting or any(len(s.tokens) == 0 for s in batch._running):
            batch.step()
        walls = []
        kv = 0
        for _ in range(16):
            batch.step()
            st = batch.last_step
            if st.decodes == b and not st.prefill_tokens:
                walls.append(st.seconds * 1e3)
                kv = st.kv_read
        bucket = graphs.bucket(b)
        gpu_ms = cuda_ms(graphs.graphs[bucket][0].replay, 10)
        roof_ms = (weight_bytes + kv * slot_bytes) / bw * 1e3
        row = dict(
            batch=b,
            bucket=bucket,
            wall_ms=round(statistics.median(walls), 3),
            gpu_ms=round(gpu_ms, 3),
            roofline_ms=round(roof_ms, 3),
            gpu_vs_roof=round(gpu_ms / roof_ms, 3),
            wall_vs_roof=round(statistics.median(walls) / roof_ms, 3),
        )
        if bucket in alt.graphs:  # the same sequences' inputs, replayed through the fused capture
            alt.meta.copy_(graphs.meta)
            alt.tables[:bucket].copy_(graphs.tables[:bucket])
            row["fused_gpu_ms"] = round(cuda_ms(alt.graphs[bucket][0].replay, 10), 3)
        if b in (1, top):
            row["profile"] = profile_step(graphs.graphs[bucket][0].replay, 5, out, f"graph-b{b}")
            row["profile_eager"] = profile_step(lambda: graphs._forward(bucket), 3, out, f"eager-b{b}")
            if bucket in alt.graphs:
                row["profile_fused"] = profile_step(alt.graphs[bucket][0].replay, 5, out, f"fused-b{b}")
        res["steps"].append(row)
        log("step", row)
        save()
        for s in list(batch._running):
            batch.cancel(s.seq_id)
        batch.run_until_idle()

    batch.submit("prefill", prompt, max_tokens=1, ignore_eos=True)
    batch.step()
    batch.run_until_idle()
    batch.submit("prefill2", prompt, max_tokens=1, ignore_eos=True)
    batch.step()
    pre_s = batch.last_step.seconds
    batch.run_until_idle()
    flops = 2 * params * args.prompt
    res["prefill"] = dict(tokens=args.prompt, ms=round(pre_s * 1e3, 2), tflops=round(flops / pre_s / 1e12, 1))
    for row in res["steps"]:
        c = row["batch"]
        # c requests of ``output`` tokens each need c prefills and ``output`` steps of batch c
        bound = c * args.output / (c * pre_s + args.output * row["gpu_ms"] / 1e3)
        row["sweep_bound_tok_s"] = round(bound)
    log("prefill", res["prefill"])
    save()
    print(table(res))
    (out / "table.md").write_text(table(res) + "\n")


def table(res: dict) -> str:
    b1 = res["batch1"]
    lines = [
        f"copy bandwidth {res['bandwidth'] / 1e12:.2f} TB/s; batch-1 engine TPOT {b1['tpot_ms']:.2f} ms "
        f"(floor {b1['floor_ms']:.2f} ms); prefill of {res['prefill']['tokens']} tokens "
        f"{res['prefill']['ms']:.1f} ms ({res['prefill']['tflops']} TFLOP/s)",
        "",
        "| batch | step wall ms | step GPU ms | fused GPU ms | roofline ms | GPU / roof | wall / roof "
        "| sweep bound tok/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["steps"]:
        lines.append(
            f"| {r['batch']} | {r['wall_ms']:.2f} | {r['gpu_ms']:.2f} | {r.get('fused_gpu_ms', '')} "
            f"| {r['roofline_ms']:.2f} | {r['gpu_vs_roof']:.2f} | {r['wall_vs_roof']:.2f} | {r['sweep_bound_tok_s']} |"
        )
    lines += ["", "| weight | m | fp16 floor us | cuBLAS us | GEMV us | int8 us |", "|---|---|---|---|---|---|"]
    for r in res["gemm"]:
        lines.append(
            f"| {r['weight']} | {r['m']} | {r['floor_us']} | {r['cublas_us']} | {r.get('gemv_us', '')} "
            f"| {r.get('int8_us', '')} |"
        )
    lines += ["", "| batch | KV floor us | picked splits | us by splits |", "|---|---|---|---|"]
    for r in res["attention"]:
        by = ", ".join(f"{k[7:-3]}: {v}" for k, v in r.items() if k.startswith("splits_"))
        lines.append(f"| {r['batch']} | {r['floor_us']} | {r['picked_splits']} | {by} |")
    for r in res["steps"]:
        for key in ("profile", "profile_eager", "profile_fused"):
            if key in r:
                lines.append(f"\nbatch {r['batch']} {key} (us per step): {r[key]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
