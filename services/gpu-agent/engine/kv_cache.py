"""The static KV cache of a stage: 16-bit, or int8 with one scale per (layer, k/v, head, position)."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of ``layers`` layers for ``context`` positions: ``data [layers, 2, kv_heads,
    context, head_dim]`` in the computation dtype, or int8 with ``scale [layers, 2, kv_heads, context]``."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        context: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: str,
    ):
        self.quant = quant
        self.dtype = dtype
        store = torch.int8 if quant == "int8" else dtype
        self.data = torch.zeros(layers, 2, kv_heads, context, head_dim, dtype=store, device=device)
        self.scale = torch.ones(layers, 2, kv_heads, context, dtype=dtype, device=device) if quant == "int8" else None

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., d]`` -> int8 values and one scale per vector ``[...]``."""
        s = (x.abs().amax(dim=-1).float() / 127.0).clamp(min=1e-8)
        return torch.round(x.float() / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), s

    def write_prefix(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rows ``0..T-1`` from ``k, v [kv_heads, T, d]``."""
        T = k.shape[1]
        if self.scale is None:
            self.data[layer, 0, :, :T].copy_(k)
            self.data[layer, 1, :, :T].copy_(v)
            return
        for i, x in enumerate((k, v)):
            q, s = self._quantize(x)
            self.data[layer, i, :, :T].copy_(q)
            self.scale[layer, i, :, :T].copy_(s)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The row at device position ``pos [1]`` from ``k, v [kv_heads, 1, d]``."""
        if self.scale is None:
            self.data[layer, 0].index_copy_(1, pos, k)
            self.data[layer, 1].index_copy_(1, pos, v)
            return
        for i, x in enumerate((k, v)):
            q, s = self._quantize(x)
            self.data[layer, i].index_copy_(1, pos, q)
            self.scale[layer, i].index_copy_(1, pos, s.to(self.dtype))

    def planes(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keys, values ``[kv_heads, context, d]`` and (int8) their scales ``[kv_heads, context]`` of ``layer``."""
        if self.scale is None:
            return self.data[layer, 0], self.data[layer, 1], None, None
        return self.data[layer, 0], self.data[layer, 1], self.scale[layer, 0], self.scale[layer, 1]

    def read(self, layer: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of rows ``[0, kv_len)``, ``[kv_heads, kv_len, d]`` in the computation dtype."""
        if self.scale is None:
            return self.data[layer, 0, :, :kv_len], self.data[layer, 1, :, :kv_len]
        kv = self.data[layer, :, :, :kv_len].to(self.dtype) * self.scale[layer, :, :, :kv_len].unsqueeze(-1)
        return kv[0], kv[1]
