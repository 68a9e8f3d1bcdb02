"""iServe's torch inference engine: Llama-family, Mixtral and parallel-residual decoders with
pipeline and tensor-parallel stages (see docs/engine.md).

Importing the package imports no submodule (and no torch): ``Engine``, ``load_tokenizer`` and the
other names below load their submodule on first use. ``capabilities.CAPABILITIES`` says what runs.
"""

from __future__ import annotations

import importlib
import os

# Read when CUDA first initialises, so set before any submodule can start it; a value the operator
# set wins. Expandable segments let a converted layer's freed memory go back (``compact.release_cached``):
# see docs/fingerprint.md.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

_LAZY = {  # name -> the submodule that defines it
    "CAPABILITIES": "capabilities",
    "Engine": "runner",
    "GenerationResult": "runner",
    "Stage": "stage",
    "ByteTokenizer": "tokenizer",
    "StreamDecoder": "tokenizer",
    "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
