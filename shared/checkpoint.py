"""Reading and validating a model checkpoint: ``config.json`` plus safetensors shards.

Scanning reads only headers (a few KB per shard); ``load_tensors`` reads the tensors asked for.
Validity rules and each family's tensor layout: docs/engine-internals.md#checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .errors import CheckpointError, UnsupportedModel
from .hf_config import eos_ids, family_fields, need_int, rope_settings
from .messages import ArchSpec, Family, WeightBreakdown
from .shards import DTYPE_BYTES, TensorEntry, read_safetensors_header

# config.json model_type -> family whose tensor layout we know
MODEL_TYPES: dict[str, Family] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "mixtral": "mixtral",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
}


@dataclass(frozen=True)
class FamilyLayout:
    """Where a family keeps the tensors outside its hidden layers, and its layers' name prefix."""

    layer_prefix: str  # formatted with the layer index ``i``
    embed: str
    final_norm: tuple[str, ...]  # weight (and bias for LayerNorm)
    head: str
    head_bias: str = ""


_LLAMA_LAYOUT = FamilyLayout("model.layers.{i}.", "model.embed_tokens.weight", ("model.norm.weight",), "lm_head.weight")
LAYOUTS: dict[str, FamilyLayout] = {
    "llama": _LLAMA_LAYOUT,
    "mixtral": _LLAMA_LAYOUT,
    "falcon": FamilyLayout(
        "transformer.h.{i}.",
        "transformer.word_embeddings.weight",
        ("transformer.ln_f.weight", "transformer.ln_f.bias"),
        "lm_head.weight",
    ),
    "gptj": FamilyLayout(
        "transformer.h.{i}.",
        "transformer.wte.weight",
        ("transformer.ln_f.weight", "transformer.ln_f.bias"),
        "lm_head.weight",
        "lm_head.bias",
    ),
    "gpt_neox": FamilyLayout(
        "gpt_neox.layers.{i}.",
        "gpt_neox.embed_in.weight",
        ("gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"),
        "embed_out.weight",
    ),
}

# config.json keys that hold the number of hidden layers, by family (the first one present is used)
LAYER_KEYS = {"gptj": ("n_layer", "num_hidden_layers"), "falcon": ("num_hidden_layers", "n_layer")}


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
        raise CheckpointError(
            f"{d} is not a directory: pass the folder that holds config.json and the *.safetensors files."
        )
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(
            f"{d} has no config.json: a checkpoint folder needs the model's config.json beside its safetensors files."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{cfg_path} is not valid JSON ({e}); restore the file the model was published with."
        ) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object.")
    return cfg


