"""iServe's torch inference engine: Llama-family, Mixtral, Falcon, GPT-J and GPT-NeoX decoders with pipeline stages.

Public API:

* ``Engine.load(model_dir, stages, context_tokens, seed=0, *, dtype=None, weight_quant="fp16",
  kv_quant="fp16", pruning="none", cuda_graphs=True, tp_rank=0, tp_size=1)`` -> ``Engine``;
  ``Engine.generate(...)`` -> ``GenerationResult`` (see ``runner.py``; layers and variants in
  ``model.py``, weight formats in ``quant.py``, CUDA decode kernels in ``kernels.py``).
* ``trtllm.TrtLlmEngine``: the same worker interface on TensorRT-LLM, used where it is installed
  (``trtllm.use_trtllm``).
* ``load_tokenizer(model_dir, arch)`` -> ``Tokenizer`` (see ``tokenizer.py``).
* ``measure_fingerprint(...)`` -> ``FingerprintMeasurement`` and ``gpu_type_of(device)`` (``profile.py``).
* ``CAPABILITIES``: what this engine can run today (every value below runs on CPU and CUDA; see
  docs/engine.md). It is the single source of truth that the GPU agent reports and that
  ``Engine.load`` / ``measure_fingerprint`` check against.
"""

from __future__ import annotations

import os

# The CUDA caching allocator with expandable segments maps memory page by page, so what a converted
# layer leaves free inside a segment can be returned (``model.release_cached``) instead of pinning
# the whole segment: without it, int8 / 2:4 / structured-pruned Llama-2-7B reserved 1-2.2 GiB more
# than it allocated on an H100 (docs/fingerprint.md). Read when CUDA first initialises; a value the
# operator set wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

# Defined before the submodules are imported: runner.py and profile.py read it from here.
CAPABILITIES: dict[str, list] = {
    "tp": [1, 2, 4, 8],
    "weight_quant": ["fp16", "int8", "int4"],
    "kv_quant": ["fp16", "int8"],
    "pruning": ["none", "2:4", "structured"],
    "families": ["llama", "mixtral", "falcon", "gptj", "gpt_neox"],
}

from .profile import gpu_type_of, measure_fingerprint  # noqa: E402
from .runner import Engine, GenerationResult  # noqa: E402
from .stage import Stage  # noqa: E402
from .tokenizer import ByteTokenizer, StreamDecoder, Tokenizer, load_tokenizer  # noqa: E402

__all__ = [
    "CAPABILITIES",
    "ByteTokenizer",
    "Engine",
    "GenerationResult",
    "Stage",
    "StreamDecoder",
    "Tokenizer",
    "gpu_type_of",
    "load_tokenizer",
    "measure_fingerprint",
]
