"""Reading checkpoint tensors onto a device, optionally from a ``TensorCache`` of tensors read once."""

from __future__ import annotations

from typing import Any

from iserve import checkpoint
from iserve.checkpoint import Checkpoint


class TensorCache:
    """Checkpoint tensors read once and kept on one device, for a process that builds the same small
    checkpoints many times: a profiling job builds each fingerprint once per variant, and with the
    cache passed (``Engine.load(..., tensors=cache)``) ``load_tensors`` hands out copies of the cached
    tensors instead of reading the files again. Copies, so that an engine owns its weights (and its
    memory is measured) exactly as if it had read them."""

    def __init__(self, device: str):
        self.device = str(device)
        self._tensors: dict[tuple[str, str], Any] = {}

    def add(self, ck: Checkpoint) -> None:
        """Read every tensor of ``ck`` onto the device."""
        self._tensors.update(
            {(ck.tensors[n].file, n): t for n, t in checkpoint.load_tensors(ck, list(ck.tensors), self.device).items()}
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def clear(self) -> None:
        self._tensors.clear()

    def get(self, ck: Checkpoint, name: str, device: str) -> Any | None:
        entry = ck.tensors.get(name)
        if entry is None or str(device) != self.device:
            return None
        t = self._tensors.get((entry.file, name))
        return None if t is None else t.clone()


def load_tensors(
    ck: Checkpoint, names: list[str], device: str = "cpu", *, cache: TensorCache | None = None
) -> dict[str, Any]:
    """``names`` of ``ck`` on ``device``: copies from ``cache`` where it holds them, the rest read from
    the shards (``checkpoint.load_tensors``)."""
    cached = {} if cache is None else {n: t for n in names if (t := cache.get(ck, n, device)) is not None}
    missing = [n for n in names if n not in cached]
    read = checkpoint.load_tensors(ck, missing, device) if missing else {}
    return {n: cached[n] if n in cached else read[n] for n in names}
