"""Argument checks of the engine's public calls: token ids, positions, generation requests."""

from __future__ import annotations

from collections.abc import Sequence

from iserve.errors import BadRequest, PromptTooLong


def check_ids(ids: Sequence[int], vocab: int) -> None:
    """``ids`` is a non-empty prompt of token ids inside a vocabulary of ``vocab`` ids."""
    if not ids:
        raise BadRequest("the prompt has no tokens; send at least one.")
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab:
        raise BadRequest(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary of {vocab} ids.")


def check_position(pos: int, context_tokens: int) -> None:
    if not 0 <= pos < context_tokens:
        raise BadRequest(f"position {pos} is outside the context of {context_tokens} tokens.")


def check_request(
    ids: Sequence[int], max_tokens: int, temperature: float, top_p: float, vocab: int, context_tokens: int
) -> None:
    """A generation request fits the vocabulary and the context, with valid sampling settings."""
    check_ids(ids, vocab)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive integer, not {max_tokens!r}.")
    if not temperature >= 0.0:
        raise BadRequest(f"temperature must be 0 (greedy) or positive, not {temperature!r}.")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], not {top_p!r}.")
    if len(ids) + max_tokens > context_tokens:
        raise PromptTooLong(
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, {len(ids) + max_tokens} in all, but "
            f"this deployment holds {context_tokens} tokens of context; shorten the prompt, lower max_tokens, "
            "or deploy with a larger context_tokens."
        )
