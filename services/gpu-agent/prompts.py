"""A request's prompt as token ids, as both request loops (``worker``, ``batch_server``) take it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from iserve import errors
from iserve.messages import InferRequest

if TYPE_CHECKING:
    from .engine.tokenizer import Tokenizer


def fit_prompt(ids: list[int], n: int, *, keep_first: bool) -> list[int]:
    """Pad (by repeating the prompt's own tokens) or truncate ``ids`` to exactly ``n`` tokens, as the
    trace replay asks for ``ContextTokens``. The first token (BOS) stays first when ``keep_first``."""
    if n <= 0 or len(ids) == n:
        return list(ids)
    if len(ids) > n:
        return list(ids[:n])
    head = ids[:1] if keep_first and ids else []
    body = ids[len(head) :] or ids or [0]
    out = list(head)
    while len(out) < n:
        out.extend(body[: n - len(out)])
    return out


def prompt_ids(tok: Tokenizer, r: InferRequest, context_tokens: int) -> list[int]:
    """``r.prompt`` tokenized (with BOS), fitted to ``r.prompt_tokens`` when set. Raises
    ``PromptTooLong`` when it and ``r.max_tokens`` exceed ``context_tokens``."""
    ids = tok.encode(r.prompt, add_bos=True)
    ids = fit_prompt(ids, r.prompt_tokens, keep_first=tok.bos_id is not None)
    if len(ids) + r.max_tokens > context_tokens:
        raise errors.PromptTooLong(
            f"prompt of {len(ids)} tokens plus max_tokens {r.max_tokens} exceeds this deployment's context of "
            f"{context_tokens} tokens; shorten the prompt or ask for fewer tokens.",
            request_id=r.request_id,
        )
    return ids
