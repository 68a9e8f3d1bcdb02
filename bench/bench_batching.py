"""Continuous-batching benchmark of iServe's torch engine on one GPU: a concurrency sweep.

One run, one table. For each model (random weights of a known architecture, made on the GPU):

* the HBM bandwidth: a device-to-device copy (``bench_engine.copy_bandwidth``, read + written);
* the batch-1 engine (CUDA graphs) as the paper mode serves: TPOT of one request (median of 2);
* the batching engine (``BatchEngine``) at each concurrency ``c``: ``2c`` requests (at least 4) of
  ``--prompt`` fixed tokens and ``--output`` tokens (EOS ignored), ``c`` in flight at a time (a
  finished request is replaced at once, like ``vllm bench serve --max-concurrency``): output
  tokens/s over the wall time, TTFT and TPOT p50/p99, and the mean pure-decode step (steps that
  computed no prompt tokens) against its roofline: (weight bytes + KV bytes the step's attention
  reads) / the copy bandwidth.

Usage (on the GPU machine)::

    python3 bench/bench_batching.py --out OUT_DIR [--models llama-3-8b] [--variants fp16,int8,int4]
        [--concurrency 1,2,4,8,16,32,64,128] [--variant-concurrency 1,32,64] [--prompt 1024] [--output 128]

Then (``--sharegpt N``, default 500) a ShareGPT-shaped run on fp16 at the concurrency of the highest
sweep throughput (or ``--sharegpt-concurrency``; vLLM's figure runs up to 256 at once): N requests,
prompt lengths from the ShareGPT sample in ``../shared/data`` (its
first human turns, counted as ceil(UTF-8 bytes / 4) tokens: the checkpoint has random weights and
no trained tokenizer; capped at ``--prompt``) and output lengths from the Azure conversation trace's
``GeneratedTokens`` (the sample has no answers; capped at 1024 and at the context left), paired by
row, EOS ignored.

``--tiny`` runs a tiny model on the CPU (a check of the script, not a benchmark).
The table is printed last and written to OUT_DIR/table.md, every number to OUT_DIR/results.json.
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cli import int_list, run_meta  # noqa: E402

VARIANTS = {"fp16": {}, "int8": {"weight_quant": "int8"}, "int4": {"weight_quant": "int4"}}


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def pct(xs: list[float], q: float) -> float:
    from iserve.stats import percentile

    return percentile(xs, q) if xs else 0.0


def batch_one_tpot(engine, prompt: list[int], output: int) -> float:
    runs = [engine.generate(prompt, max_tokens=output, ignore_eos=True).tpot_ms for _ in range(2)]
    return statistics.median(runs)


def sweep_point(batch, prompt: list[int], output: int, c: int, weight_bytes: int, slot_bytes: int, bw: float) -> dict:
    """``2c`` requests (at least 4), ``c`` in flight; the point's figures."""
    total = max(4, 2 * c)
    submitted = 0
    results = []
    decode_steps: list[tuple[float, float, int]] = []  # (seconds, roofline seconds, batch)
    t0 = time.perf_counter()
    while submitted < min(c, total):
        batch.submit(f"r{submitted}", prompt, max_tokens=output, ignore_eos=True)
        submitted += 1
    while batch.busy:
        events = batch.step()
        st = batch.last_step
        if st.decodes and not st.prefill_tokens:
            roof = (weight_bytes + st.kv_read * slot_bytes) / bw
            decode_steps.append((st.seconds, roof, st.decodes))
        for e in events:
            if e.result is not None:
                results.append(e.result)
                if submitted < total:
                    batch.submit(f"r{submitted}", prompt, max_tokens=output, ignore_eos=True)
                    submitted += 1
    wall = time.perf_counter() - t0
    out_tokens = sum(len(r.tokens) for r in results)
    ttft = [r.ttft_ms for r in results]
    tpot = [r.tpot_ms for r in results]
    step_ms = statistics.fmean(s for s, _, _ in decode_steps) * 1e3 if decode_steps else 0.0
    roof_ms = statistics.fmean(r for _, r, _ in decode_steps) * 1e3 if decode_steps else 0.0
    return {
        "concurrency": c,
        "requests": len(results),
        "wall_s": wall,
        "output_tok_s": out_tokens / wall,
        "ttft_p50": pct(ttft, 50),
        "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
        "decode_step_ms": step_ms,
        "roofline_ms": roof_ms,
        "vs_roofline": step_ms / roof_ms if roof_ms else 0.0,
        "decode_batch_mean": statistics.fmean(b for _, _, b in decode_steps) if decode_steps else 0.0,
    }


