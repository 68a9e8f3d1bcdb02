"""Safetensors shard headers: each tensor's dtype, shape and byte range, checked against the file."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # absolute path of the shard
    begin: int  # byte offset of the data in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], bytes]:
    """Parse one shard's header and check every tensor's byte range; returns entries and raw header."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{p.name} is {size} bytes, too short to be a safetensors file; re-copy it.")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{p.name} has a corrupt safetensors header (declared {n} bytes in a {size}-byte file); re-copy it."
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {p}: {e.strerror}.") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{p.name} has a corrupt safetensors header (not JSON); re-copy the file.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p.name} has a corrupt safetensors header; re-copy the file.")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(x) for x in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{p.name}: tensor {name!r} has a malformed header entry; re-copy the file."
            ) from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{p.name}: tensor {name!r} has unknown dtype {dtype!r}.")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != want or begin < 0:
            raise CheckpointError(
                f"{p.name}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {want}; "
                "the file is corrupt."
            )
        if end > data_len:
            raise CheckpointError(
                f"{p.name} is truncated: tensor {name!r} ends at byte {data_start + end} of a {size}-byte file; "
                "re-copy or re-download it."
            )
        entries[name] = TensorEntry(name, dtype, shape, str(p.resolve()), data_start + begin, data_start + end)
    return entries, raw
