"""The decoder itself: Llama-family and Mixtral layers, split into pipeline stages.

Families (``ArchSpec.family``):

* ``llama``: Llama 1/2/3, Mistral, Qwen2. RMSNorm, rotary position embeddings (RoPE, with
  ``rope_theta`` and the ``linear`` and ``llama3`` ``rope_scaling`` types), grouped-query attention
  (GQA), optional q/k/v biases (Qwen2), SwiGLU MLP. Mistral's sliding-window attention is honoured.
* ``mixtral``: the same attention, with a sparse mixture-of-experts MLP: a router picks the top-k
  experts per token (softmax, then the k weights renormalized to sum to 1), each a SwiGLU MLP.

Weights follow the Hugging Face layout and math (``rotate_half`` RoPE, RMSNorm statistics in float32),
so a real checkpoint gives the same logits as ``transformers`` (up to rounding in half precision).
For fewer kernel launches per token, q/k/v and gate/up projections are fused into one matrix each, q
and k are rotated together, and the residual additions ride on ``addmm``.

A ``Stage`` holds a contiguous block of layers ``[first, first + n)`` on one torch device, plus the
token embedding when it is the first stage and the final norm and LM head when it is the last. It
reads only its own tensors from the safetensors shards, straight onto its device, and owns a static
KV cache for ``context_tokens`` positions: one tensor ``[n, 2, kv_heads, context, head_dim]``. The
engine (``runner.py``) chains the stages, moving the hidden state from one device to the next.

Two passes, batch size 1:

* ``Stage.prefill``: the whole prompt at once (positions ``0..T-1``), causal
  ``scaled_dot_product_attention``; writes the prompt's keys and values into the cache.
* ``Stage.decode``: one token at the position held in the stage's ``pos`` buffer; writes its key and
  value with ``index_copy_`` and attends over cache rows ``[0, kv_len)``, optionally under a mask
  computed on the device from ``pos``. All tensors it touches are preallocated and the position is a
  device tensor, so with the mask on and a fixed ``kv_len`` the dense decode step is a pure function
  of the (token, position) buffers, ready for CUDA graph capture. (The Mixtral router reads its expert choice back to the host in decode, which graph
  capture would have to replace by a gather over stacked expert weights.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from iserve.checkpoint import Checkpoint, layer_prefix, layer_tensor_shapes, load_tensors
from iserve.errors import UnsupportedModel
from iserve.messages import ArchSpec

# ---------------------------------------------------------------------------------------------------
# rotary position embeddings


def rope_inv_freq(arch: ArchSpec) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float32, CPU), after the config's ``rope_scaling``."""
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return inv_freq
    if kind == "linear":
        # Position interpolation: position p behaves like p / factor.
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend smoothly in between.
        factor = float(scaling["factor"])
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_len / low_ff
        high_freq_wavelen = old_len / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise UnsupportedModel(
        f"rope_scaling type {kind!r} is not supported by the torch engine (supported: default, linear, llama3); "
        "use a checkpoint without it or another engine."
    )


