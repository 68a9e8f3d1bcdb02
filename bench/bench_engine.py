"""Batch-1 decode benchmark of iServe's torch engine against Hugging Face transformers, on one GPU.

One run, one table. For each model shape (random weights, generated on the GPU and written as a
safetensors checkpoint under /dev/shm), in this order and in this one process:

* the HBM floor: a device-to-device copy of a 4 GiB buffer, timed with CUDA events (median of 20),
  counting bytes read plus bytes written; the decode floor of a model is its fp16 weight bytes (every
  tensor, as in the product brief) over that bandwidth;
* our engine in each variant (fp16 with CUDA graphs, fp16 eager, int8, int4, int8 KV cache, 2:4,
  structured pruning): TTFT of a 512-token prompt (median of 5 ``generate(max_tokens=1)``), TPOT
  (median decode step of 3 runs of 128 tokens after that prompt), the allocator's peak while
  serving (reset after loading), the weights' bytes, and the quality cost against the fp16 engine
  on the same weights: 64 prompt tokens, then 256 teacher-forced decode steps (the same random
  tokens fed to both), comparing the 256 logit vectors (relative L2 of the logits, share of
  positions whose top-1 token agrees);
* Hugging Face transformers (eager, its default attention), fp16, ``generate`` greedy: TTFT of the
  same prompt (median of 3 ``max_new_tokens=1``), TPOT from ``(t(129 tokens) - t(1 token)) / 128``.

Usage (on the GPU machine)::

    python3 bench/bench_engine.py --out OUT_DIR [--models llama-2-7b,llama-3-8b,llama-2-13b]
        [--variants fp16,fp16-eager,int8,int4,kv-int8,2:4,structured] [--no-hf] [--micro]

``--micro`` first times each projection kernel alone at Llama-2-7B shapes (one row in). The table
is printed last and written to OUT_DIR/table.md, every number to OUT_DIR/results.json.

``--tp 2`` (on a machine with 2 GPUs) instead checks tensor parallelism on the first model, in
float32 and float16: greedy and seeded-sampled tokens from TP=1 (this process, cuda:0) and TP=2 (two
spawned processes, NCCL, cuda:0 and cuda:1), the teacher-forced logit gap between them next to the
gap between two TP=1 decode paths (graphs vs eager), and the TPOT/TTFT of each; OUT_DIR/tp.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "fp16": dict(),
    "fp16-eager": dict(cuda_graphs=False),
    "int8": dict(weight_quant="int8"),
    "int4": dict(weight_quant="int4"),
    "kv-int8": dict(kv_quant="int8"),
    "2:4": dict(pruning="2:4"),
    "structured": dict(pruning="structured"),
}
PROMPT = 512
OUT_TOKENS = 128
CONTEXT = 1024
QUALITY_PREFIX = 64
QUALITY_STEPS = 256
GIB = 2**30


def log(*parts) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, flush=True)


def cuda_ms(fn, reps: int) -> float:
    """Median over ``reps`` of one call of ``fn``, in ms, timed with CUDA events."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device-to-device copy, read + written."""
    n = 4 * GIB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = cuda_ms(lambda: dst.copy_(src), 20)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / (ms / 1e3)


# ---------------------------------------------------------------------------------------------------
# random-weight checkpoints, made on the GPU


def make_model(
    preset: str, out: Path, *, std: float = 0.02, seed: int = 0, shard_bytes: int = 4 * GIB
) -> tuple[Path, int]:
    """Write ``preset``'s shapes with random weights (norms 1.0) as safetensors shards; returns the
    folder and the number of parameters."""
    from safetensors.torch import save_file

    from iserve.checkpoint import arch_from_config, expected_tensors
    from iserve.modelmaker import preset_config

    cfg = preset_config(preset)
    shapes = expected_tensors(arch_from_config(cfg))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator(device="cuda").manual_seed(seed)
    names = list(shapes)
    groups: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = 2 * int(torch.tensor(shapes[n]).prod())
        if groups[-1] and size + b > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(n)
        size += b
    weight_map = {}
    params = 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            shape = shapes[n]
            if len(shape) == 1 and "norm" in n:
                t = torch.ones(shape, dtype=torch.float16, device="cuda")
            else:
                t = (torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * std).half()
            params += t.numel()
            tensors[n] = t.cpu()
            weight_map[n] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out, params


