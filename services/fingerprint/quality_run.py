"""Running the quality measurement (``calibration``) for the fingerprint service: which method, and
the subprocess that runs it off the event loop, its progress lines passed on as they come. Imports no
torch (the subprocess does)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec
import structlog

from iserve import quality
from iserve.messages import Configuration, QualityReport, decoder

log = structlog.get_logger()

PROGRESS_PREFIX = "progress: "  # a line of the subprocess's stderr that reports a step


def choose_method(setting: str, checkpoint_bytes: int, full_max_bytes: int) -> str:
    """The method to measure with: ``setting`` unless "auto", which picks the whole model when its
    checkpoint is at most ``full_max_bytes`` (as cheap as its fingerprints, and exact), else the
    fingerprints; "" for "off"."""
    if setting == "off":
        return ""
    if setting != "auto":
        return setting
    return "full" if checkpoint_bytes <= full_max_bytes else "fingerprint"


def lossy_variants(configs: Iterable[Configuration]) -> list[str]:
    """The distinct lossy (weights, KV, pruning) variants of ``configs``, as ``int8/fp16/none``."""
    seen = {f"{c.weight_quant}/{c.kv_quant}/{c.pruning}": None for c in configs if not quality.is_lossless(c)}
    return list(seen)


def command(
    model_dir: str, method: str, fingerprints: Sequence[str], variants: Sequence[str], prompts: int, tokens: int
) -> list[str]:
    cmd = [sys.executable, "-m", "iserve.fingerprint.calibration", model_dir, "--method", method]
    cmd += ["--prompts", str(prompts), "--tokens", str(tokens), "--variants", *variants]
    if method == "fingerprint":
        cmd += ["--fingerprints", *fingerprints]
    return cmd


async def run(
    cmd: list[str], *, timeout_s: float, method: str, on_progress: Callable[[str], Awaitable[None]]
) -> QualityReport:
    """Run ``cmd`` (:func:`command`) and return its report; a failure or a timeout comes back as a
    report with ``error`` set (the lossy variants are then "not measured"), never as an exception."""
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    other: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            out_task = asyncio.ensure_future(proc.stdout.read())
            async for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                if line.startswith(PROGRESS_PREFIX):
                    await on_progress(line[len(PROGRESS_PREFIX) :])
                elif line:
                    other = (other + [line])[-5:]
            out = await out_task
            rc = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return QualityReport(method=method, error=f"the quality measurement took over {timeout_s:.0f} s")  # type: ignore[arg-type]
    except asyncio.CancelledError:
        proc.kill()
        await proc.wait()
        raise
    if rc != 0:
        why = other[-1] if other else f"exit code {rc}"
        log.warning("quality measurement failed", rc=rc, stderr=other)
        return QualityReport(method=method, error=f"the quality measurement failed: {why}")  # type: ignore[arg-type]
    try:
        return decoder(QualityReport).decode(out.strip().splitlines()[-1] if out.strip() else b"")
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        return QualityReport(method=method, error=f"the quality measurement's report is unreadable: {e}")  # type: ignore[arg-type]
