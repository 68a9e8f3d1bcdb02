"""Weight formats of the engine's linear layers: fp16, int8, int4 and 2:4 sparse, on CPU and CUDA.

``make_linear(w, weight_quant, sparse_24)`` turns a dense ``[out, in]`` weight into a ``Linear``:
``lin(x)`` is ``x @ W.T``, ``lin.add_to(r, x)`` is ``r + x @ W.T``; ``lin.kernel`` names the kernel.

See docs/engine-internals.md#weight-formats.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from . import kernels

INT4_GROUP = 128
GEMV_MAX_ROWS = 4  # inputs with at most this many rows use the GEMV kernel on CUDA
# int8 inputs of more rows, up to this many, use the int8 GEMM kernel (weights widened in registers);
# larger ones (prefill) dequantize the weight once and run cuBLAS, which is compute-bound there.
INT8_GEMM_MAX_ROWS = 256


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude values of every 4 consecutive columns of each row (ties: the
    first ones); the input size must be a multiple of 4."""
    rows, cols = w.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs the input size to be a multiple of 4, not {cols}")
    g = w.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool)
    top = g.abs().float().topk(2, dim=-1).indices
    keep.scatter_(-1, top, True)
    return (g * keep).reshape(rows, cols)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: returns ``q [out, in]`` int8 and ``scale [out]`` float32."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: ``q [out, in]`` uint8 in 0..15, ``scale`` and ``zero``
    ``[out, in / group]`` float32, with ``w ~ (q - 8) * scale + zero``. ``in`` must be a multiple
    of ``group`` (pad first)."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6)
    zero = lo + 8.0 * scale
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return q.reshape(rows, cols), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    rows, cols = q.shape
    groups = scale.shape[1]
    g = q.reshape(rows, groups, cols // groups).float()
    return ((g - 8.0) * scale[..., None] + zero[..., None]).reshape(rows, cols).to(dtype)


class Linear(abc.ABC):
    """``y = x @ W.T`` for ``x [T, in]``; subclasses hold ``W`` in one format."""

    kernel = ""
    out_features = 0
    in_features = 0
    # Whether rows of padding cost little: at a few hundred rows the kernel reads its weights once
    # whatever the row count, so a prompt padded to a captured prefill graph's length runs about as
    # fast (``graphs.prefill_buckets``).
    pads_cheaply = True

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T``."""

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + x @ W.T``."""
        return residual + self(x)

    @abc.abstractmethod
    def tensors(self) -> list[torch.Tensor]:
        """What the format stores (for memory accounting)."""

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(weight, per-row scale or None)`` when the Triton GEMV of ``kernels.py`` can run this
        format (CUDA, 16-bit or int8 values), else None."""
        return None


class DenseLinear(Linear):
    """A 16/32-bit matrix: cuBLAS on CUDA, with the residual add fused into ``addmm``."""

    def __init__(self, w: torch.Tensor, kernel: str = "dense"):
        self.w = w.contiguous()
        self.out_features, self.in_features = w.shape
        self.kernel = kernel

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(residual, x, self.w.t())

    def tensors(self) -> list[torch.Tensor]:
        return [self.w]

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.w.device.type == "cuda" and self.w.dtype in (torch.float16, torch.bfloat16) and kernels.available():
            return self.w, None
        return None


class Int8Linear(Linear):
    """``scale`` (optional): per-row scales to use instead of this matrix's own, e.g. those of the
    whole matrix when this is a row-parallel shard, so that every TP degree stores the same values."""

    def __init__(self, w: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None):
        self.out_features, self.in_features = w.shape
        if scale is None:
            self.q, scale = quantize_int8(w)
        else:
            self.q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(dtype)
        self.dtype = dtype
        self.cuda = w.device.type == "cuda"
        if self.cuda and not kernels.available():
            raise RuntimeError("int8 weights on CUDA need Triton (the `triton` package), which does not import here")
        cuda_kernel = "int8 triton gemv (<= 4 rows) / int8 triton gemm (<= 256) / dequant+cublas (prefill)"
        self.kernel = cuda_kernel if self.cuda else "torch._weight_int8pack_mm"

    def _dequantized(self) -> torch.Tensor:
        return self.q.to(self.dtype) * self.scale[:, None]

    @staticmethod
    def _gemm(x: torch.Tensor) -> bool:
        """Whether the int8 GEMM takes ``x`` (16-bit: in float32 ``tl.dot`` would round to TF32)."""
        return x.shape[0] <= INT8_GEMM_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return torch._weight_int8pack_mm(x, self.q, self.scale)
        if x.shape[0] <= GEMV_MAX_ROWS:
            return kernels.gemv(x, self.q, self.scale)
        if self._gemm(x):
            return kernels.int8_gemm(x, self.q, self.scale)
        return F.linear(x, self._dequantized())

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.cuda and x.shape[0] <= GEMV_MAX_ROWS:
            return kernels.gemv(x, self.q, self.scale, residual)
        if self.cuda and self._gemm(x):
            return kernels.int8_gemm(x, self.q, self.scale, residual)
        if self.cuda:
            return torch.addmm(residual, x, self._dequantized().t())
        return residual + self(x)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]

    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        return (self.q, self.scale) if self.cuda else None


class Int4Linear(Linear):
    # tinygemm's time grows with the padded rows, so int4 prefill stays eager
    # (results/2026-11-22-h100-bench-prefill/).
    pads_cheaply = False

    def __init__(self, w: torch.Tensor, dtype: torch.dtype):
        self.out_features, self.in_features = w.shape
        self.dtype = dtype
        pad = -self.in_features % INT4_GROUP
        self.padded_in = self.in_features + pad
        if pad:
            w = F.pad(w, (0, pad))
        q, scale, zero = quantize_int4(w)
        self.cuda = w.device.type == "cuda"
        if self.cuda:
            if self.out_features % 8:
                raise RuntimeError(f"int4 on CUDA needs the output size to be a multiple of 8, not {self.out_features}")
            packed_bytes = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
            self.packed = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, 8)
            self.scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self.kernel = "torch._weight_int4pack_mm (tinygemm, bf16)"
        else:
            self.packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # two values per byte
            self.scale, self.zero = scale, zero
            self.kernel = "int4 reference (unpack + dequantize per call)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded_in != self.in_features:
            x = F.pad(x, (0, self.padded_in - self.in_features))
        if self.cuda:
            y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16), self.packed, INT4_GROUP, self.scales_zeros)
            return y.to(x.dtype)
        q = torch.stack((self.packed >> 4, self.packed & 0xF), dim=-1).reshape(self.out_features, self.padded_in)
        return F.linear(x, dequantize_int4(q, self.scale, self.zero, x.dtype))

    def tensors(self) -> list[torch.Tensor]:
        if self.cuda:
            return [self.packed, self.scales_zeros]
        return [self.packed, self.scale, self.zero]


class Sparse24Linear(Linear):
    """A 2:4-pruned 16-bit matrix in the semi-structured sparse format (CUDA)."""

    def __init__(self, w_pruned: torch.Tensor):
        from torch.sparse import to_sparse_semi_structured

        self.out_features, self.in_features = w_pruned.shape
        self.w = to_sparse_semi_structured(w_pruned.contiguous())
        self.kernel = "2:4 semi-structured (CUTLASS)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)

    def tensors(self) -> list[torch.Tensor]:
        parts = ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask")
        return [t for t in (getattr(self.w, name, None) for name in parts) if isinstance(t, torch.Tensor)]


def int8_row_scales(w: torch.Tensor, sparse_24: bool) -> torch.Tensor:
    """The int8 per-row scales of a whole matrix (2:4-pruned first when ``sparse_24``)."""
    return quantize_int8(prune_2_4(w) if sparse_24 else w)[1]


def make_linear(
    w: torch.Tensor, weight_quant: str, sparse_24: bool, dtype: torch.dtype, int8_scale: torch.Tensor | None = None
) -> Linear:
    """The ``Linear`` for dense weight ``w [out, in]`` (on its device, in ``dtype``); ``int8_scale``:
    see ``Int8Linear``."""
    if sparse_24:
        w = prune_2_4(w)
    if weight_quant == "int8":
        return Int8Linear(w, dtype, int8_scale)
    if weight_quant == "int4":
        return Int4Linear(w, dtype)
    if sparse_24 and w.device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            return Sparse24Linear(w)
        except (RuntimeError, ValueError):
            return DenseLinear(w, kernel="dense (2:4-pruned; shape refused by the sparse kernel)")
    return DenseLinear(w, kernel="dense (2:4-pruned)" if sparse_24 else "dense")
