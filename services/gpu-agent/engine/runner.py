"""``Engine``: a loaded model, split into pipeline stages, that generates tokens for one request at a time.

Typical use (the worker process)::

    engine = Engine.load("/models/llama-2-7b", [("cuda:0", 0, 16), ("cuda:1", 16, 16)], context_tokens=2048)
    ids = engine.tokenizer.encode("Hello")
    result = engine.generate(ids, max_tokens=64, on_token=send_chunk, should_stop=cancelled)

Timing, fused decode kernels, CUDA graphs and tensor parallelism: docs/engine-internals.md#the-engine.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from iserve.checkpoint import Checkpoint
from iserve.errors import BadRequest, PromptTooLong
from iserve.messages import ArchSpec

from .checks import check_ids, check_position, check_request
from .fused import fused_problem
from .graphs import (
    PREFILL_GRAPH_TOKENS,
    DecodeGraphs,
    PrefillGraphs,
    capture,
    graph_buckets,
    prefill_buckets,
    smallest_at_least,
)
from .loading import load_stages
from .sampling import sample
from .stage import Stage
from .tensors import TensorCache
from .timing import CudaEventTimer, PerfTimer
from .tokenizer import Tokenizer
from .tp import TPControl

# Attention kernels the engine lets scaled_dot_product_attention pick: not cuDNN's, which re-plans
# for every new key length (docs/engine-internals.md#the-engine).
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def _compute() -> Iterator[None]:
    """Inference mode with the engine's attention kernels; entered once per public call."""
    with torch.inference_mode(), sdpa_kernel(_SDPA_BACKENDS):
        yield


@dataclass
class GenerationResult:
    """What ``Engine.generate`` produced; times in milliseconds."""

    tokens: list[int]
    finish_reason: Literal["stop", "length", "cancelled"]  # eos, max_tokens reached, or cancelled
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


