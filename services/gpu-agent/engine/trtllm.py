"""TensorRT-LLM backend: the same worker interface as ``Engine``, served by TensorRT-LLM's LLM API.

``use_trtllm`` decides whether it serves a configuration; ``llm_kwargs`` maps the configuration onto
``tensorrt_llm.LLM(...)``; ``TrtLlmEngine`` streams tokens from ``llm.generate_async``. This module
was NOT run in the workplace where it was written (TensorRT-LLM is not installed on its GPU
machines); it is unit-tested against a stand-in module (tests/engine/test_trtllm.py).

See docs/engine.md#tensorrt-llm-backend.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from iserve.checkpoint import scan_checkpoint
from iserve.errors import UnsupportedModel
from iserve.messages import Configuration

from .runner import GenerationResult
from .tokenizer import Tokenizer, load_tokenizer

ENV = "ISERVE_ENGINE"  # "torch", "trtllm", or unset/"auto"


def available() -> bool:
    """Whether ``tensorrt_llm`` imports here."""
    try:
        importlib.import_module("tensorrt_llm")
    except Exception:
        return False
    return True


def unsupported_reason(config: Configuration) -> str:
    """Why TensorRT-LLM's LLM API cannot run ``config`` ("" when it can)."""
    if config.pruning != "none":
        return f"TensorRT-LLM's LLM API has no {config.pruning} pruning"
    return ""


def use_trtllm(config: Configuration, env: dict[str, str] | None = None) -> bool:
    """Whether a worker for ``config`` runs on TensorRT-LLM (see the module docstring)."""
    choice = (env if env is not None else os.environ).get(ENV, "auto").strip().lower() or "auto"
    if choice == "torch":
        return False
    if choice not in ("auto", "trtllm"):
        raise UnsupportedModel(f"{ENV}={choice!r} is not an engine; use torch, trtllm or auto.")
    reason = unsupported_reason(config) or ("" if available() else "tensorrt_llm does not import")
    if reason and choice == "trtllm":
        raise UnsupportedModel(f"{ENV}=trtllm but {reason}; unset it to fall back to the torch engine.")
    return not reason


def llm_kwargs(model_path: str | Path, config: Configuration, context_tokens: int) -> dict[str, Any]:
    """Keyword arguments of ``tensorrt_llm.LLM`` for ``config`` (see the module docstring)."""
    reason = unsupported_reason(config)
    if reason:
        raise UnsupportedModel(reason)
    kw: dict[str, Any] = dict(
        model=str(model_path),
        tensor_parallel_size=config.tp,
        pipeline_parallel_size=config.pp,
        max_seq_len=context_tokens,
        max_batch_size=1,
    )
    if config.weight_quant != "fp16" or config.kv_quant != "fp16":
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        algo = llmapi.QuantAlgo
        quant: dict[str, Any] = {}
        if config.weight_quant == "int8":
            quant["quant_algo"] = algo.W8A16
        elif config.weight_quant == "int4":
            quant["quant_algo"] = algo.W4A16
        if config.kv_quant == "int8":
            quant["kv_cache_quant_algo"] = algo.INT8
        kw["quant_config"] = llmapi.QuantConfig(**quant)
    return kw


class TrtLlmEngine:
    """A model served by ``tensorrt_llm.LLM``, with the parts of ``Engine``'s interface the worker uses."""

    def __init__(self, llm: Any, tokenizer: Tokenizer, context_tokens: int, config: Configuration):
        self._llm = llm
        self._tokenizer = tokenizer
        self._context_tokens = context_tokens
        self.config = config
        self.timer = "perf_counter"

    @classmethod
    def load(cls, model_path: str | Path, config: Configuration, context_tokens: int) -> "TrtLlmEngine":
        trt = importlib.import_module("tensorrt_llm")
        arch = scan_checkpoint(model_path).arch
        llm = trt.LLM(**llm_kwargs(model_path, config, context_tokens))
        return cls(llm, load_tokenizer(model_path, arch), context_tokens, config)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def context_tokens(self) -> int:
        return self._context_tokens

    @property
    def graphs_captured(self) -> list[bool]:
        return []

    @property
    def prefill_graph_tokens(self) -> int:
        return 0

    def kernels(self) -> dict[str, int]:
        return {"tensorrt_llm": 1}

    def memory_bytes(self) -> list[int]:
        """Not reported by the LLM API: one 0 per GPU of the deployment."""
        return [0] * (self.config.tp * self.config.pp)

    def close(self) -> None:
        shutdown = getattr(self._llm, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def sampling_params(self, max_tokens: int, temperature: float, top_p: float, seed: int | None, ignore_eos: bool):
        llmapi = importlib.import_module("tensorrt_llm")
        kw: dict[str, Any] = dict(max_tokens=max_tokens, ignore_eos=ignore_eos)
        if temperature > 0.0:
            kw.update(temperature=temperature, top_p=top_p)
            if seed is not None:
                kw["seed"] = seed
        else:
            kw["top_k"] = 1  # greedy
        return llmapi.SamplingParams(**kw)

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
        """Stream one request through ``generate_async`` (run in this thread's own event loop)."""
        ids = list(prompt_ids)
        return asyncio.run(
            self._generate(
                ids,
                self.sampling_params(max_tokens, temperature, top_p, seed, ignore_eos),
                max_tokens,
                on_token,
                should_stop,
            )
        )

    async def _generate(
        self,
        ids: list[int],
        params: Any,
        max_tokens: int,
        on_token: Callable[[int], None] | None,
        should_stop: Callable[[], bool] | None,
    ) -> GenerationResult:
        result = GenerationResult(
            tokens=[], finish_reason="length", ttft_ms=0.0, prompt_tokens=len(ids), timer=self.timer
        )
        t0 = last = time.perf_counter()
        stream = self._llm.generate_async(ids, params, streaming=True)
        async for out in stream:
            seq = out.outputs[0]
            now = time.perf_counter()
            new = list(seq.token_ids)[len(result.tokens) :]
            # Tokens that arrive together share the interval since the last arrival (with the first
            # token, the prefill's interval is its TTFT; tokens arriving with it count 0).
            share = (now - last) * 1e3 / len(new) if new and result.tokens else 0.0
            for token in new:
                if not result.tokens:
                    result.ttft_ms = (now - t0) * 1e3
                else:
                    result.step_ms.append(share)
                result.tokens.append(int(token))
                if on_token is not None:
                    on_token(int(token))
            last = now
            if should_stop is not None and should_stop():
                abort = getattr(out, "abort", None)
                if abort is not None:
                    abort()
                result.finish_reason = "cancelled"
                return result
            if getattr(seq, "finish_reason", None) == "stop":
                result.finish_reason = "stop"
        if len(result.tokens) < max_tokens and result.finish_reason == "length":
            result.finish_reason = "stop"
        return result
