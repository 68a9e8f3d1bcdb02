"""Reading and validating a model checkpoint: ``config.json`` plus safetensors shards.

Only headers are read here (a few KB per shard), never the tensor data, so validating a 13B checkpoint
costs milliseconds. ``load_tensors`` reads just the tensors it is asked for.

A checkpoint is valid when: ``config.json`` parses and names a supported decoder-only architecture
with consistent sizes; every shard's header parses, its tensors' byte ranges match their dtype and
shape and lie inside the file (a truncated file fails here); and every tensor the architecture needs
is present with the right shape.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModel
from .messages import ArchSpec, WeightBreakdown

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

# config.json model_type -> family whose tensor layout we know
MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "mixtral": "mixtral",
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


@dataclass
class Checkpoint:
    path: str
    config: dict[str, Any]
    arch: ArchSpec
    tensors: dict[str, TensorEntry]
    files: list[str]
    digest: str
    has_tokenizer: bool
    data_bytes: int = 0
    header_hashes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# config.json


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory: pass the folder that holds config.json and the *.safetensors files.")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d} has no config.json: a checkpoint folder needs the model's config.json beside its safetensors files.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); restore the file the model was published with.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object.")
    return cfg


def _need_int(cfg: dict[str, Any], key: str, *alts: str) -> int:
    for k in (key, *alts):
        v = cfg.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config.json field {k!r} must be a positive integer, not {v!r}.")
            return v
    raise CheckpointError(f"config.json lacks {key!r}; it is needed to know the model's shape.")


def arch_from_config(cfg: dict[str, Any]) -> ArchSpec:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in MODEL_TYPES:
        if any(isinstance(a, str) and ("Encoder" in a or "Seq2Seq" in a or "ConditionalGeneration" in a) for a in archs):
            raise UnsupportedModel(
                f"model_type {model_type!r} ({', '.join(archs)}) is not a decoder-only LLM; iServe serves decoder-only models."
            )
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}."
        )
    family = MODEL_TYPES[model_type]
    hidden = _need_int(cfg, "hidden_size")
    heads = _need_int(cfg, "num_attention_heads")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0:
        raise CheckpointError(f"config.json field 'num_key_value_heads' must be a positive integer, not {kv_heads!r}.")
    head_dim = cfg.get("head_dim") or (hidden // heads)
    if hidden % heads and not cfg.get("head_dim"):
        raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; fix config.json.")
    if heads % kv_heads:
        raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}; fix config.json.")
    num_experts = int(cfg.get("num_local_experts") or 0) if family == "mixtral" else 0
    eos = cfg.get("eos_token_id", 2)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return ArchSpec(
        family=family,
        model_type=model_type,
        num_layers=_need_int(cfg, "num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=_need_int(cfg, "intermediate_size"),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        vocab_size=_need_int(cfg, "vocab_size"),
        max_position=int(cfg.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling"),
        attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        num_experts=num_experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=eos,
    )


# ---------------------------------------------------------------------------------------------------
# tensor layout per family


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def layer_tensor_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensors of one hidden layer, by name relative to ``model.layers.<i>.``."""
    h, kv, d = arch.hidden_size, arch.num_kv_heads, arch.head_dim
    q_out = arch.num_attention_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_out, h),
        "self_attn.k_proj.weight": (kv * d, h),
        "self_attn.v_proj.weight": (kv * d, h),
        "self_attn.o_proj.weight": (h, q_out),
    }
    if arch.attention_bias:
        shapes["self_attn.q_proj.bias"] = (q_out,)
        shapes["self_attn.k_proj.bias"] = (kv * d,)
        shapes["self_attn.v_proj.bias"] = (kv * d,)
    if arch.family == "mixtral":
        f = arch.intermediate_size
        shapes["block_sparse_moe.gate.weight"] = (arch.num_experts, h)
        for e in range(arch.num_experts):
            shapes[f"block_sparse_moe.experts.{e}.w1.weight"] = (f, h)
            shapes[f"block_sparse_moe.experts.{e}.w2.weight"] = (h, f)
            shapes[f"block_sparse_moe.experts.{e}.w3.weight"] = (f, h)
    else:
        f = arch.intermediate_size
        shapes["mlp.gate_proj.weight"] = (f, h)
        shapes["mlp.up_proj.weight"] = (f, h)
        shapes["mlp.down_proj.weight"] = (h, f)
    return shapes


