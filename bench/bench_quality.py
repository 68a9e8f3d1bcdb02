"""Quality cost of every lossy variant, measured two ways: the whole model against the fingerprint
method (1- and 2-layer fingerprints, extrapolated to the model's depth), with the time each took.

For each model shape (random weights): write the checkpoint (``iserve.modelmaker``), its 1- and 2-layer
fingerprints (the fingerprint service's generator), then ``iserve.fingerprint.calibration.measure``
with ``method="full"`` and ``method="fingerprint"`` over the same calibration prompts. Prints per
variant KL(reference || variant) and top-1 agreement of both methods, then per model the two rankings'
agreement (Spearman rho of KL, pairwise concordance, identical order or not) and the seconds each took.

Random weights: the ranking and the cost are what can be checked, not absolute quality (random models
amplify quantization noise through depth; see docs/quality.md).

Usage::

    python bench/bench_quality.py                                  # GPU: llama-2-7b and mistral-7b
    python bench/bench_quality.py --preset tiny-llama --layers 4   # CPU check of the script (tests run it)

Writes ``$OUT/bench_quality.json`` when ``$OUT`` is set (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _importable import ensure_importable  # noqa: E402

GPU_PRESETS = ["llama-2-7b", "mistral-7b"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", default=[], help="model shape (repeatable; default: the 7B pair)")
    p.add_argument("--layers", type=int, default=None, help="hidden layers (default: the preset's)")
    p.add_argument("--device", default="", help="torch device (default: cuda:0 when there is one, else cpu)")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts (default 8)")
    p.add_argument("--tokens", type=int, default=48, help="tokens per prompt at most (default 48)")
    p.add_argument(
        "--variants", default="", help="comma-separated variant keys, e.g. wint8-kvfp16-pnone (default: all lossy)"
    )
    p.add_argument("--work-dir", default="", help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--out", default=os.environ.get("OUT", ""), help="folder for bench_quality.json ($OUT)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p.parse_args(argv)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    if n < 2:
        return 1.0
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra) ** 0.5
    vb = sum((y - mb) ** 2 for y in rb) ** 0.5
    return cov / (va * vb) if va and vb else 1.0


def concordance(a: list[float], b: list[float]) -> float:
    """Fraction of variant pairs both lists order the same way (pairs tied in either count as agreeing)."""
    pairs = agree = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            pairs += 1
            agree += (a[i] - a[j]) * (b[i] - b[j]) >= 0
    return agree / pairs if pairs else 1.0


def decisive_concordance(a: list[float], b: list[float], margin: float = 0.1) -> float:
    """:func:`concordance` over the pairs ``a`` separates by more than ``margin`` (relative): the order
    that matters, not that of near-ties (e.g. a variant with and without an int8 KV cache)."""
    pairs = agree = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            if abs(a[i] - a[j]) <= margin * max(abs(a[i]), abs(a[j])):
                continue
            pairs += 1
            agree += (a[i] - a[j]) * (b[i] - b[j]) > 0
    return agree / pairs if pairs else 1.0


def bench_model(preset: str, args: argparse.Namespace, work: Path, device: str) -> dict:
    from iserve import checkpoint
    from iserve.fingerprint import calibration, generator
    from iserve.modelmaker import make_checkpoint

    t0 = time.perf_counter()
    path = make_checkpoint(work / preset, preset, num_layers=args.layers, device=device if "cuda" in device else "cpu")
    ck = checkpoint.scan_checkpoint(str(path))
    fps = [i.path for i in generator.make_fingerprints(ck, work / "fingerprints")]
    made_s = time.perf_counter() - t0
    wanted = [k for k in args.variants.split(",") if k]
    variants = [
        v for v in calibration.lossy_variants() if not wanted or f"w{v[0]}-kv{v[1]}-p{v[2].replace(':', '')}" in wanted
    ]
    common = dict(variants=variants, prompts=args.prompts, tokens=args.tokens, device=device)
    full = calibration.measure(path, method="full", **common)
    cheap = calibration.measure(path, method="fingerprint", fingerprints=fps, **common)
    by_key = {v.key(): v for v in cheap.variants}
    rows = [(v, by_key[v.key()]) for v in full.variants if v.key() in by_key]
    kl_full, kl_fp = [a.kl for a, _ in rows], [b.kl for _, b in rows]
    return {
        "preset": preset,
        "layers": ck.arch.num_layers,
        "device": device,
        "checkpoint_s": made_s,
        "full_s": full.seconds,
        "fingerprint_s": cheap.seconds,
        "positions": full.positions,
        "source": full.source,
        "spearman_kl": spearman(kl_full, kl_fp),
        "concordance_kl": concordance(kl_full, kl_fp),
        "decisive_kl": decisive_concordance(kl_full, kl_fp),
        "same_order": calibration.rank(full) == calibration.rank(cheap),
        "variants": [
            {"key": a.key(), "full_kl": a.kl, "fp_kl": b.kl, "full_top1": a.top1, "fp_top1": b.top1} for a, b in rows
        ],
    }


def print_model(r: dict) -> None:
    print(f"\n{r['preset']} ({r['layers']} layers, {r['device']}; {r['positions']} positions of {r['source']})")
    print(f"{'variant':<28} {'KL full':>10} {'KL fp':>10} {'top-1 full':>10} {'top-1 fp':>10}")
    for v in sorted(r["variants"], key=lambda v: v["full_kl"]):
        print(f"{v['key']:<28} {v['full_kl']:>10.4g} {v['fp_kl']:>10.4g} {v['full_top1']:>10.1%} {v['fp_top1']:>10.1%}")


def print_summary(results: list[dict]) -> None:
    head = ["full s", "fp s", "speedup", "rho KL", "concord", "decisive", "same order"]
    print(f"\n{'model':<16} " + " ".join(f"{h:>8}" for h in head))
    for r in results:
        speed = r["full_s"] / r["fingerprint_s"] if r["fingerprint_s"] else float("nan")
        print(
            f"{r['preset']:<16} {r['full_s']:>8.1f} {r['fingerprint_s']:>8.1f} {speed:>7.2f}x "
            f"{r['spearman_kl']:>8.3f} {r['concordance_kl']:>8.1%} {r['decisive_kl']:>8.1%} {str(r['same_order']):>10}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_importable("iserve.fingerprint.generator", script="bench_quality")
    import torch

    torch.set_num_threads(max(1, args.threads))
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    presets = args.preset or GPU_PRESETS
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-quality-"))
    results = []
    try:
        for preset in presets:
            r = bench_model(preset, args, work, device)
            print_model(r)
            results.append(r)
            shutil.rmtree(work / preset, ignore_errors=True)  # a 7B checkpoint is 13 GiB
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print_summary(results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_quality.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