def rope_tables(arch: ArchSpec, positions: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and signed ``sin`` tables ``[positions, head_dim]`` for ``apply_rope``.

    Hugging Face's ``rotate_half`` form is ``x * cos + cat(-x2, x1) * sin`` with ``x = (x1, x2)``; the
    sign is folded into the table (``sin`` is ``(-s, s)``) so that applying it is one ``cat`` and
    two arithmetic kernels.
    """
    inv_freq = rope_inv_freq(arch)
    t = torch.arange(positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    cos = torch.cat((freqs.cos(), freqs.cos()), dim=-1)
    sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1)
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, head_dim]`` by the tables of ``rope_tables``, sliced to ``[T, 1, head_dim]``."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, sin)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (one fused op; statistics in float32 for half inputs)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def sliding_window_of(config: dict[str, Any]) -> int | None:
    """The attention window in tokens, or None for full causal attention."""
    model_type = config.get("model_type")
    if model_type == "qwen2":
        if config.get("use_sliding_window"):
            raise UnsupportedModel(
                "Qwen2 checkpoints with use_sliding_window=true are not supported by the torch engine; "
                "set use_sliding_window to false in config.json (the released Qwen2 models do)."
            )
        return None
    window = config.get("sliding_window")
    if model_type in ("mistral", "mixtral") and window:
        return int(window)
    return None


# ---------------------------------------------------------------------------------------------------
# layers


class DenseMLP:
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, with gate and up fused into one matrix."""

    def __init__(self, t: dict[str, torch.Tensor]):
        self.w_gate_up = torch.cat((t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"]))
        self.w_down = t["mlp.down_proj.weight"]

    def tensors(self) -> list[torch.Tensor]:
        return [self.w_gate_up, self.w_down]

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate(x)) * up(x)``, the input of the down projection."""
        gate, up = F.linear(x, self.w_gate_up).chunk(2, dim=-1)
        return F.silu(gate) * up

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(x), self.w_down)


class MoEMLP:
    """Mixtral's sparse MLP: each token goes to its top-k experts, outputs weighted by the router."""

    def __init__(self, arch: ArchSpec, t: dict[str, torch.Tensor]):
        self.top_k = arch.experts_per_token
        self.w_router = t["block_sparse_moe.gate.weight"]
        self.experts: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e in range(arch.num_experts):
            p = f"block_sparse_moe.experts.{e}."
            w13 = torch.cat((t[p + "w1.weight"], t[p + "w3.weight"]))  # w1 = gate, w3 = up
            self.experts.append((w13, t[p + "w2.weight"]))

    def tensors(self) -> list[torch.Tensor]:
        return [self.w_router] + [w for pair in self.experts for w in pair]

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.experts[e]
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(F.linear(x, self.w_router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        if x.shape[0] == 1:
            # Decode: one token, k experts; reading the k ids back is cheaper than any masking.
            out = None
            for j, e in enumerate(chosen[0].tolist()):
                y = self._expert(e, x) * weights[0, j]
                out = y if out is None else out + y
            return out
        out = torch.zeros_like(x)
        for e in range(len(self.experts)):
            rows, slot = torch.where(chosen == e)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, self._expert(e, x[rows]) * weights[rows, slot].unsqueeze(-1))
        return out


class DecoderLayer:
    """One transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    q, k and v projections are fused into one matrix ``w_qkv`` (and bias) so that each attention
    costs two matrix multiplications. Masks (causal, sliding window) are built by the ``Stage`` once
    for all its layers.
    """

    def __init__(self, arch: ArchSpec, t: dict[str, torch.Tensor]):
        self.eps = arch.rms_norm_eps
        self.heads = arch.num_attention_heads
        self.kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.groups = self.heads // self.kv_heads
        self.q_size = self.heads * self.head_dim
        self.kv_size = self.kv_heads * self.head_dim
        self.ln_attn = t["input_layernorm.weight"]
        self.ln_mlp = t["post_attention_layernorm.weight"]
        self.w_qkv = torch.cat((t["self_attn.q_proj.weight"], t["self_attn.k_proj.weight"], t["self_attn.v_proj.weight"]))
        self.b_qkv = (
            torch.cat((t["self_attn.q_proj.bias"], t["self_attn.k_proj.bias"], t["self_attn.v_proj.bias"]))
            if arch.attention_bias
            else None
        )
        self.w_o = t["self_attn.o_proj.weight"]
        self.mlp: DenseMLP | MoEMLP = MoEMLP(arch, t) if arch.family == "mixtral" else DenseMLP(t)

    def tensors(self) -> list[torch.Tensor]:
        own = [self.ln_attn, self.ln_mlp, self.w_qkv, self.w_o] + ([self.b_qkv] if self.b_qkv is not None else [])
        return own + self.mlp.tensors()

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and rotate: q ``[T, heads, d]``, k and v ``[T, kv_heads, d]``.

        q and k are adjacent in the fused projection, so one RoPE application rotates both.
        """
        T = x.shape[0]
        qkv = F.linear(rms_norm(x, self.ln_attn, self.eps), self.w_qkv, self.b_qkv)
        qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(T, self.heads + self.kv_heads, self.head_dim), cos, sin)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.kv_heads, self.head_dim)
        return qk[:, : self.heads], qk[:, self.heads:], v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection and MLP, each added to the residual stream (``addmm`` fuses the add)."""
        x = torch.addmm(x, attn, self.w_o.t())
        h = rms_norm(x, self.ln_mlp, self.eps)
        if isinstance(self.mlp, DenseMLP):
            return torch.addmm(x, self.mlp.hidden(h), self.mlp.w_down.t())
        return x + self.mlp(h)

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """``x [T, hidden]`` at positions ``0..T-1``; fills ``cache [2, kv_heads, context, d]`` rows ``0..T-1``.

        ``mask`` is None for plain causal attention, or a boolean ``[T, T]`` (sliding window).
        """
        T = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)
        k = k.transpose(0, 1)  # [kv_heads, T, d]
        v = v.transpose(0, 1)
        cache[0, :, :T].copy_(k)
        cache[1, :, :T].copy_(v)
        if self.groups > 1:
            # GQA: kv head j serves query heads j*groups .. j*groups + groups-1 (Hugging Face's repeat_kv).
            k = k.repeat_interleave(self.groups, dim=0)
            v = v.repeat_interleave(self.groups, dim=0)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0),
            attn_mask=mask, is_causal=mask is None,
        )  # [1, heads, T, d]
        return self._finish(x, out[0].transpose(0, 1).reshape(T, self.q_size))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
               pos: torch.Tensor, kv_len: int, mask: torch.Tensor | None) -> torch.Tensor:
        """``x [1, hidden]`` at position ``pos`` (device tensor ``[1]``); attends over cache rows ``[0, kv_len)``
        under ``mask`` (boolean, broadcast over heads; None: all ``kv_len`` rows).

        GQA without copying the cache: the ``groups`` query heads that share a kv head are laid out
        as that head's query rows, ``q [1, kv_heads, groups, d]`` against ``k [1, kv_heads, kv_len, d]``.
        """
        q, k, v = self._qkv(x, cos, sin)
        cache[0].index_copy_(1, pos, k.transpose(0, 1))
        cache[1].index_copy_(1, pos, v.transpose(0, 1))
        q = q.view(1, self.kv_heads, self.groups, self.head_dim)
        out = F.scaled_dot_product_attention(
            q, cache[0, :, :kv_len].unsqueeze(0), cache[1, :, :kv_len].unsqueeze(0), attn_mask=mask
        )  # [1, kv_heads, groups, d]
        return self._finish(x, out.reshape(1, self.q_size))


