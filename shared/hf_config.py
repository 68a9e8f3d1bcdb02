"""How config.json describes a model, family by family: the fields that differ between Llama-style,
Falcon, GPT-J and GPT-NeoX configs, the RoPE settings wherever a config keeps them (``rope_parameters``
of transformers >= 5, or the older top-level fields), and the end-of-sequence ids
(``checkpoint.arch_from_config`` builds the ``ArchSpec`` from these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UnsupportedModel


def need_int(cfg: dict[str, Any], key: str, *alts: str) -> int:
    for k in (key, *alts):
        v = cfg.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config.json field {k!r} must be a positive integer, not {v!r}.")
            return v
    raise CheckpointError(f"config.json lacks {key!r}; it is needed to know the model's shape.")


def _opt_int(cfg: dict[str, Any], *keys: str) -> int | None:
    for k in keys:
        v = cfg.get(k)
        if v is not None:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"config.json field {k!r} must be a positive integer, not {v!r}.")
            return v
    return None


def _activation(name: Any, model_type: str) -> str:
    """Normalize config.json's activation name: "silu", "gelu" (exact) or "gelu_tanh"."""
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
    }
    if name not in table:
        raise UnsupportedModel(
            f"activation {name!r} of model_type {model_type!r} is not supported; supported: {', '.join(sorted(table))}."
        )
    return table[name]


def eos_ids(cfg: dict[str, Any], model_dir: Path) -> list[int]:
    """Every end-of-sequence id: config.json's ``eos_token_id`` (an id or a list) and
    generation_config.json's (what ``transformers``' ``generate`` stops on), in that order."""
    out: list[int] = []
    sources = [cfg.get("eos_token_id")]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):
            raise CheckpointError(f"{gen} is not valid JSON; fix or remove it.") from None
    for src in sources:
        for x in src if isinstance(src, list) else [src]:
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x not in out:
                out.append(x)
    return out


def _eos(cfg: dict[str, Any], default: int | None) -> int | None:
    eos = cfg.get("eos_token_id", default)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos


# rope_theta when a config names none, as transformers defaults it per model type.
DEFAULT_ROPE_THETA = {"mixtral": 1_000_000.0}


