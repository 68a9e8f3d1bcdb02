"""Loading a model's pipeline stages for ``Engine.load``: checking the request, building each stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from iserve.checkpoint import Checkpoint, scan_checkpoint
from iserve.errors import BadRequest, UnsupportedModel

from .capabilities import CAPABILITIES
from .compact import release_cached
from .parallel_residual import FAMILIES, ParallelResidualStage
from .stage import Stage
from .tensors import TensorCache
from .tokenizer import Tokenizer, load_tokenizer
from .tp import TensorParallel, TPControl, init_groups

_CUDA_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _parse_device(spec: str, index: int) -> torch.device:
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise BadRequest(
            f"stage {index} names device {spec!r}, which is not a torch device; use 'cpu' or 'cuda:N'."
        ) from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise BadRequest(
            f"stage {index} names device {spec!r}; the torch engine runs on 'cpu' and 'cuda:N' devices only."
        )
    if not torch.cuda.is_available():
        raise BadRequest(
            f"stage {index} asks for {spec!r} but this process sees no CUDA device; "
            "check CUDA_VISIBLE_DEVICES and the driver."
        )
    idx = torch.cuda.current_device() if dev.index is None else dev.index
    if idx >= torch.cuda.device_count():
        raise BadRequest(
            f"stage {index} asks for {spec!r} but this process sees only {torch.cuda.device_count()} CUDA device(s)."
        )
    return torch.device("cuda", idx)


def _check_stages(stages: Sequence[tuple[str, int, int]], num_layers: int) -> None:
    if not stages:
        raise BadRequest("no pipeline stages were given; pass at least one (device, first_layer, num_layers).")
    end = 0
    for i, stage in enumerate(stages):
        try:
            _, first, n = stage
            first, n = int(first), int(n)
        except (TypeError, ValueError):
            raise BadRequest(f"stage {i} is {stage!r}; each stage is (device, first_layer, num_layers).") from None
        if n < 1:
            raise BadRequest(f"stage {i} holds {n} layers; every stage needs at least one layer.")
        if first != end:
            raise BadRequest(
                f"stage {i} starts at layer {first} but the stages before it end at layer {end}; stages must cover "
                f"layers 0..{num_layers - 1} once each, contiguously and in order."
            )
        end += n
    if end != num_layers:
        raise BadRequest(
            f"the stages hold {end} layers but the model has {num_layers}; make them cover every layer exactly once."
        )


@dataclass
class LoadedStages:
    """What ``load_stages`` built: the stages, the tokenizer and, with TP, the control and its groups."""

    checkpoint: Checkpoint
    stages: list[Stage]
    tokenizer: Tokenizer
    tp: TPControl | None
    groups: list


def load_stages(
    model_dir: str | Path,
    stages: Sequence[tuple[str, int, int]],
    context_tokens: int,
    *,
    dtype: str | None,
    weight_quant: str,
    kv_quant: str,
    pruning: str,
    tp_rank: int,
    tp_size: int,
    replay_layers: int,
    replay_distinct: bool,
    tensors: TensorCache | None,
) -> LoadedStages:
    """Check the checkpoint, the variant, ``stages``, the context and the dtype, then build every stage
    (see ``Engine.load`` for the arguments); ``tensors`` supplies cached copies of checkpoint tensors."""
    ck = scan_checkpoint(model_dir)
    arch = ck.arch
    if arch.family not in CAPABILITIES["families"]:
        raise UnsupportedModel(
            f"the torch engine runs the {', '.join(CAPABILITIES['families'])} families, not {arch.family} "
            f"(model_type {arch.model_type!r})."
        )
    for knob, value in (("weight_quant", weight_quant), ("kv_quant", kv_quant), ("pruning", pruning), ("tp", tp_size)):
        if value not in CAPABILITIES[knob]:
            raise UnsupportedModel(f"the torch engine cannot run {knob}={value!r} (it supports {CAPABILITIES[knob]}).")
    if not 0 <= tp_rank < tp_size:
        raise BadRequest(f"tp_rank must be in 0..{tp_size - 1}, not {tp_rank}.")
    _check_stages(stages, arch.num_layers)
    if not isinstance(context_tokens, int) or context_tokens < 1:
        raise BadRequest(f"context_tokens must be a positive integer, not {context_tokens!r}.")
    if context_tokens > arch.max_position:
        raise BadRequest(
            f"context_tokens {context_tokens} exceeds the model's max_position_embeddings {arch.max_position}; "
            "deploy with a shorter context."
        )
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise BadRequest(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPE_NAMES)}.")
    devices = [_parse_device(s[0], i) for i, s in enumerate(stages)]
    tokenizer = load_tokenizer(model_dir, arch)
    tp_groups: list = [None] * len(stages)
    control = None
    if tp_size > 1:
        tp_groups, control = init_groups(
            len(stages), tp_rank, tp_size, ["nccl" if d.type == "cuda" else "gloo" for d in devices]
        )
    built = []
    stage_cls = ParallelResidualStage if arch.family in FAMILIES else Stage
    with torch.inference_mode():
        for i, (dev, (_, first, n)) in enumerate(zip(devices, stages)):
            if dtype is not None:
                stage_dtype = _DTYPE_NAMES[dtype]
            elif dev.type == "cuda":
                stage_dtype = (
                    torch.bfloat16 if weight_quant == "int4" else _CUDA_DTYPES.get(arch.torch_dtype, torch.float16)
                )
            else:
                stage_dtype = torch.float32
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            try:
                built.append(
                    stage_cls(
                        ck,
                        dev,
                        int(first),
                        int(n),
                        context_tokens=context_tokens,
                        dtype=stage_dtype,
                        weight_quant=weight_quant,
                        kv_quant=kv_quant,
                        pruning=pruning,
                        tp=TensorParallel(tp_rank, tp_size, tp_groups[i]),
                        tensors=tensors,
                    )
                )
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise
                raise UnsupportedModel(
                    f"stage {i} cannot be loaded as weight_quant={weight_quant}, pruning={pruning} on {dev}: {e}"
                ) from None
        if replay_layers:
            if len(built) != 1:
                raise BadRequest("replay_layers is for a model loaded as one stage.")
            built[0].replay(replay_layers, distinct=replay_distinct)
        for dev in devices:
            release_cached(dev)  # the last layer's and the head's load scratch
        tp = TPControl(tp_rank, tp_size, control, tp_groups[-1], built[-1].device) if tp_size > 1 else None
        groups = [g for g in [*tp_groups, control] if g is not None]
        return LoadedStages(ck, built, tokenizer, tp, groups)