def _ids_to(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Token ids as a ``[T]`` long tensor on ``device``. On CUDA through pinned memory, without
    waiting: a copy from pageable memory synchronizes the host with the GPU, so the host could not
    queue the prefill while earlier work runs (and the profiler's device timing, which queues a
    pass behind a GPU spin, measured host-bound prefills as if they were device time)."""
    cpu = torch.tensor(list(ids), dtype=torch.long)
    if device.type != "cuda":
        return cpu
    return cpu.pin_memory().to(device, non_blocking=True)


class Engine:
    """A model loaded as a pipeline of ``Stage``s, generating for one request at a time (batch size 1).

    Create it with ``Engine.load``. Not thread-safe: run one ``generate`` at a time.
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        stages: list[Stage],
        tokenizer: Tokenizer,
        context_tokens: int,
        seed: int,
        *,
        cuda_graphs: bool = True,
        variant: dict[str, str] | None = None,
        tp: TPControl | None = None,
        prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS,
        prefill_graph_lengths: Sequence[int] | None = None,
    ):
        self.checkpoint = checkpoint
        self.stages = stages
        self._tokenizer = tokenizer
        self._context_tokens = context_tokens
        self.variant = dict(variant or {"weight_quant": "fp16", "kv_quant": "fp16", "pruning": "none"})
        self._tp = tp
        self._groups: list = []  # process groups this engine made (TP), destroyed by close()
        self._static_cache = True  # False once a BatchEngine took over (release_static_cache)
        first, last = stages[0].device, stages[-1].device
        self._token = torch.zeros(1, dtype=torch.long, device=first)  # decode input buffer
        self._generator = torch.Generator(device=last).manual_seed(seed)  # for requests without a seed
        cuda_devices = sorted({s.device for s in stages if s.device.type == "cuda"}, key=str)
        if len(cuda_devices) == 1 and all(s.device.type == "cuda" for s in stages):
            self._timer: PerfTimer | CudaEventTimer = CudaEventTimer(cuda_devices[0])
        else:
            self._timer = PerfTimer(cuda_devices)
        self.fused_error = ""
        self.buckets = graph_buckets(context_tokens)
        self._graphs: list[DecodeGraphs | None] = [None] * len(stages)
        self._prefill_graphs: list[PrefillGraphs] = []  # one per stage, or none
        # A projection whose kernel's time grows with padded rows (int4's) keeps prefill eager.
        pads_cheaply = all(lin.pads_cheaply for s in stages for layer in s.unique_layers() for lin in layer.linears())
        self.prefill_buckets = (
            prefill_buckets(context_tokens, prefill_graph_tokens) if cuda_graphs and pads_cheaply else []
        )
        if prefill_graph_lengths is not None:  # profiling: only the buckets these prompt lengths use
            needed = {smallest_at_least(self.prefill_buckets, n) for n in prefill_graph_lengths}
            self.prefill_buckets = [b for b in self.prefill_buckets if b in needed]
        self.prefill_graph_error = ""
        if any(s.can_fuse for s in stages):
            self._enable_fused()
        fused = [s.fused for s in stages if s.device.type == "cuda"]
        # Fused attention reads exactly the valid rows: one graph covers every position.
        if fused and all(fused):
            self.buckets = [context_tokens]
        if cuda_graphs:
            self._capture()

    def _enable_fused(self) -> None:
        """Turn on the fused Triton decode kernels where they apply, after checking them on this
        device, one layer per stage (``fused.fused_problem``); else they stay off and ``fused_error``
        says why. See docs/engine-internals.md#fused-decode."""
        n = min(8, self._context_tokens - 1)
        if n < 2:
            return
        with _compute():
            problem = fused_problem(self.stages, n)
        if self._tp is not None and not self._tp.all_agree(not problem) and not problem:
            problem = "another tensor-parallel rank's check refused fused decode"
        for s in self.stages:
            s.fused = s.can_fuse and not problem
        self.fused_error = problem

    def _capture(self) -> None:
        """Capture the decode step, and the prefill, of the CUDA stages in graphs (``graphs.capture``)."""
        with _compute():
            self._graphs, self._prefill_graphs, self.prefill_graph_error = capture(
                self.stages, self._token, self.buckets, self.prefill_buckets, self._tp
            )

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
        weight_quant: str = "fp16",
        kv_quant: str = "fp16",
        pruning: str = "none",
        cuda_graphs: bool = True,
        tp_rank: int = 0,
        tp_size: int = 1,
        replay_layers: int = 0,
        prefill_graph_tokens: int = PREFILL_GRAPH_TOKENS,
        replay_distinct: bool = False,
        prefill_graph_lengths: Sequence[int] | None = None,
        tensors: TensorCache | None = None,
    ) -> "Engine":
        """Load ``model_dir`` as the given stages ``(device, first_layer, num_layers)``.

        Each stage reads only its own tensors, straight onto its device. Computation dtype: on CUDA
        the checkpoint's ``torch_dtype`` (bfloat16 stays bfloat16, anything else runs as float16;
        with int4 weights bfloat16, the activation type of the int4 kernel), on CPU float32;
        ``dtype`` ("float16", "bfloat16", "float32") overrides all of these. ``seed`` seeds the
        sampler of requests that bring no seed of their own.

        ``weight_quant`` ("fp16", "int8", "int4"), ``kv_quant`` ("fp16", "int8") and ``pruning``
        ("none", "2:4", "structured") pick the variant (see ``layers.py``, ``pruning.py`` and ``quant.py``);
        ``cuda_graphs`` captures the decode step of CUDA stages, and their prefill for prompts of up to
        ``prefill_graph_tokens`` tokens (0: eager prefill); ``tp_rank`` / ``tp_size`` load this
        process's share of a tensor-parallel deployment (docs/engine-internals.md#tensor-parallelism).
        ``replay_layers`` (profiling only, one stage): run the checkpoint's layers cyclically as a
        model of that many layers (``Stage.replay``), for the timing of a deep model from a fingerprint;
        ``replay_distinct`` gives the replayed layers tensors of their own where they fit;
        ``prefill_graph_lengths`` (profiling) captures only the prefill graphs these prompt lengths use;
        ``tensors`` (profiling) hands out copies of checkpoint tensors read once (``tensors.TensorCache``).

        Raises ``CheckpointError`` for a bad checkpoint, ``UnsupportedModel`` for an architecture or
        variant this engine cannot run, ``BadRequest`` for stages that do not cover every layer
        exactly once in order, unknown devices, a context longer than the model's, or a TP degree
        that does not divide the heads.
        """
        loaded = load_stages(
            model_dir,
            stages,
            context_tokens,
            dtype=dtype,
            weight_quant=weight_quant,
            kv_quant=kv_quant,
            pruning=pruning,
            tp_rank=tp_rank,
            tp_size=tp_size,
            replay_layers=replay_layers,
            replay_distinct=replay_distinct,
            tensors=tensors,
        )
        variant = {"weight_quant": weight_quant, "kv_quant": kv_quant, "pruning": pruning}
        with torch.inference_mode():
            engine = cls(
                loaded.checkpoint,
                loaded.stages,
                loaded.tokenizer,
                context_tokens,
                seed,
                cuda_graphs=cuda_graphs,
                variant=variant,
                tp=loaded.tp,
                prefill_graph_tokens=prefill_graph_tokens,
                prefill_graph_lengths=prefill_graph_lengths,
            )
        engine._groups = loaded.groups
        return engine

    def close(self) -> None:
        """Drop every weight and cache so that the memory can be reused (the engine is unusable after).
        On a tensor-parallel leader this first releases the followers from ``follow()``."""
        if self._tp is not None and self._tp.leader and self.stages:
            self._tp.send(("stop",))
        self._graphs = []
        self._prefill_graphs = []
        self.stages = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release_static_cache(self) -> None:
        """Free each stage's static KV cache and the CUDA graphs that use it: a ``batch.BatchEngine``
        keeps keys and values in its own pool. ``generate`` refuses afterwards."""
        self._graphs, self._prefill_graphs, self._static_cache = [None] * len(self.stages), [], False
        for s in self.stages:
            s.release_cache()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def release_groups(self) -> None:
        """Destroy the process groups this tensor-parallel engine made (its NCCL communicator holds
        buffers outside the allocator). After ``close``, on every rank alike: a communicator's
        teardown may wait for its peers. Profiling does this between engines; a serving worker
        exits instead."""
        groups, self._groups = self._groups, []
        if groups:
            import torch.distributed as dist

            for group in groups:
                dist.destroy_process_group(group)

    # -- properties ------------------------------------------------------------------------------

    @property
    def replayed(self) -> bool:
        """Whether a stage runs some of its layers more than once (``replay_layers``, profiling)."""
        return any(s.replayed_from for s in self.stages)

    @property
    def arch(self) -> ArchSpec:
        return self.checkpoint.arch

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def eos_ids(self) -> frozenset[int]:
        """The ids that end a generation: the checkpoint's eos lists and the tokenizer's eos."""
        return frozenset(i for i in (*self.arch.eos_token_ids, self._tokenizer.eos_id) if i is not None)

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

    @property
    def tp_rank(self) -> int:
        return self._tp.rank if self._tp is not None else 0

    @property
    def tp_size(self) -> int:
        return self._tp.size if self._tp is not None else 1

    @property
    def fused_decode(self) -> list[bool]:
        """Per stage: whether decode runs the fused Triton kernels."""
        return [s.fused for s in self.stages]

    @property
    def graphs_captured(self) -> list[bool]:
        """Per stage: whether its decode step replays a CUDA graph."""
        return [g is not None for g in self._graphs]

    @property
    def graph_count(self) -> int:
        """CUDA graphs captured over all stages, decode and prefill."""
        return sum(len(g.graphs) for g in [*self._graphs, *self._prefill_graphs] if g is not None)

    @property
    def prefill_graph_tokens(self) -> int:
        """The longest prompt whose prefill replays CUDA graphs (0: every prefill runs eagerly)."""
        return self.prefill_buckets[-1] if self._prefill_graphs else 0

    def kernels(self) -> dict[str, int]:
        """How many projections of all stages run on each kernel (e.g. ``{"dense": 224}``)."""
        out: dict[str, int] = {}
        for s in self.stages:
            for k, n in s.kernels().items():
                out[k] = out.get(k, 0) + n
        return out

    def weight_bytes(self) -> int:
        """Bytes of weights held by all stages (as stored: quantized, sparse, this rank's share)."""
        return sum(s.weight_bytes for s in self.stages)

    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV caches of all stages (int8 caches include their scales)."""
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

    def _single_process(self, what: str) -> None:
        if self._tp is not None:
            raise BadRequest(f"{what} is not available on a tensor-parallel engine; use generate.")

    def prefill(self, ids: Sequence[int], *, all_positions: bool = False) -> torch.Tensor:
        """Run the prompt through every stage, filling the KV caches from position 0.

        Returns float32 logits on the last stage's device: ``[vocab]`` for the last position, or
        ``[len(ids), vocab]`` with ``all_positions``.
        """
        self._check_prompt("prefill", ids)
        with _compute():
            return self._prefill(ids, all_positions).clone()

    def _check_prompt(self, what: str, ids: Sequence[int]) -> None:
        """``what`` (a one-process call) may run a prefill of ``ids``."""
        self._single_process(what)
        check_ids(ids, self.arch.vocab_size)
        if len(ids) > self._context_tokens:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but the context holds {self._context_tokens}; shorten it."
            )

    def _prefill(self, ids: Sequence[int], all_positions: bool = False) -> torch.Tensor:
        """Logits ``[vocab]`` of the last position (or ``[T, vocab]`` with ``all_positions``); the
        last-position logits of a captured prefill are the graph's static output, valid until the
        next prefill."""
        length = self._prefill_length(len(ids)) if not all_positions else 0
        x = _ids_to(ids, self.stages[0].device)
        if not length:
            for stage in self.stages:
                x = stage.prefill(x, all_positions=all_positions)
            return x if all_positions else x[0]
        graphs = self._prefill_graphs
        graphs[0].inp[: len(ids)].copy_(x)
        graphs[-1].last.fill_(len(ids) - 1)
        for i, g in enumerate(graphs):
            x = g.run(length)
            if i + 1 < len(graphs):
                graphs[i + 1].inp[:length].copy_(x)
        return x[0]

    def _prefill_length(self, tokens: int) -> int:
        """The captured prompt length a prompt of ``tokens`` is padded to; 0 if it runs eagerly."""
        return smallest_at_least(self.prefill_buckets, tokens) if self._prefill_graphs else 0

    def _bucket(self, kv_len: int) -> int:
        return smallest_at_least(self.buckets, kv_len) or self.buckets[-1]

    def _decode(self, pos: int) -> torch.Tensor:
        """One decode step for the token in ``self._token`` at position ``pos``; logits ``[vocab]``."""
        for stage in self.stages:
            stage.pos.fill_(pos)
        x = self._token
        bucket = self._bucket(pos + 1)
        for stage, graphs in zip(self.stages, self._graphs):
            if graphs is None:
                x = stage.decode(x, kv_len=pos + 1, masked=stage.needs_mask(pos, pos + 1))
            else:
                if graphs.inp is not x:
                    graphs.inp.copy_(x)
                x = graphs.run(bucket)
        return x[0]

    def decode(self, token: int, pos: int) -> torch.Tensor:
        """Feed ``token`` at position ``pos`` (positions ``0..pos-1`` must be in the cache from an
        earlier prefill/decode); returns float32 logits ``[vocab]`` for the next position."""
        self._single_process("decode")
        check_ids([token], self.arch.vocab_size)
        check_position(pos, self._context_tokens)
        with _compute():
            self._token.fill_(token)
            return self._decode(pos).clone()

    # -- profiling hooks (one process; ``profile`` times them) ---------------------------------------

    def queue_prefill(self, ids: Sequence[int]) -> None:
        """Profiling: queue one prefill of ``ids`` as ``generate`` runs it (captured when a graph
        holds its length), without sampling and without waiting for the device, so that passes
        queued back to back can be timed with CUDA events (``profile``)."""
        self._check_prompt("queue_prefill", ids)
        with _compute():
            self._prefill(ids)

    def queue_decode(self, pos: int) -> None:
        """Profiling: queue one decode step at ``pos`` (of the token last fed) as ``generate`` runs
        it, without sampling and without waiting for the device."""
        self._single_process("queue_decode")
        check_position(pos, self._context_tokens)
        with _compute():
            self._decode(pos)

    # -- generation ------------------------------------------------------------------------------

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
        ``seed`` is None. Stops at any of ``eos_ids`` (unless ``ignore_eos``; the eos token is
        included in ``tokens``), after ``max_tokens``, or when ``should_stop()`` returns True, which
        is asked before every decode step. ``on_token`` is called with each token id as soon as it
        is chosen. Raises ``PromptTooLong`` when ``len(prompt_ids) + max_tokens > context_tokens``.
        On a tensor-parallel engine only the leader (rank 0) calls this; see ``follow``.
        """
        ids = list(prompt_ids)
        if not self._static_cache:
            raise BadRequest("this engine's KV cache was handed to a BatchEngine; submit requests to that instead.")
        check_request(ids, max_tokens, temperature, top_p, self.arch.vocab_size, self._context_tokens)
        if self._tp is not None:
            if not self._tp.leader:
                raise BadRequest(
                    "only rank 0 of a tensor-parallel engine takes requests; the other ranks run follow()."
                )
            if should_stop is not None and should_stop():
                return GenerationResult(
                    tokens=[], finish_reason="cancelled", ttft_ms=0.0, prompt_tokens=len(ids), timer=self._timer.name
                )
            self._tp.send(("generate", ids, max_tokens, temperature, top_p, seed, ignore_eos))
        with _compute():
            return self._generate(ids, max_tokens, temperature, top_p, seed, ignore_eos, on_token, should_stop)

    def follow(self) -> int:
        """Tensor-parallel ranks other than 0: run every generation the leader broadcasts, in lockstep,
        until the leader closes. Returns how many generations were run."""
        done = 0
        while self.follow_one():
            done += 1
        return done

    def follow_one(self) -> bool:
        """Tensor-parallel ranks other than 0: take the leader's next message and run the generation
        it carries. Returns False when the message was the leader's close instead."""
        if self._tp is None or self._tp.leader:
            raise BadRequest("follow() is for the ranks other than 0 of a tensor-parallel engine.")
        message = self._tp.send(())
        if message[0] != "generate":
            return False
        _, ids, max_tokens, temperature, top_p, seed, ignore_eos = message
        with _compute():
            self._generate(ids, max_tokens, temperature, top_p, seed, ignore_eos, None, None)
        return True

    def _generate(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        ignore_eos: bool,
        on_token: Callable[[int], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> GenerationResult:
        generator = None
        if temperature > 0.0:
            generator = self._generator
            if seed is not None:
                generator = torch.Generator(device=self.stages[-1].device).manual_seed(seed)
        eos = frozenset() if ignore_eos else self.eos_ids
        result = GenerationResult(
            tokens=[], finish_reason="length", ttft_ms=0.0, prompt_tokens=len(ids), timer=self._timer.name
        )
        tp = self._tp
        if tp is None and should_stop is not None and should_stop():
            result.finish_reason = "cancelled"
            return result

        timer = self._timer
        timer.start()
        # On a tensor-parallel engine only the leader samples; every rank takes its token (TPControl.agree).
        # From the second token on, the leader's cancellation decision rides along: asked after the
        # previous token was streamed, as without TP (the token of the step that found it cancelled is dropped).
        samples = tp is None or tp.leader
        logits = self._prefill(ids)
        token = sample(logits, temperature, top_p, generator) if samples else None
        cancel = False
        if tp is None:
            token_id = int(token.item())  # type: ignore[union-attr]  # without TP this rank samples
        else:
            token_id, cancel = tp.agree(token, False)
        result.ttft_ms = timer.stop()

        pos = len(ids)
        while True:
            if cancel:
                result.finish_reason = "cancelled"
                break
            result.tokens.append(token_id)
            if on_token is not None:
                on_token(token_id)
            if token_id in eos:
                result.finish_reason = "stop"
                break
            if len(result.tokens) >= max_tokens:
                result.finish_reason = "length"
                break
            if tp is None and should_stop is not None and should_stop():
                result.finish_reason = "cancelled"
                break
            timer.start()
            self._token.copy_(token.view(1) if tp is None else tp.token)  # type: ignore[union-attr]
            logits = self._decode(pos)
            token = sample(logits, temperature, top_p, generator) if samples else None
            if tp is None:
                token_id = int(token.item())  # type: ignore[union-attr]  # without TP this rank samples
            else:
                token_id, cancel = tp.agree(token, should_stop is not None and should_stop())
            result.step_ms.append(timer.stop())
            pos += 1
        return result
