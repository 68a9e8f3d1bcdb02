"""Quality cost of a model's lossy variants, measured from its real tensors (docs/quality.md).

Each variant (int8/int4 weights, int8 KV cache, 2:4 or structured pruning, and their combinations) is
loaded with the torch engine and fed the calibration prompts teacher-forced: the first half of each
prompt is prefilled, the rest decoded token by token (so that the KV cache is written and read in the
variant's format). At every decoded position its next-token distribution is compared with the
reference's (the same checkpoint, 16-bit weights, unpruned, 16-bit KV; float32 on a CPU): mean
KL(reference || variant), top-1 agreement and, for a checkpoint with a tokenizer, the ratio of the
perplexities of the prompts' own next tokens.

Two methods: ``full`` runs the whole model; ``fingerprint`` runs the 1- and 2-layer fingerprints and
extrapolates each metric linearly in depth to the model's layer count (the paper's L2 fit, applied
to the error). The fingerprint service runs this module in a subprocess (``python -m
iserve.fingerprint.calibration``), so that its event loop never waits on torch and never imports it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from iserve import checkpoint, errors
from iserve.gpu_agent.engine import CAPABILITIES
from iserve.gpu_agent.engine.runner import Engine
from iserve.gpu_agent.engine.tokenizer import load_tokenizer
from iserve.loadgen.traces import resolve_prompts
from iserve.messages import QUALITY_METHODS, QualityReport, VariantQuality, encode

from .quality_run import PROGRESS_PREFIX

Variant = tuple[str, str, str]  # (weight_quant, kv_quant, pruning)
REFERENCE: Variant = ("fp16", "fp16", "none")


@dataclass
class Calibration:
    """Token ids of the calibration prompts (``split``: how many of each are prefilled)."""

    ids: list[list[int]]
    splits: list[int]
    source: str

    @property
    def positions(self) -> int:
        return sum(len(i) - s for i, s in zip(self.ids, self.splits))


@dataclass
class Metrics:
    kl: float
    top1: float
    nll: float  # mean negative log-likelihood of the prompts' own next tokens


def lossy_variants(capabilities: dict | None = None) -> list[Variant]:
    """Every lossy (weights, KV, pruning) combination the engine runs."""
    caps = capabilities or CAPABILITIES
    return [
        (w, kv, p)
        for w in caps["weight_quant"]
        for kv in caps["kv_quant"]
        for p in caps["pruning"]
        if (w, kv, p) != REFERENCE
    ]


def calibration_ids(model_dir: str | Path, prompts: int, tokens: int, prompts_path: str | None = None) -> Calibration:
    """The first ``prompts`` calibration prompts (``$ISERVE_PROMPTS``, the ShareGPT sample next to the
    repository, else the built-in set), tokenized by the model's tokenizer (with BOS), cut to at most
    ``tokens`` tokens; prompts shorter than 4 tokens are skipped."""
    texts, source = resolve_prompts(prompts_path)
    ck = checkpoint.scan_checkpoint(str(model_dir))
    tok = load_tokenizer(model_dir, ck.arch)
    ids: list[list[int]] = []
    for text in texts:
        one = [i for i in tok.encode(text, add_bos=True) if i < ck.arch.vocab_size][:tokens]
        if len(one) >= 4:
            ids.append(one)
        if len(ids) == prompts:
            break
    if not ids:
        raise errors.BadRequest(f"no calibration prompt of at least 4 tokens in {source}; pass another --prompts file.")
    return Calibration(ids, [len(i) // 2 for i in ids], f"{Path(source).name} (first {len(ids)})")


def _log_probs(engine: Engine, cal: Calibration) -> torch.Tensor:
    """Log-softmax of the next-token logits at every decoded position, ``[positions, vocab]`` on the CPU."""
    rows: list[torch.Tensor] = []
    for ids, split in zip(cal.ids, cal.splits):
        rows.append(engine.prefill(ids[:split]).float().cpu())
        for pos in range(split, len(ids) - 1):
            rows.append(engine.decode(ids[pos], pos).float().cpu())
    return torch.log_softmax(torch.stack(rows), dim=-1)


def _targets(cal: Calibration) -> torch.Tensor:
    return torch.tensor([t for ids, s in zip(cal.ids, cal.splits) for t in ids[s:]], dtype=torch.long)


def compare(ref: torch.Tensor, var: torch.Tensor, targets: torch.Tensor) -> Metrics:
    """KL(ref || var), top-1 agreement and var's NLL of ``targets`` from two ``[positions, vocab]`` log-probs."""
    kl = (ref.exp() * (ref - var)).sum(-1).clamp_min(0).mean().item()
    top1 = (ref.argmax(-1) == var.argmax(-1)).float().mean().item()
    nll = -var.gather(1, targets[:, None]).mean().item()
    return Metrics(kl, top1, nll)


def measure_depth(
    model_dir: str | Path,
    variants: Sequence[Variant],
    cal: Calibration,
    *,
    device: str = "cpu",
    on_progress: Callable[[str], None] = lambda _: None,
) -> tuple[dict[Variant, Metrics], float, str]:
    """Metrics of each variant of one checkpoint against its reference; (metrics, reference NLL, the
    reference's dtype). A variant the engine refuses (``UnsupportedModel``) is left out."""
    ck = checkpoint.scan_checkpoint(str(model_dir))
    context = max(len(i) for i in cal.ids) + 1
    stages = [(device, 0, ck.arch.num_layers)]
    targets = _targets(cal)

    def run(v: Variant) -> tuple[torch.Tensor, str]:
        engine = Engine.load(
            model_dir, stages, context, weight_quant=v[0], kv_quant=v[1], pruning=v[2], cuda_graphs=False
        )
        try:
            return _log_probs(engine, cal), str(engine.stages[0].dtype).removeprefix("torch.")
        finally:
            engine.close()

    ref, dtype = run(REFERENCE)
    ref_nll = -ref.gather(1, targets[:, None]).mean().item()
    out: dict[Variant, Metrics] = {}
    for i, v in enumerate(variants):
        on_progress(f"quality: {ck.arch.num_layers}-layer run, variant {i + 1}/{len(variants)} ({'/'.join(v)})")
        try:
            out[v] = compare(ref, run(v)[0], targets)
        except errors.UnsupportedModel:
            continue
    return out, ref_nll, dtype


