"""The quality policy of an intent, as pure functions (docs/quality.md): which knobs of a configuration
are lossy, what their measured cost is, and which configurations a :class:`QualityPolicy` admits.

A configuration is lossless when its weights are 16-bit (the checkpoint's fp16 or bf16), unpruned, with
a 16-bit KV cache. A lossy one is admitted by ``any`` always, by ``default`` and ``budget`` only when
its quality was measured (``QualityReport``) and is within the budget, by ``lossless`` never.
"""

from __future__ import annotations

import math
from typing import Sequence

from iserve.errors import BadRequest
from iserve.messages import (
    QUALITY_MODES,
    ConfigEstimate,
    Configuration,
    QualityPolicy,
    QualityReport,
    Rejection,
    VariantQuality,
)

# The default policy's budget: conservative, so that weight formats that keep a model's next-token
# choice almost everywhere pass and ones that change it noticeably do not (docs/quality.md).
DEFAULT_MAX_KL = 0.01  # nats per token
DEFAULT_MIN_TOP1 = 0.95

ANY = QualityPolicy(mode="any")
LOSSLESS = QualityPolicy(mode="lossless")
DEFAULT = QualityPolicy()

_FLAG_HELP = "use lossless, any, default, max-kl=X, min-top1=Y or max-kl=X,min-top1=Y (e.g. max-kl=0.05)"


def parse_policy(text: str) -> QualityPolicy:
    """``--quality``'s value as a policy: ``default``, ``lossless``, ``any``, or a budget of
    ``max-kl=X`` (nats per token, >= 0) and/or ``min-top1=Y`` (a fraction in [0, 1]), comma-separated.
    Raises :class:`BadRequest` with what to write instead."""
    t = text.strip().lower()
    if t in ("", "default"):
        return DEFAULT
    if t in ("lossless", "any"):
        return QualityPolicy(mode=t)  # type: ignore[arg-type]
    max_kl: float | None = None
    min_top1: float | None = None
    for part in t.split(","):
        name, sep, raw = part.strip().partition("=")
        if not sep or name not in ("max-kl", "min-top1"):
            raise BadRequest(f"--quality {text!r} is not a quality policy; {_FLAG_HELP}.")
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"--quality {name}={raw!r} needs a number; {_FLAG_HELP}.") from None
        if not math.isfinite(value) or value < 0 or (name == "min-top1" and value > 1):
            what = "a fraction between 0 and 1, e.g. 0.95" if name == "min-top1" else "0 or more nats per token"
            raise BadRequest(f"--quality {name}={raw} is out of range; give {what}.")
        if name == "max-kl":
            max_kl = value
        else:
            min_top1 = value
    return QualityPolicy(mode="budget", max_kl=max_kl, min_top1=min_top1)


def validate_policy(policy: QualityPolicy) -> None:
    """Raise :class:`BadRequest` for a policy the wire's types allow but that means nothing."""
    if policy.mode not in QUALITY_MODES:
        raise BadRequest(f"unknown quality mode {policy.mode!r}; use one of {', '.join(QUALITY_MODES)}.")
    if policy.mode == "budget" and policy.max_kl is None and policy.min_top1 is None:
        raise BadRequest("a quality budget needs max_kl and/or min_top1; e.g. --quality max-kl=0.05.")


def describe_policy(policy: QualityPolicy) -> str:
    """The policy as ``--quality`` would spell it."""
    if policy.mode != "budget":
        return policy.mode
    parts = []
    if policy.max_kl is not None:
        parts.append(f"max-kl={policy.max_kl:g}")
    if policy.min_top1 is not None:
        parts.append(f"min-top1={policy.min_top1:g}")
    return ",".join(parts)


def lossy_knobs(config: Configuration) -> list[str]:
    """The knobs of ``config`` that change the model's outputs, in words; empty when lossless."""
    out = []
    if config.weight_quant != "fp16":
        out.append(f"{config.weight_quant} weights")
    if config.kv_quant != "fp16":
        out.append(f"{config.kv_quant} KV cache")
    if config.pruning != "none":
        out.append(f"{config.pruning} pruning")
    return out


def is_lossless(config: Configuration) -> bool:
    return not lossy_knobs(config)