# ---------------------------------------------------------------------------------------------------
# our engine


def bench_engine(
    path: Path, name: str, kwargs: dict, prompt: list[int], quality_seq: list[int], ref_logits: torch.Tensor | None
) -> tuple[dict, torch.Tensor | None]:
    from iserve.gpu_agent.engine import Engine

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    engine = Engine.load(path, [("cuda:0", 0, engine_layers(path))], CONTEXT, **kwargs)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    row: dict = dict(
        variant=name,
        load_s=round(load_s, 1),
        weights_gib=engine.weight_bytes() / GIB,
        kv_cache_gib=engine.kv_cache_bytes() / GIB,
        kernels=engine.kernels(),
        cuda_graphs=engine.graphs_captured,
        fused_decode=engine.fused_decode,
        fused_error=engine.fused_error,
        dtype=str(engine.stages[0].dtype),
    )
    eager = not any(engine.graphs_captured)
    for _ in range(2):  # warm-up: clocks, caches, first-use costs
        engine.generate(prompt, max_tokens=16, ignore_eos=True)
    row["ttft_ms"] = statistics.median(engine.generate(prompt, max_tokens=1, ignore_eos=True).ttft_ms for _ in range(5))
    n_out = 32 if eager else OUT_TOKENS
    runs = [engine.generate(prompt, max_tokens=n_out, ignore_eos=True) for _ in range(3)]
    row["tpot_ms"] = statistics.median(statistics.median(r.step_ms) for r in runs)
    row["tpot_mean_ms"] = statistics.mean(statistics.mean(r.step_ms) for r in runs)
    # Quality: teacher-forced logits over QUALITY_STEPS decode steps.
    logits = []
    engine.prefill(quality_seq[:QUALITY_PREFIX])
    for pos in range(QUALITY_PREFIX, QUALITY_PREFIX + QUALITY_STEPS):
        logits.append(engine.decode(quality_seq[pos], pos))
    logits = torch.stack(logits)
    if ref_logits is not None:
        row["rel_l2"] = float((logits - ref_logits).norm() / ref_logits.norm())
        row["top1_agree"] = float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    row["serve_peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    row["load_peak_gib"] = load_peak / GIB
    engine.close()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row, logits


def engine_layers(path: Path) -> int:
    return json.loads((path / "config.json").read_text())["num_hidden_layers"]


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers


def bench_hf(path: Path, prompt: list[int]) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float16, device_map="cuda")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float16, device_map="cuda")
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt], device="cuda")
    eos = model.config.eos_token_id

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos)
        torch.cuda.synchronize()
        assert out.shape[1] == len(prompt) + n
        return (time.perf_counter() - t) * 1e3

    torch.cuda.reset_peak_memory_stats()
    gen(8)
    ttft = statistics.median(gen(1) for _ in range(3))
    total = statistics.median(gen(OUT_TOKENS + 1) for _ in range(2))
    row = dict(
        variant=f"HF transformers {transformers.__version__} eager fp16",
        ttft_ms=ttft,
        tpot_ms=(total - ttft) / OUT_TOKENS,
        load_s=round(load_s, 1),
        serve_peak_gib=torch.cuda.max_memory_allocated() / GIB,
        attn=getattr(model.config, "_attn_implementation", "?"),
    )
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------------
# kernel micro-benchmark


