"""``iserve validate MODEL``: measure the full model under chosen configurations and compare with the
fingerprint estimates.

The estimates come from the configuration map the fingerprint service stored for a registered
model (``--nats-url``; MODEL is its name), or, for a checkpoint folder, from profiling its
fingerprints here with the same code the service's profiler runs. Each chosen configuration is
then loaded in full on this machine's devices and measured with the same protocol (host wall time
of ``Engine.generate``, what a request pays), and the two are printed side by side with their
relative errors: TTFT at every prompt length, the mean TPOT of every decode run, and peak memory
per GPU (the larger of the allocator's and NVML's, as in the estimate).

Default configurations: every estimated configuration that runs on one GPU and whose estimate fits
that GPU's memory. ``--configs`` names others (TP > 1 needs as many devices: ``--devices``).

This module is the command and its orchestration (``validate``); profiling and measuring here are in
``measure``, the comparison and its tables in ``comparison`` (the benchmarks run these too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import msgspec
from rich.console import Console

from iserve.messages import ConfigEstimate, ConfigurationMap
from iserve.progress import Steps

from .comparison import Comparison, compare, print_summary, summarize, validate_rows, validate_table
from .measure import (
    decode_runs,
    default_devices,
    device_memory_bytes,
    free_cuda,
    measure_configuration,
    profile_locally,
)


def fitting_configs(
    cmap: ConfigurationMap, *, gpus: int = 1, memory_bytes: int | None = None, headroom: float = 0.97
) -> list[ConfigEstimate]:
    """The estimated configurations on exactly ``gpus`` GPUs with PP=1 whose per-GPU estimate fits
    ``headroom`` of the GPU's memory."""
    limit = (memory_bytes or cmap.gpu_memory_bytes) * headroom
    out = []
    for e in cmap.estimates:
        if e.config.gpus != gpus or e.config.pp != 1:
            continue
        if e.stage_bytes(e.num_layers, first=True, last=True) <= limit:
            out.append(e)
    return out


