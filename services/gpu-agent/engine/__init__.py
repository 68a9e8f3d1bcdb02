"""iServe's torch inference engine: Llama-family and Mixtral decoders with pipeline stages.

Public API:

* ``Engine.load(model_dir, stages, context_tokens, seed=0)`` -> ``Engine``; ``Engine.generate(...)``
  -> ``GenerationResult`` (see ``runner.py``).
* ``load_tokenizer(model_dir, arch)`` -> ``Tokenizer`` (see ``tokenizer.py``).
* ``measure_fingerprint(...)`` -> ``FingerprintMeasurement`` and ``gpu_type_of(device)`` (``profile.py``).
* ``CAPABILITIES``: what this engine can run today. It is the single source of truth that the GPU
  agent reports and that ``Engine.load`` / ``measure_fingerprint`` check against.
"""

from __future__ import annotations

# Defined before the submodules are imported: runner.py and profile.py read it from here.
CAPABILITIES: dict[str, list] = {
    "tp": [1],
    "weight_quant": ["fp16"],
    "kv_quant": ["fp16"],
    "pruning": ["none"],
    "families": ["llama", "mixtral"],
}

from .model import Stage  # noqa: E402
from .profile import gpu_type_of, measure_fingerprint  # noqa: E402
from .runner import Engine, GenerationResult  # noqa: E402
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
