"""The configuration space: every TP x PP x weight/KV format x pruning a model can run, and which of
them the engine implements. See docs/estimator.md#configurations."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from iserve.messages import KV_QUANTS, PRUNINGS, WEIGHT_QUANTS, ArchSpec, Configuration, ExcludedConfig, ProfileVariant

_KNOB_WORDS: dict[str, str | dict[str, str]] = {
    "weight_quant": "{} weight quantization",
    "kv_quant": "{} KV-cache quantization",
    "pruning": {"2:4": "2:4 sparsity pruning", "structured": "structured pruning"},
    "tp": "tensor parallelism of degree {}",
    "pp": "pipeline parallelism of degree {}",
}


def enumerate_configurations(arch: ArchSpec, max_gpus: int) -> list[Configuration]:
    """Every configuration of ``arch`` on up to ``max_gpus`` GPUs, in a stable order (TP, PP, weight
    quantization, KV quantization, pruning)."""
    if max_gpus < 1:
        raise ValueError(f"max_gpus must be at least 1, not {max_gpus}.")
    tps = []
    tp = 1
    while tp <= max_gpus:
        if arch.num_attention_heads % tp == 0 and arch.num_kv_heads % tp == 0:
            tps.append(tp)
        tp *= 2
    out = []
    for tp in tps:
        for pp in range(1, min(max_gpus, arch.num_layers) + 1):
            if tp * pp > max_gpus:
                break
            for wq in WEIGHT_QUANTS:
                for kv in KV_QUANTS:
                    for pruning in PRUNINGS:
                        out.append(Configuration(tp=tp, pp=pp, weight_quant=wq, kv_quant=kv, pruning=pruning))
    return out


def variant_of(config: Configuration) -> ProfileVariant:
    """The profiling variant that gives ``config`` its measurements: the configuration less PP."""
    return ProfileVariant(
        weight_quant=config.weight_quant, kv_quant=config.kv_quant, pruning=config.pruning, tp=config.tp
    )


def replace_variant(v: ProfileVariant, **changes: Any) -> ProfileVariant:
    return msgspec.structs.replace(v, **changes)


def measurement_variants(configs: Iterable[Configuration], *, max_tp: int | None = None) -> list[ProfileVariant]:
    """The distinct variants to profile for ``configs``, in first-seen order. Fingerprints always run
    at PP=1 (the paper reuses PP=1 latency for every PP, and memory per stage follows from layers).
    Pass the supported configurations (:func:`split_supported`) so nothing is profiled in vain.
    With ``max_tp``, a TP variant above it is replaced by its TP=1 twin (its estimate then comes from
    the communication model, :func:`~iserve.fingerprint.estimator.fit.derive_tp_fit`)."""
    seen: dict[ProfileVariant, None] = {}
    for c in configs:
        v = variant_of(c)
        if max_tp is not None and v.tp > max_tp:
            v = replace_variant(v, tp=1)
        seen.setdefault(v, None)
    return list(seen)


def replay_depth(arch: ArchSpec, setting: int) -> int:
    """The depth the 2-layer fingerprint is replayed to when profiling (``ProfileJob.replay_depth``):
    ``setting`` -1 means the model's layer count, 0 none; a depth of 2 or less adds nothing."""
    if setting < -1:
        raise ValueError(f"replay depth must be -1 (the model's layers), 0 (none) or a layer count, not {setting}")
    depth = arch.num_layers if setting == -1 else setting
    return depth if depth > 2 else 0


