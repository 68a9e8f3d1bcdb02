"""Fingerprint measurements: time and memory of a 1- or 2-layer checkpoint on one device.

The fingerprint service derives every configuration's latency and memory from these numbers (paper
L2/M2): the difference between the 2-layer and the 1-layer fingerprint is one layer's cost, the rest
is the embedding/head and fixed overhead. ``measure_fingerprint`` loads one fingerprint checkpoint as
a single pipeline stage and measures:

* Warm-up: every prompt length ``warmup`` times, and on a GPU for at least ``MIN_GPU_WARMUP_S``.
* TTFT per prompt length: median over ``repeats`` runs of a prefill plus the first token.
* TPOT: median of every decode step over ``repeats`` runs of each output length (prompt of the
  smallest length, ``ignore_eos``, so each run makes exactly that many tokens). Runs go round-robin
  over the lengths.
* Peak memory: on CUDA the torch allocator's peak since loading finished (weights, KV cache and
  activations) and, when NVML works, the process's device memory as NVML sees it (allocator cache
  and CUDA context included); on CPU the accounted bytes, see ``activation_bytes_estimate``.

Prompts are random token ids in ``[3, vocab)`` from a seeded generator, so runs are reproducible.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from iserve.checkpoint import scan_checkpoint
from iserve.errors import BadRequest, CheckpointError, UnsupportedModel
from iserve.messages import ArchSpec, FingerprintMeasurement, ProfileVariant, PromptTiming

from .runner import Engine

MIN_GPU_WARMUP_S = 1.0  # least warm-up time on a GPU (clocks ramp up under load)


def gpu_type_of(device: str) -> str:
    """The GPU's product name (e.g. "NVIDIA H100 80GB HBM3") for a CUDA device, else "cpu"."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def activation_bytes_estimate(arch: ArchSpec, prompt_tokens: int, dtype_bytes: int) -> int:
    """Bytes of temporaries alive at the peak of a prefill of ``prompt_tokens`` tokens, from shapes.

    Used on CPU, where there is no allocator to ask. Counted within one layer (temporaries are freed
    layer by layer): the residual stream and its normed copy ``[p, hidden]``; the fused q/k/v output
    and the rotated q and k; the GQA-expanded k and v and the attention output ``[p, heads*head_dim]``;
    the MLP's fused gate/up output ``[p, 2*intermediate]`` and its activation ``[p, intermediate]``
    (Mixtral: plus its router logits and the output accumulator); all in the computation dtype; plus
    the float32 norm temporaries ``[p, hidden]`` and the float32 logits of the last position. The
    attention score matrix is not counted: ``scaled_dot_product_attention`` uses fused kernels that
    do not materialize it.
    """
    p, h = prompt_tokens, arch.hidden_size
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_kv_heads * arch.head_dim
    f = arch.intermediate_size
    elems = p * (2 * h + (q + 2 * kv) + (q + kv) + 2 * q + q + 3 * f)
    if arch.family == "mixtral":
        elems += p * (h + arch.num_experts)
    return elems * dtype_bytes + 2 * p * h * 4 + 2 * arch.vocab_size * 4


class _NvmlProbe:
    """This process's memory on one GPU as NVML reports it; every call is guarded and yields 0 when
    NVML is missing or does not list the process (e.g. in a container with its own PID namespace)."""

    def __init__(self, device: torch.device):
        self._handle = None
        self._nvml = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                text = str(uuid)
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            elif not os.environ.get("CUDA_VISIBLE_DEVICES"):
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception:
            self._handle = None

    def sample(self) -> int:
        if self._handle is None:
            return 0
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if proc.pid == os.getpid():
                    return int(proc.usedGpuMemory or 0)
        except Exception:
            return 0
        return 0

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def _check_variant(variant: ProfileVariant) -> None:
    from . import CAPABILITIES

    for knob, value in (("tp", variant.tp), ("weight_quant", variant.weight_quant), ("kv_quant", variant.kv_quant),
                        ("pruning", variant.pruning)):
        if value not in CAPABILITIES[knob]:
            raise UnsupportedModel(
                f"the torch engine cannot run {knob}={value!r} yet (it supports {CAPABILITIES[knob]}); "
                "profile only the variants in its CAPABILITIES."
            )


