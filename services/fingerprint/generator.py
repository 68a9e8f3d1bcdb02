"""The Generator of the Fingerprint Controller: builds an LLM's 1- and 2-hidden-layer fingerprints.

A fingerprint is a checkpoint of the model's embedding, final norm, LM head and first ``num_layers``
hidden layers, byte for byte, read one tensor at a time; folders are written atomically and reused
when already made from the same checkpoint digest.

See docs/fingerprint.md#fingerprint-checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import iserve.checkpoint as checkpoint
from iserve.checkpoint import (
    DTYPE_BYTES,
    Checkpoint,
    config_with_layers,
    embed_name,
    layer_prefix,
    layer_tensor_shapes,
    other_tensor_shapes,
)
from iserve.errors import CheckpointError, UnsupportedModel

FINGERPRINT_LAYERS = (1, 2)
MARKER = "fingerprint.json"
ABANDONED_AFTER_S = 3600.0  # a temporary folder older than this is a crashed writer's
TENSOR_FILE = "model.safetensors"
# Files of a Hugging Face tokenizer (and generation defaults) that travel with the fingerprint.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


@dataclass(frozen=True)
class FingerprintInfo:
    """A fingerprint on disk and its size relative to the full model."""

    path: str
    num_layers: int
    bytes: int  # tensor data bytes of the fingerprint
    fraction: float  # bytes / the full checkpoint's tensor data bytes
    source_digest: str
    reused: bool = False  # True when an identical fingerprint was already there


def fingerprint_tensor_names(ck: Checkpoint, num_layers: int) -> list[str]:
    """The tensors of a ``num_layers``-layer fingerprint, in Hugging Face order: embedding, layers
    0..n-1, final norm, LM head."""
    arch = ck.arch
    others = list(other_tensor_shapes(arch))
    embed = [n for n in others if n == embed_name(arch)]
    tail = [n for n in others if n != embed_name(arch)]
    layers = [layer_prefix(i, arch) + k for i in range(num_layers) for k in sorted(layer_tensor_shapes(arch))]
    return embed + layers + tail


def _check_layers(ck: Checkpoint, num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"a fingerprint needs at least one hidden layer, not {num_layers}.")
    if num_layers > ck.arch.num_layers:
        raise UnsupportedModel(
            f"{ck.path} has {ck.arch.num_layers} hidden layer(s); a {num_layers}-layer fingerprint cannot be cut from "
            "it."
        )


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _existing(ck: Checkpoint, path: Path, num_layers: int, names: list[str]) -> FingerprintInfo | None:
    """The fingerprint at ``path`` if it is the one we would write, else None."""
    marker = _read_marker(path)
    if not marker or marker.get("source_digest") != ck.digest or marker.get("num_layers") != num_layers:
        return None
    try:
        fp = checkpoint.scan_checkpoint(path)
    except Exception:  # noqa: BLE001 - any unreadable fingerprint is simply rebuilt
        return None
    if set(fp.tensors) != set(names) or any(
        (fp.tensors[n].shape, fp.tensors[n].dtype) != (ck.tensors[n].shape, ck.tensors[n].dtype) for n in names
    ):
        return None
    return FingerprintInfo(
        path=str(path),
        num_layers=num_layers,
        bytes=fp.data_bytes,
        fraction=fp.data_bytes / ck.data_bytes if ck.data_bytes else 0.0,
        source_digest=ck.digest,
        reused=True,
    )


def _write_tensors(ck: Checkpoint, names: list[str], dest: Path) -> int:
    """Write ``names`` from ``ck`` into one safetensors file, reading and writing one tensor at a time.

    Tensors keep their names, dtypes, shapes and bytes. They are laid out by element size, largest
    first (Hugging Face order otherwise), so every tensor starts aligned to its element size.
    """
    entries = [ck.tensors[n] for n in names]
    order = sorted(range(len(entries)), key=lambda i: -DTYPE_BYTES[entries[i].dtype])
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for i in order:
        e = entries[i]
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    import torch  # deferred: the estimator side of this package needs no torch

    with open(dest, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for i in order:
            e = entries[i]
            t = checkpoint.load_tensors(ck, [e.name])[e.name].contiguous()
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            if data.nbytes != e.nbytes:
                raise CheckpointError(
                    f"tensor {e.name!r} read back as {data.nbytes} bytes, its header says {e.nbytes}; the shard is "
                    "corrupt."
                )
            f.write(data)
            del t, data
        f.flush()
        os.fsync(f.fileno())
    return offset


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_fingerprint(ck: Checkpoint, out_dir: str | os.PathLike, num_layers: int) -> FingerprintInfo:
    """Write (or reuse) the ``num_layers``-hidden-layer fingerprint of ``ck`` at ``out_dir``.

    ``ck`` is a scanned checkpoint (``iserve.checkpoint.scan_checkpoint``). An existing fingerprint
    at ``out_dir`` made from the same checkpoint digest is reused; anything else there is replaced.
    """
    _check_layers(ck, num_layers)
    out = Path(out_dir).resolve()
    names = fingerprint_tensor_names(ck, num_layers)
    if (found := _existing(ck, out, num_layers, names)) is not None:
        return found

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        cfg = config_with_layers(ck.config, num_layers)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        data_bytes = _write_tensors(ck, names, tmp / TENSOR_FILE)
        src = Path(ck.path)
        for fname in TOKENIZER_FILES:
            if (src / fname).is_file():
                shutil.copy2(src / fname, tmp / fname)
        marker = {
            "source_path": ck.path,
            "source_digest": ck.digest,
            "num_layers": num_layers,
            "bytes": data_bytes,
            "source_bytes": ck.data_bytes,
            "tensors": len(names),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # The result must validate as a checkpoint of the same architecture before it becomes visible.
        checkpoint.scan_checkpoint(tmp)
        _fsync_dir(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    if (found := _existing(ck, out, num_layers, names)) is not None and found.bytes == data_bytes:
        # Either ours, or an identical one another writer published first.
        return FingerprintInfo(found.path, num_layers, data_bytes, found.fraction, ck.digest, reused=False)
    raise CheckpointError(f"the fingerprint at {out} changed while it was being written; retry.")


def _same_fingerprint(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two markers describe the same fingerprint: everything but where its source was read
    from (two registrations of identical checkpoints at different paths share one fingerprint folder,
    ``fingerprint_dir`` being named by the digest)."""
    if a is None or b is None:
        return False
    return {k: v for k, v in a.items() if k != "source_path"} == {k: v for k, v in b.items() if k != "source_path"}


