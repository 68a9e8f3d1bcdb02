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
    """``r.prompt`` tokenized (with BOS), or ``r.messages`` rendered by the model's chat template
    (its special tokens in the text, none added), fitted to ``r.prompt_tokens`` when set. Raises
    ``BadRequest`` for a chat to a model without a chat template, ``PromptTooLong`` when the prompt
    and ``r.max_tokens`` exceed ``context_tokens``."""
    if r.messages:
        if tok.chat_template is None:
            raise errors.BadRequest(
                "this model has no chat template (chat_template.jinja, or chat_template in tokenizer_config.json); "
                "send a plain prompt (/v1/completions) or add the template to the checkpoint.",
                request_id=r.request_id,
            )
        from .engine.chat import render_chat

        text = render_chat(
            tok.chat_template,
            [{"role": m.role, "content": m.content} for m in r.messages],
            bos_token=tok.token_text(tok.bos_id),
            eos_token=tok.token_text(tok.eos_id),
        )
        ids = tok.encode(text, add_bos=False)
    else:
        ids = tok.encode(r.prompt, add_bos=True)
    ids = fit_prompt(ids, r.prompt_tokens, keep_first=tok.bos_id is not None)
    if len(ids) + r.max_tokens > context_tokens:
        raise errors.PromptTooLong(
            f"prompt of {len(ids)} tokens plus max_tokens {r.max_tokens} exceeds this deployment's context of "
            f"{context_tokens} tokens; shorten the prompt or ask for fewer tokens.",
            request_id=r.request_id,
        )
    return ids