def sharegpt_shapes(n: int, max_prompt: int, max_output: int) -> list[tuple[int, int]]:
    """``n`` (prompt, output) lengths: ShareGPT prompt sizes paired with Azure conversation outputs."""
    from iserve.loadgen.traces import default_prompts_path, load_prompts, load_trace

    path = default_prompts_path()
    if path is None:
        raise SystemExit("the ShareGPT sample is not next to the repository (../shared/data); pass --sharegpt 0")
    prompts = load_prompts(path)
    outputs = [r.generated_tokens for r in load_trace("conv")]
    return [
        (max(1, min(max_prompt, -(-len(prompts[i % len(prompts)].encode()) // 4))), max(1, min(max_output, outputs[i])))
        for i in range(n)
    ]


def sharegpt_point(batch, vocab: int, c: int, shapes: list[tuple[int, int]]) -> dict:
    """The ShareGPT-shaped requests, ``c`` in flight; output tokens/s, TTFT and TPOT."""
    pending = list(enumerate(shapes))
    results = []
    t0 = time.perf_counter()

    def submit_next() -> None:
        i, (p, o) = pending.pop(0)
        ids = [1] + [(13 * i + 7 * j) % (vocab - 2) + 2 for j in range(p - 1)]
        batch.submit(f"g{i}", ids, max_tokens=o, ignore_eos=True)

    while pending and batch.running + batch.waiting < c:
        submit_next()
    while batch.busy:
        for e in batch.step():
            if e.result is not None:
                results.append(e.result)
                if pending:
                    submit_next()
    wall = time.perf_counter() - t0
    tpot = [r.tpot_ms for r in results if r.step_ms]
    return {
        "concurrency": c,
        "requests": len(results),
        "wall_s": wall,
        "output_tok_s": sum(len(r.tokens) for r in results) / wall,
        "prompt_tokens_mean": statistics.fmean(p for p, _ in shapes),
        "output_tokens_mean": statistics.fmean(o for _, o in shapes),
        "ttft_p50": pct([r.ttft_ms for r in results], 50),
        "ttft_p99": pct([r.ttft_ms for r in results], 99),
        "tpot_p50": pct(tpot, 50),
        "tpot_p99": pct(tpot, 99),
    }


def run_model(preset: str, args, device: str, bw: float, save) -> list[dict]:
    """The model's sweep (``save(rows)`` after each point, so that a cut run keeps what it measured)."""
    from iserve.checkpoint import scan_checkpoint
    from iserve.gpu_agent.engine import Engine
    from iserve.gpu_agent.engine.batch import BatchEngine
    from iserve.gpu_agent.engine.kv_pool import PagedKV

    rows = []
    path = Path(args.models_dir) / preset
    if args.tiny:
        from iserve.modelmaker import make_checkpoint

        make_checkpoint(path, "tiny-llama", num_layers=4)
    else:
        from bench_engine import make_model

        make_model(preset, path)
    context = args.prompt + args.output
    for variant in args.variants:
        points = args.concurrency if variant == "fp16" else args.variant_concurrency
        log(preset, variant, "loading")
        arch = scan_checkpoint(path).arch
        layers = arch.num_layers
        prompt = [1] + [(7 * i) % (arch.vocab_size - 2) + 2 for i in range(args.prompt - 1)]
        engine = Engine.load(path, [(device, 0, layers)], context_tokens=context, **VARIANTS[variant])
        base_tpot = batch_one_tpot(engine, prompt, args.output)
        log(preset, variant, f"batch-1 engine TPOT {base_tpot:.2f} ms")
        weight_bytes = engine.weight_bytes()
        s = engine.stages[0]
        slot_bytes = PagedKV.bytes_per_slot(len(s.layers), s._kv_shape[0], engine.arch.head_dim, s.dtype, "fp16")
        engine.release_static_cache()
        if device.startswith("cuda"):
            free, _ = torch.cuda.mem_get_info(device)
            room = int((free - 6 * 2**30) / slot_bytes)  # 6 GiB left for activations
        else:
            room = 10**9
        top = max(points + ([args.sharegpt_concurrency] if variant == "fp16" and args.sharegpt else []))
        kv_tokens = min(top * context, room)
        batch = BatchEngine(
            engine,
            max_batch=top,
            kv_tokens=kv_tokens,
            step_tokens=args.step_tokens,
            release_static_cache=False,
        )
        log(
            preset,
            variant,
            f"pool {kv_tokens} slots ({batch.pool_bytes / 2**30:.1f} GiB) = {kv_tokens // context} full sequences",
        )
        batch.submit("warm", prompt, max_tokens=4, ignore_eos=True)
        batch.run_until_idle()
        for c in points:
            p = sweep_point(batch, prompt, args.output, c, weight_bytes, slot_bytes, bw)
            p.update(model=preset, variant=variant, batch1_tpot_ms=base_tpot, pool_sequences=kv_tokens // context)
            log(
                preset,
                variant,
                f"c={c}: {p['output_tok_s']:.0f} tok/s, TTFT p50 {p['ttft_p50']:.0f} ms, "
                f"TPOT p50 {p['tpot_p50']:.2f} ms, step {p['decode_step_ms']:.2f} ms "
                f"= {p['vs_roofline']:.2f}x roofline",
            )
            rows.append(p)
            save(rows)
        if variant == "fp16" and args.sharegpt:
            best = max(
                (r for r in rows if r["model"] == preset and r["variant"] == "fp16"), key=lambda r: r["output_tok_s"]
            )
            shapes = [(pl, min(ol, context - pl)) for pl, ol in sharegpt_shapes(args.sharegpt, args.prompt, 1024)]
            g = sharegpt_point(batch, arch.vocab_size, args.sharegpt_concurrency or best["concurrency"], shapes)
            g.update(model=preset, variant="fp16", workload="sharegpt")
            log(preset, f"ShareGPT-shaped, c={g['concurrency']}: {g['output_tok_s']:.0f} output tok/s")
            args.sharegpt_rows.append(g)
        del batch, engine
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    if not args.keep_models:
        shutil.rmtree(path, ignore_errors=True)
    return rows


def table(rows: list[dict], bw: float) -> str:
    lines = [
        f"copy bandwidth {bw / 1e12:.2f} TB/s (read + written)",
        "",
        "| model | variant | c | out tok/s | x c=1 | TTFT p50 / p99 ms | TPOT p50 / p99 ms | batch-1 TPOT ms "
        "| decode step ms | roofline ms | step / roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["model"], r["variant"])
        if r["concurrency"] == 1:
            base[key] = r["output_tok_s"]
        gain = r["output_tok_s"] / base[key] if key in base else 0.0
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['concurrency']} | {r['output_tok_s']:.0f} | {gain:.1f} "
            f"| {r['ttft_p50']:.0f} / {r['ttft_p99']:.0f} | {r['tpot_p50']:.2f} / {r['tpot_p99']:.2f} "
            f"| {r['batch1_tpot_ms']:.2f} | {r['decode_step_ms']:.2f} | {r['roofline_ms']:.2f} "
            f"| {r['vs_roofline']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="llama-3-8b")
    p.add_argument("--variants", default="fp16,int8,int4")
    p.add_argument("--concurrency", default="")
    p.add_argument("--variant-concurrency", default="")
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--step-tokens", type=int, default=2048)
    p.add_argument("--models-dir", default="/dev/shm/iserve-bench")
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--sharegpt", type=int, default=500, help="requests of the ShareGPT-shaped run (0: none)")
    p.add_argument(
        "--sharegpt-concurrency", type=int, default=0, help="its requests in flight (0: the sweep's best concurrency)"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the script")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    args.sharegpt_rows = []
    if args.tiny:
        args.sharegpt = min(args.sharegpt, 12)
    args.concurrency = int_list(args.concurrency, [1, 2, 4] if args.tiny else [1, 2, 4, 8, 16, 32, 64, 128])
    args.variant_concurrency = int_list(args.variant_concurrency, [1, 2] if args.tiny else [1, 32, 64])
    if args.tiny:
        args.prompt, args.output, args.models = min(args.prompt, 64), min(args.output, 16), "tiny"
        args.models_dir = "/tmp/iserve-bench"
    device = "cpu" if args.tiny else "cuda:0"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = 1e11
    if not args.tiny:
        from bench_engine import copy_bandwidth

        bw = copy_bandwidth()
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s")
    rows: list[dict] = []

    def save(more: list[dict]) -> None:
        meta = {"meta": run_meta(device), "bandwidth": bw, "args": vars(args), "rows": rows + more}
        (out / "results.json").write_text(json.dumps(meta, indent=1, default=str))
        (out / "table.md").write_text(table(rows + more, bw) + "\n")  # rewritten in full at the end

    for preset in args.models.split(","):
        rows += run_model(preset, args, device, bw, save)
        save([])
    text = table(rows, bw)
    for g in args.sharegpt_rows:
        text += (
            f"\n\nShareGPT-shaped ({g['requests']} requests, prompt mean {g['prompt_tokens_mean']:.0f} tokens, "
            f"output mean {g['output_tokens_mean']:.0f}), {g['model']} fp16 at concurrency {g['concurrency']}: "
            f"{g['output_tok_s']:.0f} output tok/s, TTFT p50/p99 {g['ttft_p50']:.0f}/{g['ttft_p99']:.0f} ms, "
            f"TPOT p50/p99 {g['tpot_p50']:.2f}/{g['tpot_p99']:.2f} ms"
        )
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