def _publish(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. A different folder at ``out`` is moved aside first and deleted; if
    a concurrent writer publishes first, its (identical) fingerprint is kept and ``tmp`` dropped."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if not out.exists():
            raise
    if _same_fingerprint(_read_marker(out), _read_marker(tmp)):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(out, trash)
    try:
        os.rename(tmp, out)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_abandoned(out: Path) -> None:
    """Delete temporary folders of ``out`` left by writers that crashed (untouched for an hour); a
    younger one may belong to a writer still at work and is left alone."""
    cutoff = time.time() - ABANDONED_AFTER_S
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            if stale.stat().st_mtime < cutoff:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def fingerprint_dir(ck: Checkpoint, work_dir: str | os.PathLike) -> Path:
    """Where a checkpoint's fingerprints live: ``work_dir/<digest[:16]>``."""
    return Path(work_dir) / ck.digest[:16]


def make_fingerprints(ck: Checkpoint, work_dir: str | os.PathLike) -> list[FingerprintInfo]:
    """The 1- and 2-layer fingerprints of ``ck`` under ``work_dir/<digest[:16]>/L1`` and ``L2``."""
    if ck.arch.num_layers < max(FINGERPRINT_LAYERS):
        raise UnsupportedModel(
            f"{ck.path} has {ck.arch.num_layers} hidden layer(s); fingerprint profiling needs at least "
            f"{max(FINGERPRINT_LAYERS)} to separate per-layer from other costs."
        )
    base = fingerprint_dir(ck, work_dir)
    return [write_fingerprint(ck, base / f"L{n}", n) for n in FINGERPRINT_LAYERS]


def fingerprint_cost_fields(infos: list[FingerprintInfo]) -> tuple[list[int], list[float]]:
    """``(fingerprint_bytes, fingerprint_fraction)`` for a ``ProfilingCost``."""
    return [i.bytes for i in infos], [i.fraction for i in infos]


__all__ = [
    "FINGERPRINT_LAYERS",
    "FingerprintInfo",
    "fingerprint_cost_fields",
    "fingerprint_dir",
    "fingerprint_tensor_names",
    "make_fingerprints",
    "write_fingerprint",
]
