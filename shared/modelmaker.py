"""Random-weight checkpoints of real model shapes, for demos, tests and profiling without downloads.

``make_checkpoint`` writes a Hugging Face-style folder (``config.json`` + safetensors) for a preset of
``iserve.presets``; ``dense_layers=N`` writes a sparse checkpoint (only the first ``N`` layers hold
data). Command line: ``python -m iserve.modelmaker OUT_DIR --preset llama-2-7b``.

See docs/modelmaker.md.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (
    arch_from_config,
    config_with_layers,
    embed_name,
    expected_tensors,
    final_norm_names,
    head_names,
    layer_prefix,
)
from .presets import PRESETS

# torch_dtype name -> (torch dtype, safetensors dtype tag, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, str, int]] = {
    "float16": (torch.float16, "F16", 2),
    "bfloat16": (torch.bfloat16, "BF16", 2),
    "float32": (torch.float32, "F32", 4),
}


def preset_config(
    preset: str, *, num_layers: int | None = None, overrides: dict[str, Any] | None = None, dtype: str = "float16"
) -> dict[str, Any]:
    """The ``config.json`` dict ``make_checkpoint`` writes for these arguments."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}.")
    cfg = copy.deepcopy(PRESETS[preset])
    cfg.update(copy.deepcopy(overrides or {}))
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, not {num_layers}.")
        cfg = config_with_layers(cfg, int(num_layers))
    cfg["torch_dtype"] = dtype
    return cfg


def tensor_order(names: dict[str, tuple[int, ...]], num_layers: int, arch: Any = None) -> list[str]:
    """Hugging Face's order: embedding, layer 0 .. n-1 (each layer's tensors sorted), final norm, head
    (names of ``arch``'s family; Llama's without it)."""
    if arch is None:
        head: list[str] = [n for n in ("model.embed_tokens.weight",) if n in names]
        tail: list[str] = [n for n in ("model.norm.weight", "lm_head.weight") if n in names]
    else:
        head = [embed_name(arch)]
        tail = final_norm_names(arch) + head_names(arch)
    layers = []
    for i in range(num_layers):
        p = layer_prefix(i, arch)
        layers += sorted(n for n in names if n.startswith(p))
    order = head + layers + tail
    assert len(order) == len(names), "tensor_order lost tensors: expected_tensors has names of an unknown kind"
    return order


def _is_norm_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A normalization layer's scale (RMSNorm/LayerNorm weight): made 1.0."""
    if len(shape) != 1 or not name.endswith(".weight"):
        return False
    leaf = name.rsplit(".", 2)[-2]
    return "norm" in leaf or leaf.startswith("ln_") or leaf == "ln_f"