def validate(
    model_dir: str | Path,
    cmap: ConfigurationMap,
    estimates: Sequence[ConfigEstimate],
    devices: Sequence[str],
    *,
    prompt_lengths: Sequence[int],
    output_lengths: Sequence[int],
    repeats: int,
    warmup: int,
    log: Callable[[str], None] | None = None,
    deadline: float | None = None,
    timeout_s: float = 900.0,
    batch_sizes: Sequence[int] = (),
    starting: Callable[[int, str], None] | None = None,
) -> list[Comparison]:
    """Measure each of ``estimates``' configurations in full and compare. A configuration the engine
    refuses, or that runs out of memory, gets a note instead of points; with ``deadline``
    (``time.monotonic()``), configurations left when it passes are noted as skipped. ``starting(i,
    key)`` is told before the i-th (from 0) is measured."""
    from iserve.errors import IServeError

    runs = decode_runs(prompt_lengths, output_lengths, cmap.context_tokens)
    out = []
    for i, est in enumerate(estimates):
        key = est.config.key()
        if starting:
            starting(i, key)
        if deadline is not None and time.monotonic() > deadline:
            out.append(Comparison(config=key, note="skipped: out of time"))
            continue
        t0 = time.perf_counter()
        try:
            m = measure_configuration(
                model_dir,
                est.config,
                devices,
                prompt_lengths=prompt_lengths,
                output_lengths=output_lengths,
                repeats=repeats,
                warmup=warmup,
                context_tokens=cmap.context_tokens,
                timeout_s=timeout_s,
                batch_sizes=batch_sizes,
            )
        except IServeError as e:
            out.append(Comparison(config=key, note=f"not measured: {e.message}"))
            continue
        except TimeoutError as e:  # a TP measurement that overran: its ranks were killed (their stacks on stderr)
            out.append(Comparison(config=key, note=f"not measured: {e}"))
            continue
        except RuntimeError as e:  # CUDA out of memory and kin: the estimate said it fits, the device disagreed
            free_cuda()
            out.append(Comparison(config=key, note=f"not measured: {type(e).__name__}: {str(e)[:160]}"))
            continue
        c = compare(est, m, runs, gpu_seconds=m.gpu_seconds or (time.perf_counter() - t0))
        out.append(c)
        if log:
            errs = ", ".join(
                f"{w} {100 * max(c.errors(w)):.1f}%" for w in ("ttft", "tpot", "memory", "batch") if c.errors(w)
            )
            log(f"{key}: worst errors {errs} ({c.gpu_seconds:.1f} GPU-s)")
    return out


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _batch_list(text: str) -> list[int]:
    return sorted(set(_int_list(text))) if text.strip() else []


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="iserve validate",
        description="Measure a model in full under chosen configurations and compare with its fingerprint estimates.",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint folder (profiled here), or a registered model's name (with --nats-url)",
    )
    p.add_argument(
        "--configs",
        default="",
        help="comma-separated configuration keys (e.g. tp1-pp1-wint8-kvfp16-pnone); "
        "default: every estimated 1-GPU configuration that fits the GPU",
    )
    p.add_argument("--devices", default="", help="comma-separated torch devices (default: every CUDA device, else cpu)")
    p.add_argument(
        "--nats-url",
        default=os.environ.get("ISERVE_NATS_URL", ""),
        help="read the stored configuration map of a registered model from this NATS server (a checkpoint "
        "folder given as MODEL is profiled here instead) [env ISERVE_NATS_URL]",
    )
    p.add_argument("--gpu-type", default="", help="with --nats-url: which GPU type's map (default: the first stored)")
    p.add_argument(
        "--prompt-lengths", type=_int_list, default=[128, 512, 1024], help="prompt lengths (default 128,512,1024)"
    )
    p.add_argument(
        "--output-lengths", type=_int_list, default=[16, 64], help="output lengths of the decode runs (default 16,64)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the full model (medians kept; default 3)")
    p.add_argument(
        "--fp-repeats",
        type=int,
        default=7,
        help="timed repeats of each fingerprint when profiling here (they are cheap, and their "
        "differences carry the per-layer cost; default 7)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    p.add_argument("--context-tokens", type=int, default=2048, help="context length when profiling here (default 2048)")
    p.add_argument(
        "--work-dir",
        default="",
        help="where fingerprints are written when profiling here (default: a temporary folder)",
    )
    p.add_argument(
        "--batches",
        type=_batch_list,
        default=[],
        help="also compare the batching engine's decode step at these batch sizes (e.g. 1,8,32,64; "
        "fingerprints profiled here are timed at them too); default: none",
    )
    p.add_argument("--limit", type=int, default=0, help="measure at most this many configurations")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON document (the table's rows, the summary, every point) instead of tables",
    )
    p.add_argument("--json-file", default="", help="also write that JSON document to this file")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=900.0,
        help="time limit of the fingerprint profiling, and of each tensor-parallel measurement (default 900)",
    )
    return p.parse_args(argv)


def _variant_of_key(key: str) -> str:
    """``tp1-pp2-wint8-kvfp16-pnone`` or ``tp1-wint8-kvfp16-pnone`` -> ``tp1-wint8-kvfp16-pnone``."""
    parts = [p for p in key.split("-") if not p.startswith("pp")]
    return "-".join(parts)


async def _stored_map(url: str, model: str, gpu_type: str) -> tuple[str, ConfigurationMap]:
    from iserve.client import Client

    async with await Client.connect(url, "iserve-validate") as c:
        info = await c.model(model)
        return info.record.path, await c.profile(model, gpu_type)


def main(argv: list[str] | None = None) -> int:
    """``iserve validate``; returns the exit status (0: measured and printed; 1: nothing measured;
    2: bad arguments or model)."""

    a = parse_args(argv)
    devices = [d for d in a.devices.split(",") if d] or default_devices()
    with Steps(Console(stderr=True)) as steps:
        return _run(a, devices, steps)


