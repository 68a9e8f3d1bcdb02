"""Choosing the next token from logits: greedy, or temperature + top-p sampling."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token as a ``[1]`` long tensor: argmax when ``temperature == 0``, else a draw from
    the temperature-scaled distribution restricted to the smallest set of tokens whose
    probability reaches ``top_p``."""
    if temperature == 0.0:
        return torch.argmax(logits).view(1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator)
    # A stable sort: ties (common in half-precision logits) must keep one order for seeds to repeat.
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    # Drop a token when the tokens before it already reach top_p; the first token always stays.
    drop = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return order[torch.multinomial(sorted_probs, 1, generator=generator)]
