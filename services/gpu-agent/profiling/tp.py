"""Several tensor-parallel engines in one set of rank processes: the leader tells the followers
which engine's generation comes next (see docs/profiling.md#tensor-parallelism)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PHASE_END = -1  # broadcast instead of an engine index: the phase is over


def broadcast_index(coord, value: int | None) -> int:
    """Rank 0 sends ``value`` (None: ``PHASE_END``) on ``coord``; every rank returns what rank 0 sent."""
    import torch.distributed as dist

    box = torch.tensor([PHASE_END if value is None else value], dtype=torch.long)
    dist.broadcast(box, src=0, group=coord)
    return int(box.item())


class Announced:
    """A TP leader's engine, one of several in a measurement: ``announce()`` tells the followers that
    its generation comes next. Everything else is the engine's."""

    def __init__(self, engine, index: int, coord):
        self.engine = engine
        self.index = index
        self.coord = coord

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def announce(self) -> None:
        broadcast_index(self.coord, self.index)


def announce_next(engine) -> None:
    """Before a timed generation: let the followers know which engine runs it (TP leaders only)."""
    announce = getattr(engine, "announce", None)
    if announce is not None:
        announce()


def follow_phase(coord, engines: Sequence[Any] | Mapping[int, Any]) -> int:
    """A follower: run the generations the leader announces until it ends the phase."""
    done = 0
    while (index := broadcast_index(coord, None)) != PHASE_END:
        if not engines[index].follow_one():
            raise RuntimeError(f"the TP leader closed engine {index} while the followers expected a generation")
        done += 1
    return done