def measure_fingerprint(
    model_dir: str | Path,
    device: str,
    *,
    num_layers: int,
    prompt_lengths: list[int],
    output_lengths: list[int],
    repeats: int,
    warmup: int,
    context_tokens: int,
    variant: ProfileVariant | None = None,
    seed: int = 0,
) -> FingerprintMeasurement:
    """Measure one fingerprint checkpoint (``num_layers`` hidden layers) on ``device``; see the module
    docstring for what each number means. ``variant`` must be one the engine supports (default fp16)."""
    variant = variant or ProfileVariant()
    _check_variant(variant)
    if not prompt_lengths or not output_lengths or min(prompt_lengths) < 1 or min(output_lengths) < 1:
        raise BadRequest("prompt_lengths and output_lengths must be non-empty lists of positive token counts.")
    if max(output_lengths) < 2:
        raise BadRequest("at least one output length must be 2 or more, or no decode step is measured.")
    if repeats < 1 or warmup < 0:
        raise BadRequest(f"repeats must be at least 1 and warmup at least 0, not {repeats} and {warmup}.")
    if max(prompt_lengths) + max(output_lengths) > context_tokens:
        raise BadRequest(
            f"the longest prompt ({max(prompt_lengths)}) plus the longest output ({max(output_lengths)}) exceeds "
            f"context_tokens {context_tokens}; raise context_tokens or shorten the lengths."
        )
    ck = scan_checkpoint(model_dir)
    if ck.arch.num_layers != num_layers:
        raise CheckpointError(
            f"{model_dir} has {ck.arch.num_layers} hidden layers but the job expects a {num_layers}-layer fingerprint; "
            "regenerate the fingerprint checkpoints."
        )
    vocab = ck.arch.vocab_size
    if vocab <= 3:
        raise CheckpointError(f"{model_dir} has a vocabulary of {vocab} ids; a fingerprint needs more than 3.")

    engine = Engine.load(model_dir, [(device, 0, num_layers)], context_tokens)
    dev = engine.stages[0].device
    probe = _NvmlProbe(dev)
    nvml_peak = 0
    try:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        g = torch.Generator().manual_seed(seed)

        def run(prompt_len: int, max_tokens: int):
            nonlocal nvml_peak
            ids = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
            res = engine.generate(ids, max_tokens=max_tokens, ignore_eos=True)
            nvml_peak = max(nvml_peak, probe.sample())
            return res

        # Warm up every prompt length ``warmup`` times; on a GPU keep going until it has been busy for
        # a while, so that its clocks have ramped up before anything is timed.
        t0 = time.perf_counter()
        rounds = 0
        while rounds < warmup or (warmup and dev.type == "cuda" and time.perf_counter() - t0 < MIN_GPU_WARMUP_S):
            for p in prompt_lengths:
                run(p, 3)
            rounds += 1

        # Round-robin over the lengths, so that any drift during the measurement affects all alike.
        ttft_samples: dict[int, list[float]] = {p: [] for p in prompt_lengths}
        steps: list[float] = []
        for _ in range(repeats):
            for p in prompt_lengths:
                ttft_samples[p].append(run(p, 1).ttft_ms)
            for o in output_lengths:
                steps += run(min(prompt_lengths), o).step_ms
        ttft = [PromptTiming(prompt_tokens=p, ttft_ms=statistics.median(ttft_samples[p])) for p in prompt_lengths]

        if dev.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(dev))
        else:
            dtype_bytes = engine.stages[0].dtype.itemsize
            peak = engine.memory_bytes()[0] + activation_bytes_estimate(engine.arch, max(prompt_lengths), dtype_bytes)
        return FingerprintMeasurement(
            num_layers=num_layers,
            variant=variant,
            ttft=ttft,
            tpot_ms=statistics.median(steps),
            decode_steps=len(steps),
            peak_bytes=peak,
            nvml_peak_bytes=nvml_peak,
            weight_bytes=engine.weight_bytes(),
            kv_cache_bytes=engine.kv_cache_bytes(),
            timer=engine.timer,
        )
    finally:
        probe.close()
        engine.close()
