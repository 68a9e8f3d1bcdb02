"""Tensor parallelism: a stage's process group and collectives (``TensorParallel``), and the leader/follower
protocol of a tensor-parallel engine (``TPControl``). See docs/engine-internals.md#tensor-parallelism.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch

from iserve.errors import BadRequest


class TensorParallel:
    """One stage's tensor-parallel group: this process is rank ``rank`` of ``size``.

    ``group`` is a ``torch.distributed`` process group (NCCL on CUDA, gloo on CPU) whose ranks are
    the ``size`` processes of the deployment; with ``size == 1`` nothing is communicated.
    """

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None):
        self.rank = rank
        self.size = size
        self.group = group
        self.collectives = size > 1

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's ``(start, count)`` of ``n`` items split evenly; ``n`` must divide by the size."""
        if n % self.size:
            raise BadRequest(
                f"tensor parallelism of degree {self.size} needs {what} ({n}) to be divisible by {self.size}."
            )
        count = n // self.size
        return self.rank * count, count

    @contextmanager
    def local(self):
        """Within: no collectives; each rank computes its own partial sums. For checks that compare two
        computations on this rank alone (the fused decode check), where a collective could hang the
        ranks when one of them leaves the check early. See docs/engine-internals.md#tensor-parallelism."""
        was = self.collectives
        self.collectives = False
        try:
            yield self
        finally:
            self.collectives = was

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place when ``t`` is contiguous (use the returned tensor). A 2:4
        sparse product comes out transposed (not contiguous), and NCCL refuses such a tensor: on
        the ranks that add no residual (all but rank 0) the row-parallel output is that product."""
        if self.collectives:
            import torch.distributed as dist

            t = t.contiguous()
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather_columns(self, t: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` on each rank -> ``[T, size * n]``, rank r's columns at ``[r * n, (r + 1) * n)``."""
        if not self.collectives:
            return t
        import torch.distributed as dist

        T, n = t.shape
        out = torch.empty(self.size * T, n, dtype=t.dtype, device=t.device)
        # torch 2.13 renamed all_gather_into_tensor (the name torch 2.11 has) to all_gather_single.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, t.contiguous(), group=self.group)
        return out.view(self.size, T, n).permute(1, 0, 2).reshape(T, self.size * n)


class TPControl:
    """The leader/follower protocol of a tensor-parallel engine (see docs/engine-internals.md#tensor-parallelism)."""

    def __init__(self, rank: int, size: int, control_group, step_group, step_device: torch.device):
        self.rank = rank
        self.size = size
        self.control = control_group  # gloo: requests (pickled)
        self.step = step_group  # the last stage's group: per-step token and stop flag
        self.flag = torch.zeros(2, dtype=torch.long, device=step_device)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def send(self, message: tuple) -> tuple:
        """Leader: broadcast ``message``; follower: receive it (the argument is ignored)."""
        import torch.distributed as dist

        box: list = [message if self.leader else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def all_agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective: every rank calls it at the same point).
        Decisions each rank takes from its own checks (fused kernels, prefill graphs) must agree:
        a fused stage captures one decode graph where an unfused one captures a graph per bucket,
        and the collectives of their warm-ups would no longer pair up across the ranks."""
        import torch.distributed as dist

        flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.control)
        return bool(flag.item())

    def agree(self, token: torch.Tensor | None, stop: bool) -> tuple[int, bool]:
        """Every rank gets the leader's token and stop flag. The leader's ``token`` (a ``[1]`` long
        tensor on the last stage's device; followers pass None) goes into the flag on the device and
        is broadcast from there, so each step waits on the host once, for the broadcast flag, not
        also for the leader's own token first. ``self.token`` then holds the token on the device,
        for the next decode step to read without a copy from the host."""
        import torch.distributed as dist

        if self.leader:
            assert token is not None  # the leader always passes its token
            self.flag[:1].copy_(token.view(1))
            self.flag[1].fill_(int(stop))
        dist.broadcast(self.flag, src=0, group=self.step)
        token_id, flag = self.flag.tolist()
        return int(token_id), bool(flag)

    @property
    def token(self) -> torch.Tensor:
        """The last agreed token, a ``[1]`` view of the flag on the device."""
        return self.flag[:1]


def init_groups(stages: int, tp_rank: int, tp_size: int, backend_of_stage: list[str]):
    """One process group per stage (each binds to that stage's device) and a gloo control group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise BadRequest(
            f"tensor parallelism of degree {tp_size} needs torch.distributed initialized with one process per rank "
            "before Engine.load (the GPU agent's worker does this)."
        )
    if dist.get_world_size() != tp_size or dist.get_rank() != tp_rank:
        raise BadRequest(
            f"Engine.load got tp_rank={tp_rank}, tp_size={tp_size} but torch.distributed has rank {dist.get_rank()} "
            f"of {dist.get_world_size()}."
        )
    ranks = list(range(tp_size))
    groups = [dist.new_group(ranks, backend=backend) for backend in backend_of_stage]
    control = dist.new_group(ranks, backend="gloo")
    return groups, control
