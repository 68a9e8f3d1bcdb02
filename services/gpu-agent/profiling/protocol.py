"""What a measurement runs and how often: the ``Protocol``, the one of a ``ProfileJob``, variant keys.

See docs/profiling.md#protocol-protocol.
"""

from __future__ import annotations

from dataclasses import dataclass

from iserve.errors import BadRequest
from iserve.messages import ProfileJob

MIN_GPU_WARMUP_S = 1.0  # default GPU warm-up before the first timed run of a job
ENGINE_WARMUP_S = 0.2  # least busy time per loaded engine (after a load the GPU has been idle)
DEVICE_REPEATS = 3  # at most this many samples of each (each is already a mean of a batch)


@dataclass(frozen=True)
class Protocol:
    """What to run and how often (see docs/profiling.md#protocol-protocol)."""

    prompt_lengths: tuple[int, ...]
    output_lengths: tuple[int, ...]
    repeats: int = 3
    warmup: int = 1
    device_repeats: int = -1  # samples of the device pass; -1: ``repeats``, at most ``DEVICE_REPEATS``
    context_tokens: int = 2048
    serving_path: bool = True  # hand every token to another thread's event loop, as the serving worker does
    replay_depth: int = 0  # > 0: measure_models also times its deepest model replayed to this many layers
    replay_distinct: bool = False  # ... with tensors of its own for every replayed layer, where they fit
    batch_sizes: tuple[int, ...] = ()  # also time the batching engine's decode step at these (``batched``)

    def __post_init__(self) -> None:
        if (
            not self.prompt_lengths
            or not self.output_lengths
            or min(self.prompt_lengths) < 1
            or min(self.output_lengths) < 1
        ):
            raise BadRequest("prompt_lengths and output_lengths must be non-empty lists of positive token counts.")
        if max(self.output_lengths) < 2:
            raise BadRequest("at least one output length must be 2 or more, or no decode step is measured.")
        if self.device_repeats < 0:
            object.__setattr__(self, "device_repeats", min(self.repeats, DEVICE_REPEATS))
        if self.replay_depth < 0:
            raise BadRequest(f"replay_depth must be 0 (no replayed run) or a layer count, not {self.replay_depth}.")
        if any(b < 1 for b in self.batch_sizes):
            raise BadRequest(f"batch_sizes must be positive sequence counts, not {list(self.batch_sizes)}.")
        if self.repeats < 1 or self.warmup < 0:
            raise BadRequest(f"repeats must be at least 1 and warmup at least 0, not {self.repeats} and {self.warmup}.")
        if max(self.prompt_lengths) + max(self.output_lengths) > self.context_tokens:
            raise BadRequest(
                f"the longest prompt ({max(self.prompt_lengths)}) plus the longest output "
                f"({max(self.output_lengths)}) exceeds "
                f"context_tokens {self.context_tokens}; raise context_tokens or shorten the lengths."
            )

    def decode_runs(self) -> list[tuple[int, int]]:
        """``(prompt_tokens, output_tokens)`` of each decode run: the output lengths in ascending order,
        paired with the prompt lengths from the longest down (cycling), so that the steps cover both
        short and long key lengths."""
        prompts = sorted(set(self.prompt_lengths), reverse=True)
        outputs = sorted(set(self.output_lengths))
        return [(prompts[i % len(prompts)], o) for i, o in enumerate(outputs)]


def protocol_of_job(job: ProfileJob) -> Protocol:
    """The job's protocol. The device pass runs only without a deep run: the deep run's wall times
    are measured at the model's depth (see docs/profiling.md#device-time-what-the-gpu-needs)."""
    return Protocol(
        prompt_lengths=tuple(job.prompt_lengths),
        output_lengths=tuple(job.output_lengths),
        repeats=job.repeats,
        warmup=job.warmup,
        device_repeats=min(job.repeats, DEVICE_REPEATS) if job.device_timing and not job.replay_depth else 0,
        context_tokens=job.context_tokens,
        replay_depth=job.replay_depth,
        replay_distinct=job.replay_distinct,
        batch_sizes=tuple(sorted(set(job.batch_sizes))),
    )