def arch_from_config(cfg: dict[str, Any]) -> ArchSpec:
    """The :class:`ArchSpec` of a config.json. Raises ``UnsupportedModel`` for an architecture that is
    not a decoder-only LLM of a known family, ``CheckpointError`` for inconsistent sizes."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in MODEL_TYPES:
        seq2seq = ("Encoder", "Seq2Seq", "ConditionalGeneration")
        if any(isinstance(a, str) and any(w in a for w in seq2seq) for a in archs) or cfg.get("is_encoder_decoder"):
            raise UnsupportedModel(
                f"model_type {model_type!r} ({', '.join(map(str, archs))}) is not a decoder-only LLM; "
                "iServe serves decoder-only models."
            )
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(MODEL_TYPES))}."
        )
    family = MODEL_TYPES[model_type]
    f = family_fields(cfg, family, model_type)
    hidden, heads, kv_heads = f["hidden_size"], f["num_attention_heads"], f["num_kv_heads"]
    if not isinstance(kv_heads, int) or isinstance(kv_heads, bool) or kv_heads <= 0:
        raise CheckpointError(f"config.json field 'num_key_value_heads' must be a positive integer, not {kv_heads!r}.")
    explicit_head_dim = cfg.get("head_dim") if family in ("llama", "mixtral") else None
    head_dim = explicit_head_dim or (hidden // heads)
    if hidden % heads and not explicit_head_dim:
        raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}; fix config.json.")
    if heads % kv_heads:
        raise CheckpointError(
            f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}; fix config.json."
        )
    rotary_dim = f.get("rotary_dim", 0)
    if rotary_dim == head_dim:
        f["rotary_dim"] = 0
    elif rotary_dim and (rotary_dim > head_dim or rotary_dim % 2):
        raise CheckpointError(
            f"rotary dimension {rotary_dim} must be even and at most the head dimension {head_dim}; fix config.json."
        )
    num_experts = int(cfg.get("num_local_experts") or 0) if family == "mixtral" else 0
    if family == "mixtral" and num_experts < 1:
        raise CheckpointError("a Mixtral config.json needs num_local_experts >= 1.")
    experts_per_token = int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0
    if num_experts and not 1 <= experts_per_token <= num_experts:
        raise CheckpointError(
            f"num_experts_per_tok {experts_per_token} must be between 1 and num_local_experts {num_experts}; "
            "fix config.json."
        )
    return ArchSpec(
        family=family,
        model_type=model_type,
        head_dim=int(head_dim),
        vocab_size=need_int(cfg, "vocab_size"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
        rope_scaling=rope_settings(cfg)[1],
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        **f,
    )


def config_with_layers(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """A copy of ``cfg`` with its number of hidden layers set to ``num_layers`` (under the key its
    family uses: ``n_layer`` for GPT-J, ``num_hidden_layers`` otherwise)."""
    out = dict(cfg)
    family = MODEL_TYPES.get(str(out.get("model_type")), "llama")
    names = LAYER_KEYS.get(family, ("num_hidden_layers",))
    keys = [k for k in names if k in out] or [names[0]]
    for k in keys:
        out[k] = int(num_layers)
    return out


# ---------------------------------------------------------------------------------------------------
# tensor layout per family


def layout_of(arch: ArchSpec) -> FamilyLayout:
    try:
        return LAYOUTS[arch.family]
    except KeyError:
        raise UnsupportedModel(f"architecture family {arch.family!r} has no known tensor layout.") from None


def layer_prefix(i: int, arch: ArchSpec | None = None) -> str:
    """The name prefix of hidden layer ``i``'s tensors (Llama's ``model.layers.{i}.`` without ``arch``)."""
    return (layout_of(arch) if arch is not None else _LLAMA_LAYOUT).layer_prefix.format(i=i)


def embed_name(arch: ArchSpec) -> str:
    return layout_of(arch).embed


def final_norm_names(arch: ArchSpec) -> list[str]:
    names = list(layout_of(arch).final_norm)
    return names if arch.norm_type == "layer" else names[:1]


def head_names(arch: ArchSpec) -> list[str]:
    """The LM head's own tensors (weight, and bias where the family has one); empty when tied."""
    lay = layout_of(arch)
    out = [] if arch.tie_embeddings else [lay.head]
    if arch.lm_head_bias and lay.head_bias:
        out.append(lay.head_bias)
    return out