# ---------------------------------------------------------------------------------------------------
# pipeline stage


class Stage:
    """Layers ``[first_layer, first_layer + num_layers)`` of a model on one device, with their KV cache.

    The first stage (``first_layer == 0``) takes token ids and holds the embedding; the last one
    (ending at the model's last layer) holds the final norm and the LM head and returns float32 logits.
    Any other stage takes and returns hidden states ``[T, hidden]``.
    """

    def __init__(self, ck: Checkpoint, device: torch.device, first_layer: int, num_layers: int, *,
                 context_tokens: int, dtype: torch.dtype):
        arch = ck.arch
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.is_first = first_layer == 0
        self.is_last = first_layer + num_layers == arch.num_layers
        self.context_tokens = context_tokens
        self.window = sliding_window_of(ck.config)
        load_device = str(device)

        def load(names: list[str], strip: str = "") -> dict[str, torch.Tensor]:
            raw = load_tensors(ck, names, device=load_device)
            return {n[len(strip):]: t.to(dtype) for n, t in raw.items()}

        self.embed = load(["model.embed_tokens.weight"])["model.embed_tokens.weight"] if self.is_first else None
        self.layers: list[DecoderLayer] = []
        names = list(layer_tensor_shapes(arch))
        for i in range(first_layer, first_layer + num_layers):
            # One layer at a time, so that fusing (torch.cat) never holds more than one layer twice.
            p = layer_prefix(i)
            self.layers.append(DecoderLayer(arch, load([p + n for n in names], strip=p)))
        self.norm = self.lm_head = None
        if self.is_last:
            self.norm = load(["model.norm.weight"])["model.norm.weight"]
            if arch.tie_embeddings:
                self.lm_head = self.embed if self.embed is not None else load(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
            else:
                self.lm_head = load(["lm_head.weight"])["lm_head.weight"]

        # Static state: KV cache, RoPE tables, and the decode position buffer.
        self.cache = torch.zeros(num_layers, 2, arch.num_kv_heads, context_tokens, arch.head_dim, dtype=dtype, device=device)
        self.cos, self.sin = rope_tables(arch, context_tokens, device, dtype)
        self.positions = torch.arange(context_tokens, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    # -- accounting ------------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.norm) if t is not None]
        if self.lm_head is not None and self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.layers:
            out += layer.tensors()
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @property
    def cache_bytes(self) -> int:
        return self.cache.numel() * self.cache.element_size()

    @property
    def buffer_bytes(self) -> int:
        """RoPE tables and position buffers."""
        return sum(t.numel() * t.element_size() for t in (self.cos, self.sin, self.positions, self.pos))

    @property
    def accounted_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.buffer_bytes

    # -- passes ----------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_first:
            return F.embedding(x.to(self.device), self.embed)
        return x.to(device=self.device, dtype=self.dtype)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            return x
        return F.linear(rms_norm(x, self.norm, self.arch.rms_norm_eps), self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, x: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """Run positions ``0..T-1``: ``x`` is token ids ``[T]`` (first stage) or hidden ``[T, hidden]``.

        Returns hidden ``[T, hidden]``, or on the last stage float32 logits: ``[T, vocab]`` with
        ``all_positions``, else ``[1, vocab]`` for the last position only.
        """
        h = self._input(x)
        T = h.shape[0]
        cos, sin = self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1)
        mask = None
        if self.window is not None and T > self.window:
            i = self.positions[:T].unsqueeze(1)
            j = self.positions[:T].unsqueeze(0)
            mask = (j <= i) & (i - j < self.window)
        for layer, cache in zip(self.layers, self.cache):
            h = layer.prefill(h, cos, sin, cache, mask)
        if self.is_last and not all_positions:
            h = h[-1:]
        return self._output(h)

    def needs_mask(self, pos: int, kv_len: int) -> bool:
        """Whether attention over cache rows ``[0, kv_len)`` at position ``pos`` must mask rows out."""
        return kv_len > pos + 1 or (self.window is not None and pos + 1 > self.window)

    @torch.inference_mode()
    def decode(self, x: torch.Tensor, kv_len: int, masked: bool = True) -> torch.Tensor:
        """One token at position ``self.pos``: ``x`` is the token id ``[1]`` or hidden ``[1, hidden]``.

        ``kv_len`` (> position) is how many cache rows attention reads. With ``masked``, rows past the
        position (and outside a sliding window) are masked out on the device, so any ``kv_len`` up to
        ``context_tokens`` gives the same result (what a captured graph needs); the eager caller
        passes ``kv_len = position + 1`` and ``masked = needs_mask(...)``, skipping the mask when all
        rows count.
        """
        h = self._input(x)
        cos = self.cos.index_select(0, self.pos).unsqueeze(1)
        sin = self.sin.index_select(0, self.pos).unsqueeze(1)
        mask = None
        if masked:
            keys = self.positions[:kv_len]
            valid = keys <= self.pos
            if self.window is not None:
                valid &= keys > self.pos - self.window
            mask = valid.view(1, 1, 1, kv_len)
        for layer, cache in zip(self.layers, self.cache):
            h = layer.decode(h, cos, sin, cache, self.pos, kv_len, mask)
        return self._output(h)
