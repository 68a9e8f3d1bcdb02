"""The OpenAI request bodies the gateway accepts, validated on decode (msgspec). Fields the gateway
does not support are refused by their constraints (``n`` > 1) or ignored when OpenAI's clients send
them by default (``user``, ``logprobs: null``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MaxTokens = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
OneChoice = Annotated[int, Meta(ge=1, le=1)]  # n > 1 is not served
Stop = str | Annotated[list[str], Meta(max_length=4)] | None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class Sampling(msgspec.Struct, kw_only=True):
    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: OneChoice = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: Stop = None
    user: str | None = None
    ignore_eos: bool = False  # an extension vLLM also has: generate exactly max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class CompletionRequest(Sampling, kw_only=True):
    prompt: str | Annotated[list[str], Meta(min_length=1, max_length=1)]
    max_tokens: MaxTokens = 16
    echo: bool = False
    logprobs: None = None

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(msgspec.Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampling, kw_only=True):
    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: Literal[False] | None = None

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def error_body(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape; ``code`` is iServe's error code."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