def cost_of(config: Configuration, report: QualityReport | None) -> VariantQuality | None:
    """The measured quality of ``config``'s variant (None: lossless, or not measured)."""
    if report is None or report.error or is_lossless(config):
        return None
    for v in report.variants:
        if (v.weight_quant, v.kv_quant, v.pruning) == (config.weight_quant, config.kv_quant, config.pruning):
            return v
    return None


def fmt_cost(q: VariantQuality) -> str:
    ppl = f", perplexity x{q.ppl_ratio:.3f}" if q.ppl_ratio > 0 else ""
    return f"KL {q.kl:.4g} nats/token, top-1 agreement {q.top1:.1%}{ppl}"


def budget_of(policy: QualityPolicy) -> tuple[float | None, float | None]:
    """(max KL, min top-1) of a policy that has a budget (``default`` has the conservative one)."""
    if policy.mode == "default":
        return DEFAULT_MAX_KL, DEFAULT_MIN_TOP1
    return policy.max_kl, policy.min_top1


def _budget_text(policy: QualityPolicy) -> str:
    max_kl, min_top1 = budget_of(policy)
    parts = ([f"KL <= {max_kl:g}"] if max_kl is not None else []) + (
        [f"top-1 >= {min_top1:.0%}"] if min_top1 is not None else []
    )
    return f"the {'default ' if policy.mode == 'default' else ''}quality budget ({', '.join(parts)})"


def exclusion(config: Configuration, report: QualityReport | None, policy: QualityPolicy) -> str:
    """Why ``policy`` rules ``config`` out, one clause starting with "quality:"; empty when admitted."""
    knobs = lossy_knobs(config)
    if not knobs or policy.mode == "any":
        return ""
    lossy = " and ".join(knobs)
    one = len(knobs) == 1
    if policy.mode == "lossless":
        changes = "changes" if one else "change"
        return f"quality: {lossy} {changes} the model's outputs and --quality lossless admits no lossy knob"
    q = cost_of(config, report)
    if q is None:
        why = f" ({report.error})" if report is not None and report.error else ""
        return (
            f"quality: {lossy} {'is' if one else 'are'} lossy and {'its' if one else 'their'} quality cost was not "
            f"measured{why}, so only --quality any admits {'it' if one else 'them'}"
        )
    max_kl, min_top1 = budget_of(policy)
    if (max_kl is not None and q.kl > max_kl) or (min_top1 is not None and q.top1 < min_top1):
        return (
            f"quality: {lossy} measured {fmt_cost(q)}, over {_budget_text(policy)}; pass a looser budget "
            "(--quality max-kl=X,min-top1=Y) or --quality any"
        )
    return ""


def admit(
    estimates: Sequence[ConfigEstimate], report: QualityReport | None, policy: QualityPolicy
) -> tuple[list[ConfigEstimate], list[Rejection]]:
    """The estimates ``policy`` admits (in their order) and a rejection for each one it rules out."""
    validate_policy(policy)
    kept: list[ConfigEstimate] = []
    out: list[Rejection] = []
    for e in estimates:
        why = exclusion(e.config, report, policy)
        if why:
            out.append(Rejection(config=e.config.key(), reason=why))
        else:
            kept.append(e)
    return kept, out


def choice_note(config: Configuration, report: QualityReport | None) -> tuple[str, VariantQuality | None]:
    """One sentence on the chosen configuration's quality, and its measured cost (None: lossless or
    not measured)."""
    knobs = lossy_knobs(config)
    if not knobs:
        return "lossless: 16-bit weights, unpruned, 16-bit KV cache", None
    lossy = " and ".join(knobs)
    q = cost_of(config, report)
    if q is None:
        return f"lossy ({lossy}); its quality cost was not measured (admitted by --quality any)", None
    method = f" ({report.method} method)" if report is not None else ""
    return f"lossy ({lossy}): measured {fmt_cost(q)}{method}", q


def short_cost(config: Configuration, report: QualityReport | None) -> str:
    """A configuration's quality cost in a few words, for tables: "lossless", "KL x, top-1 y%" or
    "not measured"."""
    if is_lossless(config):
        return "lossless"
    q = cost_of(config, report)
    return "not measured" if q is None else f"KL {q.kl:.3g}, top-1 {q.top1:.1%}"


def short_of(cost: VariantQuality | None, config: Configuration) -> str:
    """:func:`short_cost` from a deploy reply's ``quality_cost``."""
    if is_lossless(config):
        return "lossless"
    return "not measured" if cost is None else f"KL {cost.kl:.3g}, top-1 {cost.top1:.1%}"