def other_tensor_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensors outside the hidden layers: embedding, final norm, LM head."""
    shapes = {
        "model.embed_tokens.weight": (arch.vocab_size, arch.hidden_size),
        "model.norm.weight": (arch.hidden_size,),
    }
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, arch.hidden_size)
    return shapes


def expected_tensors(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    out = dict(other_tensor_shapes(arch))
    for i in range(arch.num_layers):
        p = layer_prefix(i)
        out.update({p + k: v for k, v in layer_tensor_shapes(arch).items()})
    return out


# ---------------------------------------------------------------------------------------------------
# safetensors headers


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
                raise CheckpointError(f"{p.name} has a corrupt safetensors header (declared {n} bytes in a {size}-byte file); re-copy it.")
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
            raise CheckpointError(f"{p.name}: tensor {name!r} has a malformed header entry; re-copy the file.") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{p.name}: tensor {name!r} has unknown dtype {dtype!r}.")
        want = math.prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != want or begin < 0:
            raise CheckpointError(f"{p.name}: tensor {name!r} spans {end - begin} bytes but {dtype}{list(shape)} needs {want}; the file is corrupt.")
        if end > data_len:
            raise CheckpointError(
                f"{p.name} is truncated: tensor {name!r} ends at byte {data_start + end} of a {size}-byte file; re-copy or re-download it."
            )
        entries[name] = TensorEntry(name, dtype, shape, str(p.resolve()), data_start + begin, data_start + end)
    return entries, raw


def scan_checkpoint(model_dir: str | os.PathLike, *, validate: bool = True) -> Checkpoint:
    """Read config.json and every shard header; with ``validate`` check the architecture's tensors."""
    d = Path(model_dir).resolve()
    cfg = read_config(d)
    arch = arch_from_config(cfg)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} has no *.safetensors files; iServe reads weights only from safetensors.")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except json.JSONDecodeError:
            raise CheckpointError(f"{index.name} is not valid JSON; restore it or delete it.") from None
        missing_files = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing_files:
            raise CheckpointError(f"shards named in {index.name} are missing: {', '.join(missing_files[:5])}; copy every shard.")
    tensors: dict[str, TensorEntry] = {}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True).encode())
    header_hashes = {}
    for f in files:
        entries, raw = read_safetensors_header(f)
        for name in entries:
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in two shards ({Path(tensors[name].file).name}, {f.name}); remove the stale shard.")
        tensors.update(entries)
        h.update(f.name.encode())
        h.update(raw)
        header_hashes[f.name] = hashlib.sha256(raw).hexdigest()[:16]
    ck = Checkpoint(
        path=str(d),
        config=cfg,
        arch=arch,
        tensors=tensors,
        files=[str(f) for f in files],
        digest=h.hexdigest(),
        has_tokenizer=(d / "tokenizer.json").is_file(),
        data_bytes=sum(t.nbytes for t in tensors.values()),
        header_hashes=header_hashes,
    )
    if validate:
        validate_tensors(ck)
    return ck


def validate_tensors(ck: Checkpoint) -> None:
    want = expected_tensors(ck.arch)
    missing = [n for n in want if n not in ck.tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensor(s) its config.json needs: {', '.join(missing[:3])}{more}; the shards are incomplete or do not match config.json."
        )
    for name, shape in want.items():
        got = ck.tensors[name].shape
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}; the config and weights do not match.")
    dtypes = {ck.tensors[n].dtype for n in want}
    bad = dtypes - {"F16", "BF16", "F32"}
    if bad:
        raise UnsupportedModel(f"weights stored as {', '.join(sorted(bad))} are not supported; provide fp16, bf16 or fp32 weights (iServe quantizes itself).")


def weight_breakdown(ck: Checkpoint) -> WeightBreakdown:
    arch = ck.arch
    layer = layer_tensor_shapes(arch)
    lin = sum(math.prod(s) for s in layer.values() if len(s) == 2)
    other = sum(math.prod(s) for s in layer.values() if len(s) != 2)
    others = other_tensor_shapes(arch)
    first = next(iter(ck.tensors.values()))
    return WeightBreakdown(
        embed_params=math.prod(others["model.embed_tokens.weight"]),
        head_params=math.prod(others["lm_head.weight"]) if "lm_head.weight" in others else 0,
        final_norm_params=math.prod(others["model.norm.weight"]),
        layer_linear_params=lin,
        layer_other_params=other,
        checkpoint_bytes=ck.data_bytes,
        dtype_bytes=DTYPE_BYTES[first.dtype],
    )


def load_tensors(ck: Checkpoint, names: list[str], device: str = "cpu") -> dict[str, Any]:
    """Read only ``names`` from the shards (safetensors memory-maps; nothing else is read)."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for n in names:
        if n not in ck.tensors:
            raise CheckpointError(f"tensor {n!r} is not in the checkpoint at {ck.path}.")
        by_file.setdefault(ck.tensors[n].file, []).append(n)
    out = {}
    for f, ns in by_file.items():
        with safe_open(f, framework="pt", device=device) as sf:
            for n in ns:
                out[n] = sf.get_tensor(n)
    return out