def rope_settings(cfg: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None, float | None]:
    """``(rope_theta, rope scaling or None, partial_rotary_factor)`` of a config.json, wherever it keeps
    them: ``rope_parameters`` (what transformers >= 5 writes) or the older top-level ``rope_theta``,
    ``rope_scaling`` and ``partial_rotary_factor``. None where the config names nothing."""
    params = cfg.get("rope_parameters")
    theta = scaling = None
    partial = cfg.get("partial_rotary_factor")
    if isinstance(params, dict):
        if params and all(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModel(
                f"per-layer-type rope_parameters ({', '.join(params)}) are not supported by the torch engine."
            )
        theta = params.get("rope_theta")
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        partial = params.get("partial_rotary_factor", partial)
    if theta is None:
        theta = cfg.get("rope_theta")
    if scaling is None:
        scaling = cfg.get("rope_scaling") or None
        if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
    return (float(theta) if theta is not None else None), scaling, (float(partial) if partial is not None else None)


def family_fields(cfg: dict[str, Any], family: str, model_type: str) -> dict[str, Any]:
    """The ArchSpec fields that differ by family, read from config.json."""
    theta, _, partial = rope_settings(cfg)
    if family in ("llama", "mixtral"):
        if partial is not None and partial != 1.0:
            raise UnsupportedModel(
                f"partial_rotary_factor {partial} is not supported for the {model_type} family by the torch engine."
            )
        hidden = need_int(cfg, "hidden_size")
        heads = need_int(cfg, "num_attention_heads")
        return dict(
            num_layers=need_int(cfg, "num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            intermediate_size=need_int(cfg, "intermediate_size"),
            max_position=int(cfg.get("max_position_embeddings") or 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta or DEFAULT_ROPE_THETA.get(model_type, 10000.0),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            activation=_activation(cfg.get("hidden_act", "silu"), model_type),
            bos_token_id=cfg.get("bos_token_id", 1),
            eos_token_id=_eos(cfg, 2),
        )
    if family == "falcon":
        if cfg.get("alibi"):
            raise UnsupportedModel(
                "Falcon checkpoints with ALiBi position biases (alibi: true) are not supported; "
                "iServe runs rotary Falcon models."
            )
        if cfg.get("apply_residual_connection_post_layernorm"):
            raise UnsupportedModel("Falcon with apply_residual_connection_post_layernorm=true is not supported.")
        hidden = need_int(cfg, "hidden_size")
        heads = need_int(cfg, "num_attention_heads", "n_head")
        new_arch = bool(cfg.get("new_decoder_architecture", False))
        if new_arch:
            kv = _opt_int(cfg, "num_kv_heads", "n_head_kv") or heads
        elif cfg.get("multi_query", True):
            kv = 1
        else:
            kv = heads
        norms = (
            int(cfg.get("num_ln_in_parallel_attn") or 2) if new_arch else (1 if cfg.get("parallel_attn", True) else 2)
        )
        bias = bool(cfg.get("bias", False))
        return dict(
            num_layers=need_int(cfg, "num_hidden_layers", "n_layer"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=kv,
            intermediate_size=_opt_int(cfg, "ffn_hidden_size") or 4 * hidden,
            max_position=int(cfg.get("max_position_embeddings") or 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            rope_theta=theta or 10000.0,
            attention_bias=bias,
            norm_type="layer",
            activation=_activation(cfg.get("activation", "gelu"), model_type),
            gated_mlp=False,
            parallel_residual=new_arch or bool(cfg.get("parallel_attn", True)),
            layer_norms=norms,
            qkv_layout="grouped" if (new_arch or kv == 1) else "per_head",
            attention_out_bias=bias,
            mlp_bias=bias,
            bos_token_id=cfg.get("bos_token_id", 11),
            eos_token_id=_eos(cfg, 11),
        )
    if family == "gptj":
        hidden = need_int(cfg, "n_embd", "hidden_size")
        heads = need_int(cfg, "n_head", "num_attention_heads")
        head_dim = hidden // heads
        return dict(
            num_layers=need_int(cfg, "n_layer", "num_hidden_layers"),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=heads,
            intermediate_size=_opt_int(cfg, "n_inner") or 4 * hidden,
            max_position=int(cfg.get("n_positions") or cfg.get("max_position_embeddings") or 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            rope_theta=10000.0,
            norm_type="layer",
            activation=_activation(cfg.get("activation_function", "gelu_new"), model_type),
            gated_mlp=False,
            parallel_residual=True,
            layer_norms=1,
            rotary_dim=int(cfg.get("rotary_dim") or head_dim),
            rotary_interleaved=True,
            mlp_bias=True,
            lm_head_bias=True,
            bos_token_id=cfg.get("bos_token_id", 50256),
            eos_token_id=_eos(cfg, 50256),
        )
    # gpt_neox
    hidden = need_int(cfg, "hidden_size")
    heads = need_int(cfg, "num_attention_heads")
    head_dim = hidden // heads
    pct = float(cfg.get("rotary_pct") or partial or 1.0)
    if not 0.0 < pct <= 1.0:
        raise CheckpointError(f"config.json field 'rotary_pct' must be in (0, 1], not {pct!r}.")
    bias = bool(cfg.get("attention_bias", True))
    return dict(
        num_layers=need_int(cfg, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=heads,
        intermediate_size=need_int(cfg, "intermediate_size"),
        max_position=int(cfg.get("max_position_embeddings") or 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rms_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rotary_emb_base") or theta or 10000.0),
        attention_bias=bias,
        norm_type="layer",
        activation=_activation(cfg.get("hidden_act", "gelu"), model_type),
        gated_mlp=False,
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        layer_norms=2,
        qkv_layout="per_head",
        rotary_dim=int(head_dim * pct),
        attention_out_bias=bias,
        mlp_bias=True,
        bos_token_id=cfg.get("bos_token_id", 0),
        eos_token_id=_eos(cfg, 0),
    )
