"""``InferenceEngine``: what the worker asks of an engine, the torch ``Engine`` or ``trtllm.TrtLlmEngine``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .runner import GenerationResult
    from .tokenizer import Tokenizer


class InferenceEngine(Protocol):
    """A loaded model that generates for one request at a time."""

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def context_tokens(self) -> int: ...

    @property
    def graphs_captured(self) -> list[bool]:
        """Per stage: whether its decode step replays a CUDA graph."""
        ...

    @property
    def prefill_graph_tokens(self) -> int:
        """The longest prompt whose prefill replays CUDA graphs (0: none)."""
        ...

    def kernels(self) -> dict[str, int]:
        """How many projections run on each kernel."""
        ...

    def memory_bytes(self) -> list[int]:
        """Memory held per stage (or per GPU)."""
        ...

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        on_token: Callable[[int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_tokens`` tokens after ``prompt_ids``, streaming each to ``on_token``."""
        ...

    def close(self) -> None:
        """Release the model (on a tensor-parallel leader, the other ranks too)."""
        ...