def _split_into_shards(order: list[str], nbytes: dict[str, int], shards: int) -> list[list[str]]:
    """Consecutive groups of tensors of roughly equal byte size; every group holds at least one."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}.")
    if shards > len(order):
        raise ValueError(f"cannot split {len(order)} tensors into {shards} shards; use at most {len(order)}.")
    total = sum(nbytes.values())
    groups: list[list[str]] = [[]]
    done = 0
    for i, name in enumerate(order):
        not_started = shards - len(groups)
        # Start the next shard once this one has its share of the bytes, or when every tensor left
        # is needed to give each remaining shard one tensor.
        if groups[-1] and not_started and (done >= total * len(groups) / shards or len(order) - i <= not_started):
            groups.append([])
        groups[-1].append(name)
        done += nbytes[name]
    return groups


# Large tensors are drawn in chunks of this many elements, each from its own generator, on a thread
# pool (torch releases the GIL while it fills a tensor), so generation uses every core.
_CHUNK = 1 << 22


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _make_tensor(
    name: str,
    shape: tuple[int, ...],
    seed: int,
    dtype: torch.dtype,
    std: float,
    pool: ThreadPoolExecutor,
    device: str = "cpu",
) -> torch.Tensor:
    """Norm weights are ones; everything else normal(0, std), reproducible from (seed, name). With a
    CUDA ``device`` the values are drawn there (one generator per tensor) and copied back."""
    if _is_norm_weight(name, shape):
        return torch.ones(shape, dtype=dtype)
    if torch.device(device).type == "cuda":
        g = torch.Generator(device=device).manual_seed(_seed_of(seed, name))
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=g).cpu()
    t = torch.empty(shape, dtype=dtype)
    flat = t.view(-1)

    def fill(i: int) -> None:
        g = torch.Generator().manual_seed(_seed_of(seed, name, i))
        flat[i * _CHUNK : (i + 1) * _CHUNK].normal_(0.0, std, generator=g)  # drawn in the target dtype

    list(pool.map(fill, range(math.ceil(flat.numel() / _CHUNK))))
    return t


def _write_shard(
    path: Path,
    names: list[str],
    shapes: dict[str, tuple[int, ...]],
    st_dtype: str,
    elem_bytes: int,
    make: Any,
    holes: frozenset[str] = frozenset(),
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file tensor by tensor; returns the bytes of tensor data in it. Tensors in
    ``holes`` are not written: the file position skips their bytes (a filesystem hole, zeros)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for n in names:
        size = math.prod(shapes[n]) * elem_bytes
        header[n] = {"dtype": st_dtype, "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in names:
            if n in holes:
                f.seek(math.prod(shapes[n]) * elem_bytes, 1)
                continue
            t = make(n).contiguous()
            f.write(memoryview(t.view(torch.uint8).numpy()))
            del t
        f.truncate()  # the file ends where the data does, also when the last tensors are holes
    tmp.replace(path)
    return offset


def make_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny-llama",
    *,
    num_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    dtype: str = "float16",
    shards: int = 1,
    std: float = 0.02,
    device: str = "cpu",
    dense_layers: int | None = None,
) -> Path:
    """Write a random-weight checkpoint of ``preset`` into ``out_dir`` and return its path.

    ``num_layers`` replaces the preset's layer count (fingerprints use 1 and 2); ``overrides``
    replaces any other config.json fields (applied before ``num_layers``); ``device`` ("cpu" or
    "cuda[:i]") is where the values are drawn. Existing ``model*.safetensors`` files and the index in
    ``out_dir`` are replaced, other files are kept. With ``dense_layers`` the checkpoint is sparse:
    only the embedding, final norm(s), LM head and hidden layers ``0 .. dense_layers - 1`` are
    written, every other tensor is a hole that reads as zeros (see the module docstring).
    """
    cfg = preset_config(preset, num_layers=num_layers, overrides=overrides, dtype=dtype)
    arch = arch_from_config(cfg)
    shapes = expected_tensors(arch)
    torch_dtype, st_dtype, elem_bytes = DTYPES[dtype]
    order = tensor_order(shapes, arch.num_layers, arch)
    nbytes = {n: math.prod(shapes[n]) * elem_bytes for n in order}
    groups = _split_into_shards(order, nbytes, shards)
    holes: frozenset[str] = frozenset()
    metadata: dict[str, str] = {}
    if dense_layers is not None:
        if dense_layers < 0:
            raise ValueError(f"dense_layers must be at least 0, not {dense_layers}.")
        dense = set(dense_tensor_names(arch, dense_layers))
        holes = frozenset(n for n in order if n not in dense)
        metadata = {"iserve_dense_layers": str(dense_layers)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        if stale.is_file():
            stale.unlink()
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:

        def make(name: str) -> torch.Tensor:
            return _make_tensor(name, shapes[name], seed, torch_dtype, std, pool, device)

        if shards == 1:
            _write_shard(out / "model.safetensors", groups[0], shapes, st_dtype, elem_bytes, make, holes, metadata)
        else:
            weight_map: dict[str, str] = {}
            total = 0
            for i, group in enumerate(groups):
                fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
                total += _write_shard(out / fname, group, shapes, st_dtype, elem_bytes, make, holes, metadata)
                weight_map.update({n: fname for n in group})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def dense_tensor_names(arch: Any, dense_layers: int) -> list[str]:
    """The tensors a sparse checkpoint with ``dense_layers`` writes: embedding, hidden layers
    ``0 .. dense_layers - 1``, final norm(s), LM head (Hugging Face order)."""
    shapes = expected_tensors(arch)
    order = tensor_order(shapes, arch.num_layers, arch)
    layer_part = {
        n for i in range(dense_layers, arch.num_layers) for n in shapes if n.startswith(layer_prefix(i, arch))
    }
    return [n for n in order if n not in layer_part]


def disk_bytes(path: str | Path) -> tuple[int, int]:
    """``(apparent size, bytes of disk blocks)`` of the safetensors files under ``path`` (as ``du``
    reports: a sparse checkpoint's holes take no blocks)."""
    files = [Path(path)] if Path(path).is_file() else list(Path(path).glob("*.safetensors"))
    st = [f.stat() for f in files]
    return sum(s.st_size for s in st), sum(s.st_blocks * 512 for s in st)


def main(argv: list[str] | None = None) -> int:
    """``iserve make-model``: write a random-weight checkpoint; prints where and how big."""
    ap = argparse.ArgumentParser(
        prog="iserve make-model", description="Write a random-weight checkpoint of a real model shape."
    )
    ap.add_argument("out_dir", metavar="OUT_DIR", help="folder to write config.json and the safetensors files into")
    ap.add_argument("--preset", default="tiny-llama", choices=sorted(PRESETS), help="model shape (default: tiny-llama)")
    ap.add_argument("--layers", type=int, default=None, help="number of hidden layers (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (default: 0)")
    ap.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="stored dtype (default: float16)")
    ap.add_argument("--shards", type=int, default=1, help="number of safetensors files (default: 1)")
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of the weights (default: 0.02)")
    ap.add_argument(
        "--device", default="cpu", help="where to draw the values: cpu or cuda[:i] (default: cpu; cuda is much faster)"
    )
    ap.add_argument(
        "--dense-layers",
        type=int,
        default=None,
        metavar="N",
        help="sparse checkpoint: write only the embedding, final norm, LM head and the first N layers; the other "
        "tensors are filesystem holes reading as zeros (for profiling fingerprints of huge shapes)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a config.json field, e.g. --set num_local_experts=2 (repeatable)",
    )
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set takes KEY=VALUE, not {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    t0 = time.perf_counter()
    try:
        path = make_checkpoint(
            args.out_dir,
            args.preset,
            num_layers=args.layers,
            overrides=overrides,
            seed=args.seed,
            dtype=args.dtype,
            shards=args.shards,
            std=args.std,
            device=args.device,
            dense_layers=args.dense_layers,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size, on_disk = disk_bytes(path)
    layers = args.layers or arch_from_config(PRESETS[args.preset]).num_layers
    sparse = f", sparse: {on_disk / 2**20:.1f} MiB on disk" if args.dense_layers is not None else ""
    print(
        f"wrote {args.preset} ({layers} layers, {args.dtype}, "
        f"{args.shards} shard(s), {size / 2**20:.1f} MiB{sparse}) to {path} in {time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