def _norm_shapes(names: list[str], arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    h = arch.hidden_size
    out: dict[str, tuple[int, ...]] = {}
    for n in names:
        out[n + ".weight"] = (h,)
        if arch.norm_type == "layer":
            out[n + ".bias"] = (h,)
    return out


def _linear(out: dict[str, tuple[int, ...]], name: str, rows: int, cols: int, bias: bool) -> None:
    out[name + ".weight"] = (rows, cols)
    if bias:
        out[name + ".bias"] = (rows,)


def layer_tensor_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensors of one hidden layer, by name relative to its prefix (:func:`layer_prefix`)."""
    h, kv, d, f = arch.hidden_size, arch.num_kv_heads, arch.head_dim, arch.intermediate_size
    q_out = arch.num_attention_heads * d
    fused_qkv = q_out + 2 * kv * d
    shapes: dict[str, tuple[int, ...]] = {}
    if arch.family in ("llama", "mixtral"):
        shapes.update(_norm_shapes(["input_layernorm", "post_attention_layernorm"], arch))
        _linear(shapes, "self_attn.q_proj", q_out, h, arch.attention_bias)
        _linear(shapes, "self_attn.k_proj", kv * d, h, arch.attention_bias)
        _linear(shapes, "self_attn.v_proj", kv * d, h, arch.attention_bias)
        _linear(shapes, "self_attn.o_proj", h, q_out, False)
        if arch.family == "mixtral":
            shapes["block_sparse_moe.gate.weight"] = (arch.num_experts, h)
            for e in range(arch.num_experts):
                shapes[f"block_sparse_moe.experts.{e}.w1.weight"] = (f, h)
                shapes[f"block_sparse_moe.experts.{e}.w2.weight"] = (h, f)
                shapes[f"block_sparse_moe.experts.{e}.w3.weight"] = (f, h)
        else:
            shapes["mlp.gate_proj.weight"] = (f, h)
            shapes["mlp.up_proj.weight"] = (f, h)
            shapes["mlp.down_proj.weight"] = (h, f)
    elif arch.family == "falcon":
        if arch.layer_norms == 2 and arch.parallel_residual:
            shapes.update(_norm_shapes(["ln_attn", "ln_mlp"], arch))
        elif arch.layer_norms == 2:
            shapes.update(_norm_shapes(["input_layernorm", "post_attention_layernorm"], arch))
        else:
            shapes.update(_norm_shapes(["input_layernorm"], arch))
        _linear(shapes, "self_attention.query_key_value", fused_qkv, h, arch.attention_bias)
        _linear(shapes, "self_attention.dense", h, q_out, arch.attention_out_bias)
        _linear(shapes, "mlp.dense_h_to_4h", f, h, arch.mlp_bias)
        _linear(shapes, "mlp.dense_4h_to_h", h, f, arch.mlp_bias)
    elif arch.family == "gptj":
        shapes.update(_norm_shapes(["ln_1"], arch))
        _linear(shapes, "attn.q_proj", q_out, h, False)
        _linear(shapes, "attn.k_proj", q_out, h, False)
        _linear(shapes, "attn.v_proj", q_out, h, False)
        _linear(shapes, "attn.out_proj", h, q_out, False)
        _linear(shapes, "mlp.fc_in", f, h, arch.mlp_bias)
        _linear(shapes, "mlp.fc_out", h, f, arch.mlp_bias)
    elif arch.family == "gpt_neox":
        shapes.update(_norm_shapes(["input_layernorm", "post_attention_layernorm"], arch))
        _linear(shapes, "attention.query_key_value", fused_qkv, h, arch.attention_bias)
        _linear(shapes, "attention.dense", h, q_out, arch.attention_out_bias)
        _linear(shapes, "mlp.dense_h_to_4h", f, h, arch.mlp_bias)
        _linear(shapes, "mlp.dense_4h_to_h", h, f, arch.mlp_bias)
    else:
        raise UnsupportedModel(f"architecture family {arch.family!r} has no known tensor layout.")
    return shapes


def other_tensor_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Tensors outside the hidden layers, in checkpoint order: embedding, final norm, LM head."""
    shapes: dict[str, tuple[int, ...]] = {embed_name(arch): (arch.vocab_size, arch.hidden_size)}
    for n in final_norm_names(arch):
        shapes[n] = (arch.hidden_size,)
    for n in head_names(arch):
        shapes[n] = (arch.vocab_size, arch.hidden_size) if n.endswith("weight") else (arch.vocab_size,)
    return shapes


def expected_tensors(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    out = dict(other_tensor_shapes(arch))
    for i in range(arch.num_layers):
        p = layer_prefix(i, arch)
        out.update({p + k: v for k, v in layer_tensor_shapes(arch).items()})
    return out


# ---------------------------------------------------------------------------------------------------
# safetensors headers


def scan_checkpoint(model_dir: str | os.PathLike, *, validate: bool = True) -> Checkpoint:
    """Read config.json and every shard header; with ``validate`` check the architecture's tensors."""
    d = Path(model_dir).resolve()
    cfg = read_config(d)
    arch = arch_from_config(cfg)
    eos = eos_ids(cfg, d)
    if eos:
        arch = msgspec.structs.replace(arch, eos_token_ids=eos, eos_token_id=eos[0])
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} has no *.safetensors files; iServe reads weights only from safetensors.")
    odd = [f.name for f in files if not f.is_file()]  # a FIFO or device would block the reader forever
    if odd:
        raise CheckpointError(f"{', '.join(odd[:3])} in {d} is not a regular file; replace it with the shard itself.")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except json.JSONDecodeError:
            raise CheckpointError(f"{index.name} is not valid JSON; restore it or delete it.") from None
        missing_files = sorted({f for f in weight_map.values() if not (d / f).is_file()})
        if missing_files:
            raise CheckpointError(
                f"shards named in {index.name} are missing: {', '.join(missing_files[:5])}; copy every shard."
            )
    tensors: dict[str, TensorEntry] = {}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True).encode())
    header_hashes = {}
    for f in files:
        entries, raw = read_safetensors_header(f)
        for name in entries:
            if name in tensors:
                raise CheckpointError(
                    f"tensor {name!r} appears in two shards ({Path(tensors[name].file).name}, {f.name}); "
                    "remove the stale shard."
                )
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
    # config.json is checked against the tensors before any per-layer work: a claimed million layers
    # must not make a million layers' worth of names (every layer holds several tensors)
    if ck.arch.num_layers > len(ck.tensors):
        raise CheckpointError(
            f"config.json says {ck.arch.num_layers} layers but the checkpoint holds only {len(ck.tensors)} tensors; "
            "fix num_hidden_layers (or the config's equivalent) to match the weights."
        )
    want = expected_tensors(ck.arch)
    missing = [n for n in want if n not in ck.tensors]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint lacks {len(missing)} tensor(s) its config.json needs: {', '.join(missing[:3])}{more}; "
            "the shards are incomplete or do not match config.json."
        )
    for name, shape in want.items():
        got = ck.tensors[name].shape
        if got != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {list(got)} but config.json implies {list(shape)}; "
                "the config and weights do not match."
            )
    dtypes = {ck.tensors[n].dtype for n in want}
    bad = dtypes - {"F16", "BF16", "F32"}
    if bad:
        raise UnsupportedModel(
            f"weights stored as {', '.join(sorted(bad))} are not supported; "
            "provide fp16, bf16 or fp32 weights (iServe quantizes itself)."
        )


