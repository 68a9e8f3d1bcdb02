"""What the torch engine can run today, the single source of truth that the GPU agent reports, that
the fingerprint service profiles, and that ``Engine.load`` checks against. Imports no torch.

Every value runs on CPU and CUDA (see docs/engine.md).
"""

from __future__ import annotations

CAPABILITIES: dict[str, list] = {
    "tp": [1, 2, 4, 8],
    "weight_quant": ["fp16", "int8", "int4"],
    "kv_quant": ["fp16", "int8"],
    "pruning": ["none", "2:4", "structured"],
    "families": ["llama", "mixtral", "falcon", "gptj", "gpt_neox"],
}
