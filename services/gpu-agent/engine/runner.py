"""``Engine``: a loaded model, split into pipeline stages, that generates tokens for one request at a time.

Typical use (the worker process)::

    engine = Engine.load("/models/llama-2-7b", [("cuda:0", 0, 16), ("cuda:1", 16, 16)], context_tokens=2048)
    ids = engine.tokenizer.encode("Hello")
    result = engine.generate(ids, max_tokens=64, on_token=send_chunk, should_stop=cancelled)

``generate`` runs the prompt through every stage (prefill), then one decode step per further token,
calling ``on_token`` as soon as each token is known so that it can be streamed. Timing: on a single
CUDA device each phase is bracketed by CUDA events; otherwise (CPU, or stages spread over several
devices, where one event pair cannot span devices) by ``time.perf_counter`` after a device sync. The
token id is read back to the host every step anyway, so both measure what a client sees.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from iserve.checkpoint import Checkpoint, scan_checkpoint
from iserve.errors import BadRequest, PromptTooLong, UnsupportedModel
from iserve.messages import ArchSpec

from .model import Stage
from .tokenizer import Tokenizer, load_tokenizer

_CUDA_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# Attention kernels the engine lets scaled_dot_product_attention pick. cuDNN's is left out: it builds
# a new execution plan for every new key length (about a millisecond per layer and decode step, on
# an H200 with torch 2.11) and was seen to give run-to-run differences.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def _compute() -> Iterator[None]:
    """Inference mode with the engine's attention kernels; entered once per public call."""
    with torch.inference_mode(), sdpa_kernel(_SDPA_BACKENDS):
        yield
_DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GenerationResult:
    """What ``Engine.generate`` produced; times in milliseconds."""

    tokens: list[int]
    finish_reason: str  # "stop" (eos), "length" (max_tokens reached) or "cancelled"
    ttft_ms: float  # prefill + choosing the first token
    step_ms: list[float] = field(default_factory=list)  # each further token's decode step
    prompt_tokens: int = 0
    timer: str = "perf_counter"  # or "cuda_events"

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tpot_ms(self) -> float:
        """Mean time per output token after the first (0.0 with fewer than two tokens)."""
        return sum(self.step_ms) / len(self.step_ms) if self.step_ms else 0.0


class _PerfTimer:
    """Wall-clock timer; syncs the CUDA devices in use so that queued work is counted."""

    name = "perf_counter"

    def __init__(self, cuda_devices: list[torch.device]):
        self._cuda = cuda_devices
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        for d in self._cuda:
            torch.cuda.synchronize(d)
        return (time.perf_counter() - self._t0) * 1000.0


class _CudaEventTimer:
    """CUDA events on the current stream of one device."""

    name = "cuda_events"

    def __init__(self, device: torch.device):
        self._device = device
        with torch.cuda.device(device):
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        with torch.cuda.device(self._device):
            self._start.record()

    def stop(self) -> float:
        with torch.cuda.device(self._device):
            self._end.record()
        self._end.synchronize()
        return float(self._start.elapsed_time(self._end))


def _parse_device(spec: str, index: int) -> torch.device:
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise BadRequest(f"stage {index} names device {spec!r}, which is not a torch device; use 'cpu' or 'cuda:N'.") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise BadRequest(f"stage {index} names device {spec!r}; the torch engine runs on 'cpu' and 'cuda:N' devices only.")
    if not torch.cuda.is_available():
        raise BadRequest(f"stage {index} asks for {spec!r} but this process sees no CUDA device; check CUDA_VISIBLE_DEVICES and the driver.")
    idx = torch.cuda.current_device() if dev.index is None else dev.index
    if idx >= torch.cuda.device_count():
        raise BadRequest(f"stage {index} asks for {spec!r} but this process sees only {torch.cuda.device_count()} CUDA device(s).")
    return torch.device("cuda", idx)


def _check_stages(stages: Sequence[tuple[str, int, int]], num_layers: int) -> None:
    if not stages:
        raise BadRequest("no pipeline stages were given; pass at least one (device, first_layer, num_layers).")
    end = 0
    for i, stage in enumerate(stages):
        try:
            _, first, n = stage
            first, n = int(first), int(n)
        except (TypeError, ValueError):
            raise BadRequest(f"stage {i} is {stage!r}; each stage is (device, first_layer, num_layers).") from None
        if n < 1:
            raise BadRequest(f"stage {i} holds {n} layers; every stage needs at least one layer.")
        if first != end:
            raise BadRequest(
                f"stage {i} starts at layer {first} but the stages before it end at layer {end}; stages must cover "
                f"layers 0..{num_layers - 1} once each, contiguously and in order."
            )
        end += n
    if end != num_layers:
        raise BadRequest(f"the stages hold {end} layers but the model has {num_layers}; make them cover every layer exactly once.")