def extrapolate(m1: float, m2: float, layers: int) -> float:
    """A per-layer metric measured at depths 1 and 2, continued linearly to ``layers``."""
    return m1 + (m2 - m1) * (layers - 1)


def measure(
    model_dir: str | Path,
    *,
    method: str,
    fingerprints: Sequence[str | Path] = (),
    variants: Sequence[Variant] | None = None,
    prompts: int = 8,
    tokens: int = 48,
    prompts_path: str | None = None,
    device: str = "cpu",
    on_progress: Callable[[str], None] = lambda _: None,
) -> QualityReport:
    """The ``QualityReport`` of ``model_dir``'s lossy ``variants`` (default: every one the engine
    runs) by ``method`` ("full", or "fingerprint" with the 1- and 2-layer ``fingerprints``)."""
    if method not in QUALITY_METHODS:
        raise errors.BadRequest(f"unknown quality method {method!r}; use one of {', '.join(QUALITY_METHODS)}.")
    t0 = time.perf_counter()
    ck = checkpoint.scan_checkpoint(str(model_dir))
    layers = ck.arch.num_layers
    todo = list(variants) if variants is not None else lossy_variants()
    cal = calibration_ids(model_dir, prompts, tokens, prompts_path)
    with_ppl = ck.has_tokenizer
    if method == "full":
        got, ref_nll, dtype = measure_depth(model_dir, todo, cal, device=device, on_progress=on_progress)
        rows = {v: (m.kl, m.top1, m.nll - ref_nll) for v, m in got.items()}
        depths = [layers]
    else:
        if len(fingerprints) != 2:
            raise errors.BadRequest("the fingerprint method needs the 1- and 2-layer fingerprints.")
        (g1, n1, dtype), (g2, n2, _) = (
            measure_depth(fp, todo, cal, device=device, on_progress=on_progress) for fp in fingerprints
        )
        rows = {}
        for v in todo:
            if v in g1 and v in g2:
                a, b = g1[v], g2[v]
                rows[v] = (
                    max(0.0, extrapolate(a.kl, b.kl, layers)),
                    min(1.0, max(0.0, 1.0 - extrapolate(1.0 - a.top1, 1.0 - b.top1, layers))),
                    extrapolate(a.nll - n1, b.nll - n2, layers),
                )
        depths = [1, 2]
    out = [
        VariantQuality(
            weight_quant=v[0],  # type: ignore[arg-type]
            kv_quant=v[1],  # type: ignore[arg-type]
            pruning=v[2],  # type: ignore[arg-type]
            kl=kl,
            top1=top1,
            ppl_ratio=float(torch.tensor(dnll).exp()) if with_ppl else 0.0,
        )
        for v, (kl, top1, dnll) in rows.items()
    ]
    return QualityReport(
        method=method,  # type: ignore[arg-type]
        variants=out,
        reference_dtype=dtype,
        source=cal.source,
        prompts=len(cal.ids),
        positions=cal.positions,
        layers=depths,
        seconds=time.perf_counter() - t0,
        device=device,
    )


def rank(report: QualityReport) -> list[str]:
    """The report's variants from the least to the most lossy (by KL, then top-1)."""
    return [v.key() for v in sorted(report.variants, key=lambda v: (v.kl, -v.top1, v.key()))]


def main(argv: list[str] | None = None) -> int:
    """Measure a checkpoint's quality costs; the ``QualityReport`` as JSON on stdout, progress on stderr."""
    ap = argparse.ArgumentParser(prog="python -m iserve.fingerprint.calibration", description=main.__doc__)
    ap.add_argument("model_dir", help="the checkpoint (config.json + safetensors)")
    ap.add_argument("--method", default="fingerprint", choices=QUALITY_METHODS, help="default: fingerprint")
    ap.add_argument("--fingerprints", nargs="*", default=[], help="the 1- and 2-layer fingerprint checkpoints")
    ap.add_argument(
        "--variants", nargs="*", default=None, help="WEIGHTS/KV/PRUNING, e.g. int8/fp16/none (default: every lossy one)"
    )
    ap.add_argument("--prompts", type=int, default=8, help="calibration prompts (default 8)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per prompt at most (default 48)")
    ap.add_argument(
        "--prompts-file", default=None, help="prompt file (default: $ISERVE_PROMPTS or the ShareGPT sample)"
    )
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest on a shared host)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))

    def progress(text: str) -> None:
        print(PROGRESS_PREFIX + text, file=sys.stderr, flush=True)

    try:
        report = measure(
            a.model_dir,
            method=a.method,
            fingerprints=a.fingerprints,
            variants=[tuple(v.split("/")) for v in a.variants] if a.variants is not None else None,  # type: ignore[misc]
            prompts=a.prompts,
            tokens=a.tokens,
            prompts_path=a.prompts_file,
            device=a.device,
            on_progress=progress,
        )
    except errors.IServeError as e:
        report = QualityReport(method=a.method, error=e.message)
    sys.stdout.write(encode(report).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