def micro() -> list[dict]:
    """Each projection kernel alone, one row in, Llama-2-7B shapes: microseconds and weight GB/s."""
    import torch.nn.functional as F

    from iserve.gpu_agent.engine import kernels, quant

    rows = []
    shapes = {
        "qkv": (12288, 4096),
        "o": (4096, 4096),
        "gate_up": (22016, 4096),
        "down": (4096, 11008),
        "lm_head": (32000, 4096),
    }
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ w.float().t()
        cands = {"fp16 cublas": (lambda: F.linear(x, w), 2 * n * k)}
        if kernels.available():
            cands["fp16 triton gemv"] = (lambda: kernels.gemv(x, w), 2 * n * k)
        i8 = quant.Int8Linear(w, torch.float16)
        cands["int8 triton gemv"] = (lambda: i8(x), n * k + 2 * n)
        sc32 = i8.scale.float()
        cands["int8 torch._weight_int8pack_mm (fp32 in)"] = (
            lambda: torch._weight_int8pack_mm(x.float(), i8.q, sc32),
            n * k,
        )
        i4 = quant.Int4Linear(w.bfloat16(), torch.bfloat16)
        xb = x.bfloat16()
        cands["int4 tinygemm"] = (lambda: i4(xb), n * k // 2 + 4 * n * k // 128)
        try:
            sp = quant.Sparse24Linear(quant.prune_2_4(w))
            cands["2:4 semi-structured"] = (lambda: sp(x), n * k + n * k // 8)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append(dict(shape=name, kernel="2:4 semi-structured", error=f"{type(e).__name__}: {e}"[:200]))
        for kname, (fn, nbytes) in cands.items():
            try:
                y = fn()
                for _ in range(5):
                    fn()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(20):
                        fn()
                us = cuda_ms(g.replay, 10) * 1e3 / 20
                err = float((y.float() - ref).norm() / ref.norm())
                rows.append(
                    dict(
                        shape=name,
                        kernel=kname,
                        us=round(us, 2),
                        gbps=round(nbytes / us / 1e3, 1),
                        rel_err=round(err, 4),
                    )
                )
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append(dict(shape=name, kernel=kname, error=f"{type(e).__name__}: {e}"[:200]))
        del w, x, i8, i4
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------------


TP_DTYPES = ("float32", "float16")


def _teacher_forced(engine, seq: list[int], *, lockstep: bool = False) -> torch.Tensor:
    """Logits ``[len(seq) - QUALITY_PREFIX, vocab]`` of ``QUALITY_PREFIX`` prompt tokens then one
    decode step per remaining token of ``seq``, fed ``seq``'s tokens (the same tokens whatever the engine
    predicts). ``lockstep``: every TP rank calls this at once, through the engine's internal passes
    (its public ``prefill`` / ``decode`` are single-process only), so that their collectives pair up."""
    from iserve.gpu_agent.engine.runner import _compute

    if not lockstep:
        engine.prefill(seq[:QUALITY_PREFIX])
        return torch.stack([engine.decode(seq[pos], pos) for pos in range(QUALITY_PREFIX, len(seq))])
    with _compute():
        engine._prefill(seq[:QUALITY_PREFIX])
        out = []
        for pos in range(QUALITY_PREFIX, len(seq)):
            engine._token.fill_(seq[pos])
            out.append(engine._decode(pos).clone())
        return torch.stack(out)


def _logit_gap(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float().cpu(), ref.float().cpu()
    rel = (got - ref).norm(dim=-1) / ref.norm(dim=-1)
    return dict(
        rel_l2=float((got - ref).norm() / ref.norm()),
        rel_l2_max_step=float(rel.max()),
        max_abs=float((got - ref).abs().max()),
        top1_agree=float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    )


def _tp_device(rank: int) -> str:
    return f"cuda:{rank}" if torch.cuda.is_available() else "cpu"  # the CPU (gloo) only to check this script


def _tp_rank(
    rank: int, size: int, port: int, path: str, prompt: list[int], qseq: list[int], ref_dir: str, queue
) -> None:
    import torch.distributed as dist

    from iserve.gpu_agent.engine import Engine

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
    )
    try:
        results = {}
        for dtype in TP_DTYPES:
            engine = Engine.load(
                path,
                [(_tp_device(rank), 0, engine_layers(Path(path)))],
                CONTEXT,
                tp_rank=rank,
                tp_size=size,
                dtype=dtype,
            )
            logits = _teacher_forced(engine, qseq, lockstep=True)
            if rank == 0:
                ref = torch.load(Path(ref_dir) / f"{dtype}.pt")
                row = _tp_run(engine, prompt) | dict(
                    graphs=engine.graphs_captured, fused=engine.fused_decode, fused_error=engine.fused_error
                )
                row["vs_tp1"] = _logit_gap(logits, ref["logits"])
                results[dtype] = row
                engine.close()
            else:
                engine.follow()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        if rank == 0:
            queue.put(results)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        queue.put(f"rank {rank}: {type(e).__name__}: {e}")
    dist.destroy_process_group()


def _tp_run(engine, prompt: list[int]) -> dict:
    engine.generate(prompt, max_tokens=8, ignore_eos=True)
    greedy = engine.generate(prompt, max_tokens=64, ignore_eos=True)
    sampled = engine.generate(prompt, max_tokens=64, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    return dict(
        greedy=greedy.tokens, sampled=sampled.tokens, tpot_ms=statistics.median(greedy.step_ms), ttft_ms=greedy.ttft_ms
    )


def tp_check(path: Path, prompt: list[int], qseq: list[int], size: int, work: Path) -> dict:
    """TP=1 (this process, cuda:0) against TP=``size`` (spawned ranks, NCCL), in float32 and float16:
    greedy and seeded-sampled tokens of a 512-token prompt, and teacher-forced logits (the same
    tokens fed to both, so one flipped near-tie cannot make the rest differ). The gap between two
    TP=1 decode paths of one engine (CUDA graphs vs eager) is the yardstick for rounding noise."""
    import multiprocessing as mp
    import socket

    from iserve.gpu_agent.engine import Engine

    work.mkdir(parents=True, exist_ok=True)
    tp1 = {}
    for dtype in TP_DTYPES:
        eager = Engine.load(path, [(_tp_device(0), 0, engine_layers(path))], CONTEXT, dtype=dtype, cuda_graphs=False)
        eager_logits = _teacher_forced(eager, qseq)
        eager.close()
        del eager
        one = Engine.load(path, [(_tp_device(0), 0, engine_layers(path))], CONTEXT, dtype=dtype)
        logits = _teacher_forced(one, qseq)
        row = _tp_run(one, prompt) | dict(graphs=one.graphs_captured, fused=one.fused_decode)
        row["eager_vs_graphs"] = _logit_gap(eager_logits, logits)
        torch.save({"logits": logits.cpu()}, work / f"{dtype}.pt")
        tp1[dtype] = row
        one.close()
        del one, logits, eager_logits
        gc.collect()
        torch.cuda.empty_cache()
        log(f"TP=1 {dtype}", {k: v for k, v in row.items() if k not in ("greedy", "sampled")})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_tp_rank, args=(r, size, port, str(path), prompt, qseq, str(work), queue))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    got = queue.get(timeout=500)
    for p in procs:
        p.join(timeout=60)
    if isinstance(got, str):
        raise RuntimeError(got)
    out = dict(size=size, tp1=tp1, tp=got, summary={})
    for dtype in TP_DTYPES:
        a, b = tp1[dtype], got[dtype]
        out["summary"][dtype] = dict(
            same_greedy=a["greedy"] == b["greedy"],
            same_sampled=a["sampled"] == b["sampled"],
            first_greedy_mismatch=next((i for i, (x, y) in enumerate(zip(a["greedy"], b["greedy"])) if x != y), None),
            tp_vs_tp1=b["vs_tp1"],
            tp1_eager_vs_graphs=a["eager_vs_graphs"],
            tpot_ms=(a["tpot_ms"], b["tpot_ms"]),
            ttft_ms=(a["ttft_ms"], b["ttft_ms"]),
        )
    return out


def fmt_table(env: dict, models: list[dict]) -> str:
    lines = [
        f"Batch-1 decode, {env['gpu']}, {env['date']}; torch {env['torch']}, triton {env.get('triton', '-')}; "
        f"copy bandwidth {env['copy_tbps']:.2f} TB/s (read + written); prompt {PROMPT} tokens, "
        f"TPOT over {OUT_TOKENS} tokens; "
        f"quality vs our fp16 over {QUALITY_STEPS} teacher-forced decode steps.",
        "",
        "| model | engine / variant | TTFT ms | TPOT ms | TPOT / floor | weights GiB | peak GiB "
        "| rel. L2 of logits | top-1 agree |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        floor = m["floor_ms"]
        lines.append(
            f"| {m['model']} | HBM floor (fp16 weights / copy bandwidth) | | {floor:.2f} | 1.00 "
            f"| {m['fp16_gib']:.2f} | | | |"
        )
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {r['variant']} | failed: {r['error'][:120]} | | | | | | |")
                continue
            q = f"{r['rel_l2']:.4f} | {r['top1_agree'] * 100:.1f}%" if "rel_l2" in r else "- | -"
            w = f"{r['weights_gib']:.2f}" if "weights_gib" in r else ""
            lines.append(
                f"| {m['model']} | {r['variant']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} "
                f"| {r['tpot_ms'] / floor:.2f} "
                f"| {w} | {r['serve_peak_gib']:.2f} | {q} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="llama-2-7b,llama-3-8b,llama-2-13b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--first-only", default="", help="variants run on the first model only (comma-separated)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--micro", action="store_true")
    p.add_argument("--tp", type=int, default=1, help="check tensor parallelism of this degree instead")
    p.add_argument("--model-dir", default="/dev/shm/iserve-bench")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(
        gpu=torch.cuda.get_device_name(0),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        command=" ".join(["python3", "bench/bench_engine.py", *sys.argv[1:]]),
    )
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    env["copy_tbps"] = copy_bandwidth() / 1e12
    log("copy bandwidth", f"{env['copy_tbps']:.3f} TB/s")
    results: dict = dict(env=env, models=[])
    if a.micro:
        results["micro"] = micro()
        for r in results["micro"]:
            log("micro", r)
    g = torch.Generator().manual_seed(1234)
    if a.tp > 1:
        preset = a.models.split(",")[0]
        path, _ = make_model(preset, Path(a.model_dir) / preset)
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(3, vocab, (PROMPT,), generator=g).tolist()
        qseq = torch.randint(3, vocab, (QUALITY_PREFIX + QUALITY_STEPS,), generator=g).tolist()
        res = tp_check(path, prompt, qseq, a.tp, Path(a.model_dir) / "tp-ref") | dict(model=preset, env=env)
        (out / "tp.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res["summary"], indent=1))
        shutil.rmtree(path, ignore_errors=True)
        return 0
    first_only = set(filter(None, a.first_only.split(",")))
    for index, preset in enumerate(a.models.split(",")):
        t0 = time.perf_counter()
        path, params = make_model(preset, Path(a.model_dir) / preset)
        log(f"{preset}: {params / 1e9:.2f} B parameters written in {time.perf_counter() - t0:.1f} s")
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        prompt = torch.randint(3, vocab, (PROMPT,), generator=g).tolist()
        qseq = torch.randint(3, vocab, (QUALITY_PREFIX + QUALITY_STEPS,), generator=g).tolist()
        floor_ms = 2 * params / (env["copy_tbps"] * 1e12) * 1e3
        entry = dict(model=preset, params=params, fp16_gib=2 * params / GIB, floor_ms=floor_ms, rows=[])
        results["models"].append(entry)
        ref = None
        for name in a.variants.split(","):
            if index > 0 and name in first_only:
                continue
            try:
                row, logits = bench_engine(path, f"iServe {name}", VARIANTS[name], prompt, qseq, ref)
                if name == "fp16":
                    ref = logits
                    row.pop("rel_l2", None)
                del logits
            except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
                row = dict(variant=f"iServe {name}", error=f"{type(e).__name__}: {e}"[:300])
                gc.collect()
                torch.cuda.empty_cache()
            log(preset, row)
            entry["rows"].append(row)
            (out / "results.json").write_text(json.dumps(results, indent=1))
        ref = None
        gc.collect()
        torch.cuda.empty_cache()
        if not a.no_hf:
            try:
                row = bench_hf(path, prompt)
            except Exception as e:  # noqa: BLE001
                row = dict(variant="HF transformers eager fp16", error=f"{type(e).__name__}: {e}"[:300])
            log(preset, row)
            entry["rows"].append(row)
        shutil.rmtree(path, ignore_errors=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    table = fmt_table(env, results["models"])
    (out / "table.md").write_text(table + "\n\nReproduce: `" + env["command"] + "`\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