class Engine:
    """A model loaded as a pipeline of ``Stage``s, generating for one request at a time (batch size 1).

    Create it with ``Engine.load``. Not thread-safe: run one ``generate`` at a time.
    """

    def __init__(self, checkpoint: Checkpoint, stages: list[Stage], tokenizer: Tokenizer, context_tokens: int, seed: int):
        self.checkpoint = checkpoint
        self.stages = stages
        self._tokenizer = tokenizer
        self._context_tokens = context_tokens
        first, last = stages[0].device, stages[-1].device
        self._token = torch.zeros(1, dtype=torch.long, device=first)  # decode input buffer
        self._generator = torch.Generator(device=last).manual_seed(seed)  # for requests without a seed
        cuda_devices = sorted({s.device for s in stages if s.device.type == "cuda"}, key=str)
        if len(cuda_devices) == 1 and all(s.device.type == "cuda" for s in stages):
            self._timer: _PerfTimer | _CudaEventTimer = _CudaEventTimer(cuda_devices[0])
        else:
            self._timer = _PerfTimer(cuda_devices)

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        stages: Sequence[tuple[str, int, int]],
        context_tokens: int,
        seed: int = 0,
        *,
        dtype: str | None = None,
    ) -> "Engine":
        """Load ``model_dir`` as the given stages ``(device, first_layer, num_layers)``.

        Each stage reads only its own tensors, straight onto its device. Computation dtype: on CUDA
        the checkpoint's ``torch_dtype`` (bfloat16 stays bfloat16, anything else runs as float16), on
        CPU float32; ``dtype`` ("float16", "bfloat16", "float32") overrides both. ``seed`` seeds the
        sampler of requests that bring no seed of their own.

        Raises ``CheckpointError`` for a bad checkpoint, ``UnsupportedModel`` for an architecture this
        engine cannot run, ``BadRequest`` for stages that do not cover every layer exactly once in
        order, unknown devices, or a context longer than the model's.
        """
        from . import CAPABILITIES

        ck = scan_checkpoint(model_dir)
        arch = ck.arch
        if arch.family not in CAPABILITIES["families"]:
            raise UnsupportedModel(
                f"the torch engine runs the {', '.join(CAPABILITIES['families'])} families, not {arch.family} "
                f"(model_type {arch.model_type!r})."
            )
        _check_stages(stages, arch.num_layers)
        if not isinstance(context_tokens, int) or context_tokens < 1:
            raise BadRequest(f"context_tokens must be a positive integer, not {context_tokens!r}.")
        if context_tokens > arch.max_position:
            raise BadRequest(
                f"context_tokens {context_tokens} exceeds the model's max_position_embeddings {arch.max_position}; "
                "deploy with a shorter context."
            )
        if dtype is not None and dtype not in _DTYPE_NAMES:
            raise BadRequest(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPE_NAMES)}.")
        devices = [_parse_device(s[0], i) for i, s in enumerate(stages)]
        tokenizer = load_tokenizer(model_dir, arch)
        built = []
        with torch.inference_mode():
            for dev, (_, first, n) in zip(devices, stages):
                if dtype is not None:
                    stage_dtype = _DTYPE_NAMES[dtype]
                elif dev.type == "cuda":
                    stage_dtype = _CUDA_DTYPES.get(arch.torch_dtype, torch.float16)
                else:
                    stage_dtype = torch.float32
                built.append(Stage(ck, dev, int(first), int(n), context_tokens=context_tokens, dtype=stage_dtype))
            return cls(ck, built, tokenizer, context_tokens, seed)

    def close(self) -> None:
        """Drop every weight and cache so that the memory can be reused (the engine is unusable after)."""
        self.stages = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- properties ------------------------------------------------------------------------------

    @property
    def arch(self) -> ArchSpec:
        return self.checkpoint.arch

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def devices(self) -> list[str]:
        """Each stage's device, e.g. ``["cuda:0", "cuda:1"]``."""
        return [str(s.device) for s in self.stages]

    @property
    def timer(self) -> str:
        """How generate times itself: "cuda_events" or "perf_counter"."""
        return self._timer.name

    def weight_bytes(self) -> int:
        """Bytes of weights held by all stages (in the computation dtype)."""
        return sum(s.weight_bytes for s in self.stages)

    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV caches of all stages."""
        return sum(s.cache_bytes for s in self.stages)

    def memory_bytes(self) -> list[int]:
        """Memory per stage. CUDA: ``torch.cuda.memory_allocated`` of its device (shared among the
        stages on that device in proportion to their accounted bytes); CPU: accounted bytes of the
        stage's weights, KV cache and buffers."""
        out = []
        for s in self.stages:
            if s.device.type != "cuda":
                out.append(s.accounted_bytes)
                continue
            same = [o.accounted_bytes for o in self.stages if o.device == s.device]
            allocated = torch.cuda.memory_allocated(s.device)
            out.append(int(allocated * s.accounted_bytes / max(sum(same), 1)))
        return out

    # -- model passes ----------------------------------------------------------------------------

    def _check_ids(self, ids: Sequence[int]) -> None:
        if not ids:
            raise BadRequest("the prompt has no tokens; send at least one.")
        vocab = self.arch.vocab_size
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab:
            raise BadRequest(f"token id {lo if lo < 0 else hi} is outside the model's vocabulary of {vocab} ids.")

    def prefill(self, ids: Sequence[int], *, all_positions: bool = False) -> torch.Tensor:
        """Run the prompt through every stage, filling the KV caches from position 0.

        Returns float32 logits on the last stage's device: ``[vocab]`` for the last position, or
        ``[len(ids), vocab]`` with ``all_positions``.
        """
        self._check_ids(ids)
        if len(ids) > self._context_tokens:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context holds {self._context_tokens}; shorten it.")
        with _compute():
            return self._prefill(ids, all_positions)

    def _prefill(self, ids: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        x = torch.tensor(list(ids), dtype=torch.long, device=self.stages[0].device)
        for stage in self.stages:
            x = stage.prefill(x, all_positions=all_positions)
        return x if all_positions else x[0]

    def _decode(self, pos: int) -> torch.Tensor:
        """One decode step for the token in ``self._token`` at position ``pos``; logits ``[vocab]``."""
        for stage in self.stages:
            stage.pos.fill_(pos)
        x = self._token
        for stage in self.stages:
            x = stage.decode(x, kv_len=pos + 1, masked=stage.needs_mask(pos, pos + 1))
        return x[0]

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Feed ``token`` at position ``pos`` (positions ``0..pos-1`` must be in the cache from an
        earlier prefill/decode); returns float32 logits ``[vocab]`` for the next position."""
        self._check_ids([token])
        if not 0 <= pos < self._context_tokens:
            raise BadRequest(f"position {pos} is outside the context of {self._context_tokens} tokens.")
        with _compute():
            self._token.fill_(token)
            return self._decode(pos)

    # -- generation ------------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
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

    def _check_request(self, ids: Sequence[int], max_tokens: int, temperature: float, top_p: float) -> None:
        self._check_ids(ids)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BadRequest(f"max_tokens must be a positive integer, not {max_tokens!r}.")
        if not temperature >= 0.0:
            raise BadRequest(f"temperature must be 0 (greedy) or positive, not {temperature!r}.")
        if not 0.0 < top_p <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], not {top_p!r}.")
        if len(ids) + max_tokens > self._context_tokens:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}, {len(ids) + max_tokens} in all, but "
                f"this deployment holds {self._context_tokens} tokens of context; shorten the prompt, lower max_tokens, "
                "or deploy with a larger context_tokens."
            )

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
        """Generate up to ``max_tokens`` tokens after ``prompt_ids``.

        Greedy when ``temperature == 0``; otherwise temperature + top-p sampling from a generator
        seeded with ``seed`` (same seed, same tokens), or from the engine's own generator when
        ``seed`` is None. Stops at the tokenizer's eos (unless ``ignore_eos``; the eos token is
        included in ``tokens``), after ``max_tokens``, or when ``should_stop()`` returns True, which
        is asked before every decode step. ``on_token`` is called with each token id as soon as it
        is chosen. Raises ``PromptTooLong`` when ``len(prompt_ids) + max_tokens > context_tokens``.
        """
        ids = list(prompt_ids)
        self._check_request(ids, max_tokens, temperature, top_p)
        with _compute():
            return self._generate(ids, max_tokens, temperature, top_p, seed, ignore_eos, on_token, should_stop)

    def _generate(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, seed: int | None,
                  ignore_eos: bool, on_token: Callable[[int], None] | None,
                  should_stop: Callable[[], bool] | None) -> GenerationResult:
        generator = None
        if temperature > 0.0:
            generator = self._generator
            if seed is not None:
                generator = torch.Generator(device=self.stages[-1].device).manual_seed(seed)
        eos = None if ignore_eos else self._tokenizer.eos_id
        result = GenerationResult(tokens=[], finish_reason="length", ttft_ms=0.0, prompt_tokens=len(ids), timer=self._timer.name)
        if should_stop is not None and should_stop():
            result.finish_reason = "cancelled"
            return result

        timer = self._timer
        timer.start()
        logits = self._prefill(ids)
        token = self._sample(logits, temperature, top_p, generator)
        token_id = int(token.item())
        result.ttft_ms = timer.stop()

        pos = len(ids)
        while True:
            result.tokens.append(token_id)
            if on_token is not None:
                on_token(token_id)
            if eos is not None and token_id == eos:
                result.finish_reason = "stop"
                break
            if len(result.tokens) >= max_tokens:
                result.finish_reason = "length"
                break
            if should_stop is not None and should_stop():
                result.finish_reason = "cancelled"
                break
            timer.start()
            self._token.copy_(token.view(1))
            token = self._sample(self._decode(pos), temperature, top_p, generator)
            token_id = int(token.item())
            result.step_ms.append(timer.stop())
            pos += 1
        return result
