"""The check that turns the fused Triton decode kernels on: one layer per stage, fused against reference."""

from __future__ import annotations

import torch

from .stage import Stage

FUSED_TOLERANCE = 0.1  # relative L2 between one layer's fused and reference updates (output less input)


def _fused_layer_gap(stage: Stage, n: int) -> float:
    """How far the fused decode of ``stage``'s first layer at position ``n - 1`` is from the reference
    decode, after a prefill of positions ``0..n-2`` (cache rows of layer 0, which every later prefill
    overwrites): the L2 of their difference relative to the reference's update (output less input),
    so that a wrong attention or MLP cannot hide behind the residual. The input is seeded, so TP
    ranks feed the same one. On a TP rank it runs without collectives (``TensorParallel.local``):
    both decodes see the same partial sums, and a rank that fails part-way cannot leave another
    waiting in a collective; only rank 0 adds the residual, so the others' update is the output."""
    layer = stage.layers[0]
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, stage.arch.hidden_size, generator=g).to(device=stage.device, dtype=stage.dtype)
    with stage.tp.local():
        cos, sin = stage.cos[: n - 1].unsqueeze(1), stage.sin[: n - 1].unsqueeze(1)
        layer.prefill(x[:-1], cos, sin, stage.cache, 0, None)
        pos = torch.full((1,), n - 1, dtype=torch.long, device=stage.device)
        one = stage.cos.index_select(0, pos).unsqueeze(1), stage.sin.index_select(0, pos).unsqueeze(1)
        ref = layer.decode(x[-1:], one[0], one[1], stage.cache, 0, pos, n, None).float()
        got = layer.decode_fused(
            x[-1:], stage.cos, stage.sin, stage.cache, 0, pos, stage.window or 0, stage.splits
        ).float()
    update = (ref - x[-1:].float()).norm() if stage.tp.rank == 0 else ref.norm()
    return float((got - ref).norm() / update.clamp_min(1e-12))


def fused_problem(stages: list[Stage], n: int) -> str:
    """Why the fused decode kernels must stay off ("" when every stage that can fuse agrees with the
    reference): each such stage's first layer decodes position ``n - 1`` after a prefix, with and
    without them (``_fused_layer_gap`` < ``FUSED_TOLERANCE``). See docs/engine-internals.md#fused-decode."""
    problem = ""
    for stage in stages:
        if not stage.can_fuse:
            continue
        try:
            rel = _fused_layer_gap(stage, n)
            if not rel < FUSED_TOLERANCE:
                problem = f"fused decode differs from the reference by {rel:.3g} (relative L2 of one layer's update)"
        except Exception as e:  # noqa: BLE001 - any failure of the optional kernels means: do not use them
            problem = f"fused decode failed: {type(e).__name__}: {e}"
        if problem:
            break
    return problem
