"""What the torch engine can run today, the single source of truth that the GPU agent reports, that
the fingerprint service profiles, and that ``Engine.load`` checks against. Imports no torch.

Every value runs on CPU and CUDA (see docs/engine.md).
"""

from __future__ import annotations

from iserve.messages import FAMILIES, KV_QUANTS, PRUNINGS, WEIGHT_QUANTS

CAPABILITIES: dict[str, list] = {
    "tp": [1, 2, 4, 8],
    "weight_quant": list(WEIGHT_QUANTS),
    "kv_quant": list(KV_QUANTS),
    "pruning": list(PRUNINGS),
    "families": list(FAMILIES),
}
