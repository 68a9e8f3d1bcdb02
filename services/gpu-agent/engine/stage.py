"""``Stage``: a contiguous block of layers on one device, loaded from the checkpoint, with its KV cache.

The first stage holds the embedding, the last the final norm and LM head; ``runner.Engine`` chains
them. See docs/engine-internals.md#stages.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from iserve.checkpoint import Checkpoint, embed_name, final_norm_names, head_names, layer_prefix, layer_tensor_shapes
from iserve.errors import BadRequest, UnsupportedModel

from . import kernels
from .compact import build_compact, every_tensor, is_plain
from .kv_cache import KVCache
from .layers import DecoderLayer, LayerFormat, rms_norm, rope_tables
from .pruning import prune_structured, pruned_counts
from .tensors import TensorCache, load_tensors
from .tp import TensorParallel


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


class Stage:
    """Layers ``[first_layer, first_layer + num_layers)`` of a model on one device, with their KV cache.

    The first stage (``first_layer == 0``) takes token ids and holds the embedding; the last one
    (ending at the model's last layer) holds the final norm and the LM head and returns float32 logits.
    Any other stage takes and returns hidden states ``[T, hidden]``. With tensor parallelism this is
    one rank's share of the stage (``tp``); every rank returns the same full result.
    """

    def __init__(
        self,
        ck: Checkpoint,
        device: torch.device,
        first_layer: int,
        num_layers: int,
        *,
        context_tokens: int,
        dtype: torch.dtype,
        weight_quant: str = "fp16",
        kv_quant: str = "fp16",
        pruning: str = "none",
        tp: TensorParallel | None = None,
        tensors: TensorCache | None = None,
    ):
        arch = ck.arch
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.tp = tp or TensorParallel()
        self.first_layer = first_layer
        self.num_layers = num_layers
        self.is_first = first_layer == 0
        self.is_last = first_layer + num_layers == arch.num_layers
        self.context_tokens = context_tokens
        self.window = sliding_window_of(ck.config)
        self.is_moe = arch.family == "mixtral"
        load_device = str(device)

        def load(names: list[str], strip: str = "") -> dict[str, torch.Tensor]:
            raw = load_tensors(ck, names, device=load_device, cache=tensors)
            return {n[len(strip) :]: t.to(dtype) for n, t in raw.items()}

        # Vocab-parallel embedding / LM head: this rank's rows [vocab_start, vocab_start + vocab_rows).
        self.vocab_rows = -(-arch.vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.vocab_rows

        def vocab_shard(w: torch.Tensor) -> torch.Tensor:  # a [vocab, hidden] weight or a [vocab] bias
            if self.tp.size == 1:
                return w
            part = w[self.vocab_start : self.vocab_start + self.vocab_rows]
            pad = (
                (0, 0, 0, self.vocab_rows - part.shape[0]) if part.dim() == 2 else (0, self.vocab_rows - part.shape[0])
            )
            return F.pad(part, pad).contiguous()

        emb = embed_name(arch)
        self.embed = vocab_shard(load([emb])[emb]) if self.is_first else None
        fmt = LayerFormat(weight_quant, pruning == "2:4", dtype)
        self.layers: list = []
        names = list(layer_tensor_shapes(arch))
        for i in range(first_layer, first_layer + num_layers):
            # One layer at a time, so that fusing and converting never hold more than one layer twice.
            p = layer_prefix(i, arch)

            def build(p: str = p) -> Any:
                return self._build_layer(load([p + n for n in names], strip=p), fmt, pruning)

            self.layers.append(build_compact(device, build))
        # The final norm (LayerNorm families: weight and bias) and the LM head (some with a bias).
        self.norm = self.norm_bias = self.lm_head = self.lm_head_bias = None
        if self.is_last:
            norm_names = final_norm_names(arch)
            t = load(norm_names)
            self.norm = t[norm_names[0]]
            self.norm_bias = t[norm_names[1]] if len(norm_names) > 1 else None
            if arch.tie_embeddings:
                self.lm_head = self.embed if self.embed is not None else vocab_shard(load([emb])[emb])
            else:
                heads = head_names(arch)
                t = load(heads)
                self.lm_head = vocab_shard(t[heads[0]])
                if len(heads) > 1:
                    self.lm_head_bias = vocab_shard(t[heads[1]])

        # Static state: KV cache, RoPE tables, and the decode position buffer.
        _, kv_heads, _ = pruned_counts(arch, pruning)
        _, local_kv = self.tp.split(kv_heads, "the number of KV heads")
        self._kv_shape = (local_kv, context_tokens, arch.head_dim, dtype, device, kv_quant)
        self.cache = KVCache(num_layers, *self._kv_shape)
        self.cos, self.sin = self._rope_tables(context_tokens, device, dtype)
        self.positions = torch.arange(context_tokens, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.replayed_from = 0  # > 0: ``replay`` runs these loaded layers cyclically
        self.replay_copies = 0
        # Decode through the fused Triton kernels (the engine turns this on after checking them).
        self.fused = False
        self.splits = kernels.attention_splits(local_kv, context_tokens)

    def replay(self, depth: int, *, distinct: bool = False) -> None:
        """Profiling only: run this stage's layers cyclically as ``depth`` layers (layer ``i`` is
        loaded layer ``i mod n``), each with KV cache rows of its own. With ``distinct`` the replayed
        layers past the loaded ones are copies with tensors of their own where they can be and fit
        (``replay_copies`` says how many). See docs/engine-internals.md#replay."""
        if depth < 1:
            raise BadRequest(f"replay depth must be at least 1, not {depth}.")
        real = self.unique_layers()
        extra = max(0, depth - len(real))
        copies = (
            distinct
            and extra > 0
            and all(every_tensor(x, is_plain) for x in real)
            and self._room_for(real, extra, depth)
        )
        layers = []
        for i in range(depth):
            layer = real[i % len(real)]
            if copies and i >= len(real):
                with torch.inference_mode():
                    layer = copy.deepcopy(layer, {id(self.tp): self.tp})  # the TP group stays shared
            layers.append(layer)
        self.layers = layers
        self.replayed_from = len(real)
        self.replay_copies = extra if copies else 0
        self.cache = KVCache(depth, *self._kv_shape)

    def release_cache(self) -> None:
        """Shrink the static KV cache to one position (the batching engine keeps its own pool)."""
        self.cache = KVCache(len(self.layers), self._kv_shape[0], 1, *self._kv_shape[2:])

    def _room_for(self, real: list, extra: int, depth: int) -> bool:
        """Whether ``extra`` copies of the layers (cycling through ``real``) and a ``depth``-layer KV
        cache fit this device's free memory, with a GiB to spare; always on the CPU."""
        if self.device.type != "cuda":
            return True
        per_layer = [sum(t.numel() * t.element_size() for t in x.tensors()) for x in real]
        need = sum(per_layer[i % len(real)] for i in range(len(real), len(real) + extra))
        need += self.cache.nbytes // max(1, self.cache.data.shape[0]) * depth + (1 << 30)  # the new cache, and a GiB
        free, _ = torch.cuda.mem_get_info(self.device)
        return need <= free

    def _build_layer(self, t: dict[str, torch.Tensor], fmt: LayerFormat, pruning: str):
        """One hidden layer from its checkpoint tensors (names relative to the layer), in ``fmt``."""
        if pruning == "structured":
            t = prune_structured(self.arch, t)
        return DecoderLayer(self.arch, t, fmt, self.tp)

    def _rope_tables(
        self, positions: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_tables(self.arch, positions, device, dtype)

    @property
    def can_fuse(self) -> bool:
        """Whether the fused decode kernels apply: where their attention kernel runs, for a dense MLP."""
        return not self.is_moe and kernels.attention_runs(self.device, self.arch.head_dim)

    # -- accounting ------------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.norm, self.norm_bias, self.lm_head_bias) if t is not None]
        if self.lm_head is not None and self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.unique_layers():
            out += layer.tensors()
        return out

    def unique_layers(self) -> list:
        """The layers, each once (a replayed stage runs some several times; distinct copies count)."""
        seen: set[int] = set()
        return [layer for layer in self.layers if not (id(layer) in seen or seen.add(id(layer)))]  # type: ignore[func-returns-value]

    def kernels(self) -> dict[str, int]:
        """How many of this stage's projections run on each kernel."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for lin in layer.linears():
                out[lin.kernel] = out.get(lin.kernel, 0) + 1
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def buffer_bytes(self) -> int:
        """RoPE tables and position buffers."""
        return sum(t.numel() * t.element_size() for t in (self.cos, self.sin, self.positions, self.pos))

    @property
    def accounted_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.buffer_bytes

    # -- passes ----------------------------------------------------------------------------------

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_first:
            return x.to(device=self.device, dtype=self.dtype)
        ids = x.to(self.device)
        assert self.embed is not None  # the first stage holds the embedding
        if self.tp.size == 1:
            return F.embedding(ids, self.embed)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_rows)
        h = F.embedding(local.clamp(0, self.vocab_rows - 1), self.embed).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(h)

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_last:
            return x
        assert self.norm is not None and self.lm_head is not None  # the last stage holds them
        logits = F.linear(rms_norm(x, self.norm, self.arch.rms_norm_eps), self.lm_head)
        if self.tp.collectives:
            logits = self.tp.all_gather_columns(logits)[:, : self.arch.vocab_size]
        return logits.float()

    @torch.inference_mode()
    def prefill(
        self, x: torch.Tensor, *, all_positions: bool = False, last: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run positions ``0..T-1``: ``x`` is token ids ``[T]`` (first stage) or hidden ``[T, hidden]``.

        Returns hidden ``[T, hidden]``, or on the last stage float32 logits: ``[T, vocab]`` with
        ``all_positions``, else ``[1, vocab]`` for the last position only, or for position ``last``
        (a device tensor ``[1]``) when given: a prompt padded at its end to a captured graph's length
        (the padding comes after every real token, so causal attention keeps it out of their results;
        its cache rows are overwritten by the decode steps that reach them).
        """
        h = self._input(x)
        T = h.shape[0]
        cos, sin = self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1)
        mask = None
        if self.window is not None and T > self.window:
            i = self.positions[:T].unsqueeze(1)
            j = self.positions[:T].unsqueeze(0)
            mask = (j <= i) & (i - j < self.window)
        for n, layer in enumerate(self.layers):
            h = layer.prefill(h, cos, sin, self.cache, n, mask)
        if self.is_last and not all_positions:
            h = h[-1:] if last is None else h.index_select(0, last)
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
        rows count. With ``fused`` set, the Triton kernels run instead and ``kv_len`` is not used.
        """
        h = self._input(x)
        if self.fused:  # attention reads rows [0, pos] itself: kv_len and the mask do not apply
            for n, layer in enumerate(self.layers):
                h = layer.decode_fused(h, self.cos, self.sin, self.cache, n, self.pos, self.window or 0, self.splits)
            return self._output(h)
        cos = self.cos.index_select(0, self.pos).unsqueeze(1)
        sin = self.sin.index_select(0, self.pos).unsqueeze(1)
        mask = None
        if masked:
            keys = self.positions[:kv_len]
            valid = keys <= self.pos
            if self.window is not None:
                valid &= keys > self.pos - self.window
            mask = valid.view(1, 1, 1, kv_len)
        for n, layer in enumerate(self.layers):
            h = layer.decode(h, cos, sin, self.cache, n, self.pos, kv_len, mask)
        return self._output(h)