def _run(a: argparse.Namespace, devices: list[str], steps: Steps) -> int:
    from iserve.errors import IServeError

    log = steps.log
    local = None
    try:
        if a.nats_url and not Path(a.model).is_dir():  # a registered model's name
            model_dir, cmap = asyncio.run(_stored_map(a.nats_url, a.model, a.gpu_type))
            prompt_lengths, output_lengths = a.prompt_lengths, a.output_lengths
        else:
            model_dir = a.model
            if not Path(model_dir).is_dir():
                print(
                    f"error: {model_dir} is not a checkpoint folder; pass one, or a registered model's name "
                    "with --nats-url.",
                    file=sys.stderr,
                )
                return 2
            work = a.work_dir or tempfile.mkdtemp(prefix="iserve-validate-")
            steps.show("validate", f"profiling the fingerprints of {Path(model_dir).name} on {devices[0]}")
            wanted = {_variant_of_key(k) for k in a.configs.split(",") if k}
            only = (lambda v: _variant_of_key(v.key()) in wanted) if wanted else None
            local = profile_locally(
                model_dir,
                devices,
                prompt_lengths=a.prompt_lengths,
                output_lengths=a.output_lengths,
                repeats=a.fp_repeats,
                warmup=a.warmup,
                context_tokens=a.context_tokens,
                work_dir=work,
                variants_filter=only,
                log=log,
                timeout_s=a.timeout_s,
                batch_sizes=a.batches,
            )
            cmap = local.cmap
            prompt_lengths, output_lengths = a.prompt_lengths, a.output_lengths
            log(
                f"fingerprints profiled in {local.result.gpu_seconds:.1f} GPU-seconds; "
                f"{len(cmap.estimates)} configurations estimated"
            )
        by_key = {e.config.key(): e for e in cmap.estimates}
        if a.configs:
            keys = [k for k in a.configs.split(",") if k]
            unknown = [k for k in keys if k not in by_key]
            if unknown:
                print(
                    f"error: no estimate for {', '.join(unknown)} in {cmap.model}'s map for {cmap.gpu_type}.",
                    file=sys.stderr,
                )
                return 2
            chosen = [by_key[k] for k in keys]
        else:
            chosen = fitting_configs(cmap, memory_bytes=device_memory_bytes(devices[0]))
        if a.limit:
            chosen = chosen[: a.limit]
        n = len(chosen)
        comps = validate(
            model_dir,
            cmap,
            chosen,
            devices,
            prompt_lengths=prompt_lengths,
            output_lengths=output_lengths,
            repeats=a.repeats,
            warmup=a.warmup,
            log=log,
            timeout_s=a.timeout_s,
            batch_sizes=a.batches,
            starting=lambda i, key: steps.show("validate", f"measuring {key}", done=i, total=n),
        )
        steps.show("validate", "measured", done=n, total=n)
    except IServeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    summary = summarize([c for c in comps if not c.note])
    doc = {
        "model": cmap.model,
        "gpu_type": cmap.gpu_type,
        "device": cmap.device,
        "context_tokens": cmap.context_tokens,
        "rows": validate_rows(comps),
        "summary": summary,
        "comparisons": [asdict(c) for c in comps],
    }
    if local is not None:  # the fingerprints' own measurements, to see where an estimate came from
        doc["profile"] = msgspec.to_builtins(local.result)
    if a.json_file:
        Path(a.json_file).write_text(json.dumps(doc, indent=1, default=str))
    if a.json:
        sys.stdout.write(json.dumps(doc, default=str) + "\n")
    else:
        title = (
            f"{cmap.model} on {cmap.gpu_type} (estimates from {cmap.device or 'the stored map'}; "
            f"context {cmap.context_tokens})"
        )
        Console().print(validate_table(comps, title))
        print_summary(summary)
    return 0 if any(not c.note for c in comps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