def weight_breakdown(ck: Checkpoint) -> WeightBreakdown:
    arch = ck.arch
    layer = layer_tensor_shapes(arch)
    lin = sum(math.prod(s) for s in layer.values() if len(s) == 2)
    other = sum(math.prod(s) for s in layer.values() if len(s) != 2)
    others = other_tensor_shapes(arch)
    first = next(iter(ck.tensors.values()))
    return WeightBreakdown(
        embed_params=math.prod(others[embed_name(arch)]),
        head_params=sum(math.prod(others[n]) for n in head_names(arch)),
        final_norm_params=sum(math.prod(others[n]) for n in final_norm_names(arch)),
        layer_linear_params=lin,
        layer_other_params=other,
        checkpoint_bytes=ck.data_bytes,
        dtype_bytes=DTYPE_BYTES[first.dtype],
    )


def load_tensors(ck: Checkpoint, names: list[str], device: str = "cpu") -> dict[str, Any]:
    """Read only ``names`` from the shards (safetensors memory-maps; nothing else is read)."""
    from safetensors import safe_open

    for n in names:
        if n not in ck.tensors:
            raise CheckpointError(f"tensor {n!r} is not in the checkpoint at {ck.path}.")
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(ck.tensors[n].file, []).append(n)
    out = {}
    for f, ns in by_file.items():
        with safe_open(f, framework="pt", device=device) as sf:
            for n in ns:
                out[n] = sf.get_tensor(n)
    return {n: out[n] for n in names}