def _join_or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def split_supported(
    configs: Iterable[Configuration],
    capabilities: dict[str, Any],
    *,
    arch: ArchSpec | None = None,
) -> tuple[list[Configuration], list[ExcludedConfig]]:
    """Split ``configs`` into those the engine can run and the rest, each with its reason.

    ``capabilities`` is the engine's ``CAPABILITIES`` dict: lists under ``tp``, ``pp``,
    ``weight_quant``, ``kv_quant``, ``pruning`` and ``families``; a key that is absent puts no limit
    on its knob. ``capabilities["by_family"][family]`` may narrow the lists for one architecture
    family (e.g. fp16 only for a family whose layers lack quantized kernels).
    ``capabilities["engine"]`` names the engine in the reasons (default "torch").
    With ``arch``, its family is checked against ``families`` and structured-pruning configurations
    whose TP degree does not divide the pruned head counts are excluded too.
    """
    engine = str(capabilities.get("engine", "torch"))
    supported: list[Configuration] = []
    excluded: list[ExcludedConfig] = []
    families = capabilities.get("families")
    family_ok = arch is None or families is None or arch.family in families
    limits = dict(capabilities)
    if arch is not None:
        limits.update((capabilities.get("by_family") or {}).get(arch.family, {}))
    for c in configs:
        missing: list[str] = []
        if not family_ok:
            assert arch is not None
            missing.append(f"the {arch.family} architecture family")
        for knob in ("tp", "pp", "weight_quant", "kv_quant", "pruning"):
            allowed = limits.get(knob)
            value = getattr(c, knob)
            if allowed is None or value in allowed:
                continue
            words = _KNOB_WORDS[knob]
            missing.append(words[value] if isinstance(words, dict) else words.format(value))
        if missing:
            by_family = capabilities.get("by_family") or {}
            fam = (
                f" for the {arch.family} family" if arch is not None and family_ok and arch.family in by_family else ""
            )
            reason = f"the {engine} engine does not implement {_join_or(missing)}{fam} yet"
            excluded.append(ExcludedConfig(config=c, reason=reason))
            continue
        problem = arch_problem(arch, c) if arch is not None else None
        if problem:
            excluded.append(ExcludedConfig(config=c, reason=problem))
            continue
        supported.append(c)
    return supported, excluded


def arch_problem(arch: ArchSpec, config: Configuration) -> str | None:
    """Why ``arch`` cannot take ``config`` at all (whatever the engine), or None."""
    if config.tp < 1 or config.pp < 1:
        return f"TP and PP must be at least 1 (got TP={config.tp}, PP={config.pp})"
    if config.pp > arch.num_layers:
        return f"PP={config.pp} exceeds the model's {arch.num_layers} hidden layers"
    shaped = pruned_arch(arch, config.pruning)
    for what, count in (("attention heads", shaped.num_attention_heads), ("KV heads", shaped.num_kv_heads)):
        if count % config.tp:
            pruned = f" after {config.pruning} pruning" if config.pruning == "structured" else ""
            return f"TP={config.tp} does not divide the model's {count} {what}{pruned}"
    return None


def pruned_arch(arch: ArchSpec, pruning: str) -> ArchSpec:
    """The shapes a layer has after ``pruning`` ("structured" shrinks heads and FFN channels; 2:4 and
    none keep the dense shapes). See docs/estimator.md#structured-pruning for the rule."""
    if pruning != "structured":
        return arch
    kv = arch.num_kv_heads
    group = arch.num_attention_heads // kv
    if kv >= 4:
        kept_kv, kept_group = kv - kv // 4, group
    else:
        kept_kv, kept_group = kv, group - group // 4
    f = arch.intermediate_size
    return msgspec.structs.replace(
        arch,
        num_kv_heads=kept_kv,
        num_attention_heads=kept_kv * kept_group,
        intermediate_size=f - f // 4,
    )


def profiling_lengths(prompts: list[int], outputs: list[int], context: int) -> tuple[list[int], list[int]]:
    """The prompt and output lengths to measure a model of ``context`` tokens at: the configured ones
    that fit (prompt + longest output within the context), or, when fewer than three prompt lengths
    fit (a 512- or 1024-token model under the defaults), three spread over the room left, so that
    every model registers with the default settings."""
    outs = [o for o in outputs if o <= context // 4] or [max(1, context // 8)]
    room = context - max(outs)
    fit = [p for p in prompts if p <= room]
    if len(fit) < 3:
        fit = sorted({max(1, room // 8), max(2, room // 2), room})
    return fit, outs
