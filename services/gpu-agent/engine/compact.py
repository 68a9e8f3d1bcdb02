"""Building a layer compact: allocations in a private memory pool, kept tensors copied out back to back.

See docs/engine-internals.md#compact-layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def release_cached(device: torch.device) -> None:
    """Hand the allocator's cached free blocks back to the driver (CUDA only). Called after each
    layer is built, so that the next layer's tensors do not pin the segments cached for the last
    one's temporaries; see docs/engine-internals.md#compact-layers."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


_ENGINE_PACKAGE = __name__.rpartition(".")[0]


def build_compact(device: torch.device, build: Callable[[], Any], *, compact: bool = True) -> Any:
    """Run ``build`` (loading and converting one layer) with its allocations in a private memory
    pool, then copy the tensors the result keeps into the device's default pool, back to back,
    and release the private pool whole (see docs/engine-internals.md#compact-layers). A tensor
    subclass with ``__tensor_flatten__`` (2:4) is rebuilt around copies of its inner tensors. Not
    on CPU, without ``torch.cuda.MemPool``, or with ``compact=False``: then it only empties the
    allocator's cache after ``build``.
    """
    if (
        not compact
        or device.type != "cuda"
        or not hasattr(torch.cuda, "MemPool")
        or not hasattr(torch.cuda, "use_mem_pool")
    ):
        out = build()
        release_cached(device)
        return out
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool, device):
        out = build()
    if not _relocatable(out):
        raise RuntimeError(
            "build_compact: the layer holds a tensor subclass without __tensor_flatten__; build it with compact=False"
        )
    _relocate(out, {})
    del pool  # the build's tensors were freed as their references went (no cycles hold them)
    release_cached(device)
    return out


def _children(obj: Any) -> list[tuple[Any, Any]]:
    """(key, value) pairs of an engine object's attributes, a list's or a dict's items."""
    if isinstance(obj, dict):
        return list(obj.items())
    if isinstance(obj, (list, tuple)):
        return list(enumerate(obj))
    if type(obj).__module__.startswith(_ENGINE_PACKAGE) and hasattr(obj, "__dict__"):
        return list(vars(obj).items())
    return []


def every_tensor(obj: Any, ok: Callable[[torch.Tensor], bool], seen: set[int] | None = None) -> bool:
    """Whether ``ok`` holds for every tensor ``obj`` holds (through engine objects, lists, tuples, dicts)."""
    if isinstance(obj, torch.Tensor):
        return ok(obj)
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return True
    seen.add(id(obj))
    return all(every_tensor(v, ok, seen) for _, v in _children(obj))


def is_plain(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor


def _flattened(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any] | None:
    """A wrapper subclass's inner tensors by name and its metadata (``__tensor_flatten__``), or None
    for a plain tensor or a subclass that does not say what it holds."""
    if is_plain(t) or not hasattr(type(t), "__tensor_flatten__"):
        return None
    names, meta = t.__tensor_flatten__()  # type: ignore[attr-defined]  # a wrapper subclass
    return {n: getattr(t, n) for n in names}, meta


def _relocatable_tensor(t: torch.Tensor) -> bool:
    """Plain, or a subclass whose inner tensors are plain (one level, as the 2:4 format is)."""
    if is_plain(t):
        return True
    flat = _flattened(t)
    return flat is not None and all(is_plain(x) for x in flat[0].values())


def _relocatable(obj: Any) -> bool:
    """Whether ``_relocate`` can copy every tensor ``obj`` holds."""
    return every_tensor(obj, _relocatable_tensor)


def _copy_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.clone() if t.is_cuda else t


def _copy_tensor(t: torch.Tensor, copy: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``copy(t)`` for a plain tensor; a wrapper subclass rebuilt around copies of its inner tensors."""
    flat = _flattened(t)
    if flat is None:
        return copy(t)
    inner, meta = flat
    unflatten = type(t).__tensor_unflatten__  # type: ignore[attr-defined]  # a wrapper subclass
    return unflatten({n: copy(x) for n, x in inner.items()}, meta, t.size(), t.stride())


def _relocate(obj: Any, memo: dict[int, Any], copy: Callable[[torch.Tensor], torch.Tensor] = _copy_cuda) -> Any:
    """``obj`` with every tensor it holds (through engine objects, lists, tuples, dicts) replaced by
    ``copy(tensor)``; a tensor held twice stays shared. Lists, dicts and engine objects are updated
    in place, tuples rebuilt."""
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        memo[id(obj)] = _copy_tensor(obj, copy)
    elif isinstance(obj, tuple):
        memo[id(obj)] = tuple(_relocate(v, memo, copy) for v in obj) if type(obj) is tuple else obj
    else:
        memo[id(obj)] = obj
        if isinstance(obj, list):
            obj[:] = [_relocate(v, memo, copy) for v in obj]
        elif isinstance(obj, dict):
            for k in list(obj):
                obj[k] = _relocate(obj[k], memo, copy)
        else:
            for k, v in _children(obj):
                setattr(obj, k, _relocate(v, memo, copy))
    return memo[id(obj)]
