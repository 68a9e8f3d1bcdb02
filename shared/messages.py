"""The wire contract: every message iServe sends over NATS or stores in JetStream.

Rules (see docs/architecture.md):

* Every top-level message is a tagged ``msgspec.Struct`` (field ``type``), encoded as JSON, and is
  validated on decode: a wrong type or a missing required field raises ``msgspec.ValidationError``,
  which the bus adapters turn into an ``ErrorReply`` with code ``bad_request``.
* Append-only: a new field always has a default, fields are never renamed or retyped, and unknown
  fields are ignored on decode, so an older service reads a newer message and the other way round.
* Nested value types (``Configuration``, ``StageSpec``, ...) are untagged structs.
* Closed vocabularies are ``Literal`` aliases defined once below (``values(IntentKind)`` lists one);
  counts, token lengths, SLOs and budgets carry ``msgspec.Meta`` bounds. The decoder rejects a value
  outside them with its path, e.g. "Expected `int` >= 1 - at `$.max_tokens`".
"""

from __future__ import annotations

import functools
import time
from typing import Annotated, Any, Literal, TypeVar, cast, get_args

import msgspec
from msgspec import Meta

# ---------------------------------------------------------------------------------------------------
# vocabularies and bounded numbers


def values(alias: Any) -> tuple[Any, ...]:
    """The strings of a ``Literal`` alias, in their declared order (nested aliases flattened)."""
    return get_args(alias)


PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegFloat = Annotated[float, Meta(ge=0)]
Probability = Annotated[float, Meta(gt=0, le=1)]  # a fraction that must keep something, e.g. top_p
# Bounds checked on decode, before any work: no model has a longer context than MAX_TOKENS, no request
# waits longer than a day, replies go only to inboxes (never onto a system subject), and ids that
# become file or subject names are names (no path separators, no wildcards).
MAX_TOKENS = 1 << 20
TokenCount = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
TokenCountOrZero = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
Seconds = Annotated[float, Meta(gt=0, le=86_400)]
RequestRate = Annotated[float, Meta(ge=0, le=1e6)]  # requests/s
Percentile = Annotated[float, Meta(ge=50, lt=100)]
Inbox = Annotated[str, Meta(pattern=r"^(_INBOX\.[A-Za-z0-9_.-]+)?$", max_length=256)]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=200)]
NameOrEmpty = Annotated[str, Meta(pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$", max_length=160)]

# Architecture families whose tensor layout iServe knows (config.json's model_type maps onto one).
Family = Literal["llama", "mixtral", "falcon", "gptj", "gpt_neox"]
NormType = Literal["rms", "layer"]  # RMSNorm, or LayerNorm with bias
Activation = Literal["silu", "gelu", "gelu_tanh"]  # MLP activation; "gelu" is the exact one
QkvLayout = Literal["separate", "grouped", "per_head"]  # q/k/v tensors, or one fused: Falcon, NeoX
ModelStatus = Literal["registered", "profiling", "profiled", "failed"]

WeightQuant = Literal["fp16", "int8", "int4"]
KvQuant = Literal["fp16", "int8"]
Pruning = Literal["none", "2:4", "structured"]
# How an estimate was obtained: fitted on fingerprints (L2/M2), TP modelled from TP=1 plus the
# communication model, measured, or any of those moved to another GPU type; "accelerate-fsdp" is a baseline.
EstimateMethod = Literal[
    "fingerprint",
    "fingerprint+comm",
    "measured",
    "fingerprint+translated",
    "fingerprint+comm+translated",
    "measured+translated",
    "accelerate-fsdp",
]
ProfileStatus = Literal["ok", "failed"]

WorkerState = Literal["loading", "idle", "busy"]

IntentKind = Literal["min-latency", "min-cost", "min-memory", "min-gpu-hours", "latency-slo", "cost-budget"]
CostModel = Literal["mem-x-latency", "memory", "gpu-hours"]
PlacementPolicy = Literal["hybrid", "least-loaded", "packing"]
PlacementChoice = Literal["", PlacementPolicy]  # "": the deployer's own setting
DeploymentStatus = Literal["launching", "ready", "failed", "stopped"]

FinishReason = Literal["stop", "length", "cancelled"]
ChatRole = Literal["system", "user", "assistant", "developer", "tool"]

FAMILIES: tuple[Family, ...] = values(Family)
WEIGHT_QUANTS: tuple[WeightQuant, ...] = values(WeightQuant)
KV_QUANTS: tuple[KvQuant, ...] = values(KvQuant)
PRUNINGS: tuple[Pruning, ...] = values(Pruning)
ESTIMATE_METHODS: tuple[EstimateMethod, ...] = values(EstimateMethod)
INTENT_KINDS: tuple[IntentKind, ...] = values(IntentKind)
COST_MODELS: tuple[CostModel, ...] = values(CostModel)
PLACEMENT_POLICIES: tuple[PlacementPolicy, ...] = values(PlacementPolicy)


# ---------------------------------------------------------------------------------------------------
# base types


def _tag(name: str) -> str:
    # "DeployRequest" -> "deploy_request"
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i:
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


class Message(msgspec.Struct, kw_only=True, tag_field="type", tag=_tag):
    """Base of every top-level message; ``type`` carries the class's tag."""


def now() -> float:
    return time.time()


# The codes of ``iserve.errors``; ``ErrorReply.code`` stays ``str`` so an older client reads a newer code.
ErrorCode = Literal[
    "bad_request",
    "not_found",
    "conflict",
    "bad_checkpoint",
    "unsupported_model",
    "infeasible",
    "prompt_too_long",
    "not_ready",
    "unavailable",
    "timeout",
    "overloaded",
    "worker_died",
    "cancelled",
    "internal",
]


class ErrorReply(Message):
    """A failed request. ``code`` is machine-readable (see ``iserve.errors``); ``message`` is one
    sentence that says what went wrong and what to do about it."""

    code: str
    message: str
    request_id: str = ""


# ---------------------------------------------------------------------------------------------------
# models


class ArchSpec(msgspec.Struct, kw_only=True):
    """What iServe needs to know of a decoder-only architecture, read from ``config.json``."""

    family: Family  # "llama" also covers mistral and qwen2
    model_type: str  # config.json's model_type, as written
    num_layers: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_attention_heads: PositiveInt
    num_kv_heads: PositiveInt
    head_dim: PositiveInt
    vocab_size: PositiveInt
    max_position: PositiveInt
    tie_embeddings: bool = False
    torch_dtype: str = "float16"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    num_experts: NonNegInt = 0
    experts_per_token: NonNegInt = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Appended for Falcon, GPT-J and GPT-NeoX; the defaults describe the Llama family.
    norm_type: NormType = "rms"  # its epsilon is rms_norm_eps
    activation: Activation = "silu"
    gated_mlp: bool = True  # act(gate(x)) * up(x) (Llama) rather than act(up(x)) with biases (GPT-style)
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm'(x)) in one step (GPT-J, NeoX, Falcon)
    layer_norms: int = 2  # normalization layers per hidden layer (1: attention and MLP share one)
    qkv_layout: QkvLayout = "separate"
    rotary_dim: NonNegInt = 0  # leading dimensions of each head that RoPE rotates; 0: the whole head
    rotary_interleaved: bool = False  # GPT-J's pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
    attention_out_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    # Appended: every id that ends a generation (config.json's and generation_config.json's eos
    # lists, e.g. Llama 3's three); empty: just ``eos_token_id``.
    eos_token_ids: list[int] = []


class WeightBreakdown(msgspec.Struct, kw_only=True):
    """Element counts of the checkpoint's tensors, exact from the safetensors headers.

    ``layer_*`` are per hidden layer (all layers are identical in shape). "linear" elements are the
    2-D projection matrices that weight quantization and pruning act on; "other" are norms and biases.
    """

    embed_params: int
    head_params: int  # 0 when the LM head is tied to the embedding
    final_norm_params: int
    layer_linear_params: int
    layer_other_params: int
    checkpoint_bytes: int  # bytes of tensor data on disk
    dtype_bytes: int = 2  # bytes per element as stored


class ModelRecord(msgspec.Struct, kw_only=True):
    name: str
    path: str
    arch: ArchSpec
    weights: WeightBreakdown
    digest: str  # sha256 of config.json and every safetensors header: identity of the checkpoint
    has_tokenizer: bool = False
    status: ModelStatus = "registered"
    status_reason: str = ""
    profiled_gpu_types: list[str] = []
    registered_at: float = 0.0
    updated_at: float = 0.0
    # Appended: each profiling job's step, by GPU type ("writing fingerprints", "measuring ...", "done: ..."),
    # for progress displays; empty before profiling starts.
    profiling: dict[str, str] = {}


class RegisterModel(Message):
    path: str
    name: str = ""  # defaults to the directory name


class ModelInfo(Message):
    record: ModelRecord
    created: bool = True  # False when the same checkpoint was already registered (idempotent)


class ModelRegistered(Message):
    record: ModelRecord


class GetModel(Message):
    name: str


class ListModels(Message):
    pass


class UnregisterModel(Message):
    """Forget a model and its profiles (refused while a deployment of it is launching or ready)."""

    name: str


class UnregisterReply(Message):
    name: str
    profiles_removed: int = 0


class ModelList(Message):
    models: list[ModelRecord] = []


# ---------------------------------------------------------------------------------------------------
# configurations and their estimates


class Configuration(msgspec.Struct, frozen=True, kw_only=True):
    """One deployment configuration (paper section 3): parallelism, quantization and pruning."""

    tp: PositiveInt = 1
    pp: PositiveInt = 1
    weight_quant: WeightQuant = "fp16"
    kv_quant: KvQuant = "fp16"
    pruning: Pruning = "none"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def key(self) -> str:
        return f"tp{self.tp}-pp{self.pp}-w{self.weight_quant}-kv{self.kv_quant}-p{self.pruning.replace(':', '')}"


class ConfigEstimate(msgspec.Struct, kw_only=True):
    """Estimated latency and memory of one configuration (paper L2 and M2).

    Latency: ``TTFT(p) = ttft_base_ms + ttft_per_token_ms * p + ttft_per_token2_ms * p**2`` for a
    prompt of ``p`` tokens, and ``latency = TTFT + output_tokens * tpot_ms`` (paper equation 1).

    Memory per GPU of a pipeline stage holding ``n`` layers:
    ``gpu_overhead_bytes + n * layer_bytes + (first stage: first_stage_bytes) + (last: last_stage_bytes)``,
    where ``layer_bytes`` is one layer's share on one tensor-parallel rank (weights, KV cache for
    ``context_tokens``, activations). Total memory is the sum over all ``tp * pp`` GPUs.
    """

    config: Configuration
    ttft_base_ms: float
    ttft_per_token_ms: float
    ttft_per_token2_ms: float = 0.0
    tpot_ms: float
    layer_bytes: int
    first_stage_bytes: int
    last_stage_bytes: int
    gpu_overhead_bytes: int
    total_bytes: int
    num_layers: int
    method: EstimateMethod = "fingerprint"
    # Appended (see docs/fingerprint.md). A step's cost grows with the tokens attention reads: the
    # decode step that feeds position ``pos`` costs ``tpot_ms + tpot_per_position_ms * pos`` on the
    # device. The host can be the bound instead (an engine that launches kernels one by one): then
    # the step costs ``tpot_host_ms[0] + tpot_host_ms[1] * pos`` and TTFT the polynomial
    # ``ttft_host_ms`` in the prompt length; each pass costs the larger of its two bounds. Empty
    # lists mean no host bound (older maps).
    tpot_per_position_ms: float = 0.0
    ttft_host_ms: list[float] = []
    tpot_host_ms: list[float] = []
    # Appended: a continuous-batching replica's decode step (docs/estimator.md#batched-steps), from the
    # fingerprints' batched steps: at ``batch_sizes[i]`` sequences whose mean position is ``pos`` a
    # step costs ``batch_step_ms[i] + batch_step_per_position_ms[i] * pos`` (wall time, host
    # included). Empty: not measured (older maps, derived TP variants); the roofline model applies.
    batch_sizes: list[int] = []
    batch_step_ms: list[float] = []
    batch_step_per_position_ms: list[float] = []

    def ttft_ms(self, prompt_tokens: int) -> float:
        p = float(prompt_tokens)
        device = self.ttft_base_ms + self.ttft_per_token_ms * p + self.ttft_per_token2_ms * p * p
        if not self.ttft_host_ms:
            return device
        host = sum(c * p**k for k, c in enumerate(self.ttft_host_ms))
        return max(device, host)

    def step_ms(self, position: int) -> float:
        """The decode step that feeds the token at ``position`` (0-based)."""
        pos = float(position)
        device = self.tpot_ms + self.tpot_per_position_ms * pos
        if len(self.tpot_host_ms) != 2:
            return device
        return max(device, self.tpot_host_ms[0] + self.tpot_host_ms[1] * pos)

    def tpot_for(self, prompt_tokens: int, output_tokens: int) -> float:
        """Mean time per output token after the first, for ``prompt_tokens`` in and ``output_tokens``
        out: the mean of the decode steps at positions ``prompt_tokens .. prompt_tokens + output_tokens - 2``
        (exact for the larger of two lines, in O(1))."""
        n = output_tokens - 1
        if n <= 0:
            return self.step_ms(prompt_tokens)
        lo, hi = float(prompt_tokens), float(prompt_tokens + n - 1)
        a1, b1 = self.tpot_ms, self.tpot_per_position_ms
        if len(self.tpot_host_ms) != 2:
            return a1 + b1 * (lo + hi) / 2.0
        a2, b2 = self.tpot_host_ms
        return _mean_of_max_of_lines(a1, b1, a2, b2, int(lo), int(hi))

    def latency_ms(self, prompt_tokens: int, output_tokens: int) -> float:
        # The first output token comes with the prefill; each further one costs one decode step.
        n = max(output_tokens - 1, 0)
        return self.ttft_ms(prompt_tokens) + (n * self.tpot_for(prompt_tokens, output_tokens) if n else 0.0)

    def stage_bytes(self, num_layers: int, *, first: bool, last: bool) -> int:
        b = self.gpu_overhead_bytes + num_layers * self.layer_bytes
        if first:
            b += self.first_stage_bytes
        if last:
            b += self.last_stage_bytes
        return b


def _mean_of_max_of_lines(a1: float, b1: float, a2: float, b2: float, lo: int, hi: int) -> float:
    """Mean over the integers ``x`` in ``[lo, hi]`` of ``max(a1 + b1 x, a2 + b2 x)``, in O(1)."""

    def seg_sum(a: float, b: float, x0: int, x1: int) -> float:  # sum of a + b x over x0..x1
        if x1 < x0:
            return 0.0
        k = x1 - x0 + 1
        return k * a + b * (x0 + x1) * k / 2.0

    count = hi - lo + 1
    if b1 == b2:
        return (a1 if a1 >= a2 else a2) + b1 * (lo + hi) / 2.0
    cross = (a2 - a1) / (b1 - b2)  # line 1 is above line 2 for x > cross when b1 > b2
    split = min(max(int(cross // 1), lo - 1), hi)  # last integer at or below the crossing, clamped
    upper_left, upper_right = ((a2, b2), (a1, b1)) if b1 > b2 else ((a1, b1), (a2, b2))
    total = seg_sum(*upper_left, lo, split) + seg_sum(*upper_right, split + 1, hi)
    return total / count


class ExcludedConfig(msgspec.Struct, kw_only=True):
    config: Configuration
    reason: str


class ProfilingCost(msgspec.Struct, kw_only=True):
    gpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_bytes: int = 0
    fingerprint_bytes: list[int] = []  # checkpoint bytes of the 1- and 2-layer fingerprints
    fingerprint_fraction: list[float] = []  # ... as a fraction of the full checkpoint
    nvml_peak_bytes: int = 0  # the largest process memory NVML saw while profiling (0: not available)
    measured_variants: int = 0  # variants measured on fingerprints
    # the model of TP variants not measured, e.g. "collective = 12.0 us + 2(t-1)/t * bytes / 300 GB/s (default)"
    comm_model: str = ""


# ---------------------------------------------------------------------------------------------------
# quality (appended; docs/quality.md): what a lossy knob does to a model's outputs, and the intent's
# policy on it. A variant is lossless when its weights are 16-bit, unpruned, with a 16-bit KV cache.

QualityMode = Literal["default", "lossless", "budget", "any"]  # "budget": max_kl and/or min_top1
QualityMethod = Literal["fingerprint", "full"]  # measured on the 1-/2-layer fingerprints, or the whole model
Agreement = Annotated[float, Meta(ge=0, le=1)]  # a fraction of positions (top-1 agreement)
QUALITY_MODES: tuple[QualityMode, ...] = values(QualityMode)
QUALITY_METHODS: tuple[QualityMethod, ...] = values(QualityMethod)


class VariantQuality(msgspec.Struct, frozen=True, kw_only=True):
    """One (weights, KV cache, pruning) variant's next-token distributions against the reference (the
    checkpoint's own weights, unpruned, 16-bit KV) over the calibration prompts."""

    weight_quant: WeightQuant = "fp16"
    kv_quant: KvQuant = "fp16"
    pruning: Pruning = "none"
    kl: NonNegFloat = 0.0  # mean KL(reference || variant), nats per token
    top1: Agreement = 1.0  # fraction of positions where the variant's most likely token is the reference's
    ppl_ratio: NonNegFloat = 0.0  # variant / reference perplexity of the prompts' own next tokens; 0: no tokenizer

    def key(self) -> str:
        return f"w{self.weight_quant}-kv{self.kv_quant}-p{self.pruning.replace(':', '')}"


class QualityReport(msgspec.Struct, kw_only=True):
    """The measured quality cost of every lossy variant of a model (``variants``; lossless ones are
    not listed), how it was measured, and on what."""

    method: QualityMethod = "fingerprint"
    variants: list[VariantQuality] = []
    reference_dtype: str = ""  # the reference's compute dtype, e.g. "float32" on a CPU
    source: str = ""  # the calibration prompts, e.g. "sharegpt_V3_filtered_500_mlenergy.json (first 8)"
    prompts: NonNegInt = 0
    positions: NonNegInt = 0  # next-token distributions compared per variant
    layers: list[int] = []  # depths run: [1, 2] (fingerprints, extrapolated to the model's) or [L]
    seconds: NonNegFloat = 0.0
    device: str = ""
    error: str = ""  # non-empty: the measurement failed (every lossy variant is then "not measured")


class QualityPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The intent's rule for lossy variants: ``default`` (a conservative measured budget), ``lossless``
    (no lossy knob), ``budget`` (``max_kl`` and/or ``min_top1``), ``any`` (the paper: search freely).
    Only ``any`` admits a lossy variant whose quality was not measured."""

    mode: QualityMode = "default"
    max_kl: NonNegFloat | None = None
    min_top1: Agreement | None = None


class ConfigurationMap(Message):
    """Every configuration of a model on one GPU type, estimated from its fingerprints."""

    model: str
    gpu_type: str
    gpu_memory_bytes: int
    max_gpus: int
    context_tokens: int
    estimates: list[ConfigEstimate] = []
    excluded: list[ExcludedConfig] = []
    cost: ProfilingCost = msgspec.field(default_factory=ProfilingCost)
    device: str = ""  # where the fingerprints ran, e.g. "cuda:NVIDIA H100 80GB HBM3" or "cpu"
    created_at: float = 0.0
    # Appended (quality, docs/quality.md): the measured quality cost of the lossy variants; None: not measured.
    quality: QualityReport | None = None


class ProfileDone(Message):
    model: str
    gpu_type: str
    status: ProfileStatus
    reason: str = ""
    configurations: int = 0
    excluded: int = 0


class GetProfile(Message):
    model: str
    gpu_type: str = ""  # empty: the first profile stored for the model


# ---------------------------------------------------------------------------------------------------
# profiling jobs (fingerprint service -> gpu agent -> worker in profile mode)


class ProfileVariant(msgspec.Struct, frozen=True, kw_only=True):
    weight_quant: WeightQuant = "fp16"
    kv_quant: KvQuant = "fp16"
    pruning: Pruning = "none"
    tp: PositiveInt = 1

    def key(self) -> str:
        """The variant's name in a ``ProfileResult.skipped`` and in logs, e.g. ``tp1-wfp16-kvfp16-pnone``."""
        return f"tp{self.tp}-w{self.weight_quant}-kv{self.kv_quant}-p{self.pruning.replace(':', '')}"


class ProfileJob(Message):
    job_id: Name
    model: str
    fingerprint_paths: list[str]  # checkpoints with 1 and 2 hidden layers
    gpu_index: NonNegInt
    variants: list[ProfileVariant] = msgspec.field(default_factory=lambda: [ProfileVariant()])
    prompt_lengths: list[PositiveInt] = msgspec.field(default_factory=lambda: [32, 128])
    output_lengths: list[PositiveInt] = msgspec.field(default_factory=lambda: [8, 24])
    repeats: PositiveInt = 3
    warmup: NonNegInt = 1
    context_tokens: PositiveInt = 512
    timeout_s: Seconds = 600.0
    # Appended: more GPUs of the agent for tensor-parallel variants (gpu_index first); empty: one GPU.
    gpu_indices: list[NonNegInt] = []
    device_timing: bool = True  # also time the device alone (see docs/fingerprint.md)
    gpu_warmup_s: NonNegFloat = 1.0  # keep the GPU busy this long before the first timed run
    # Appended: also time the deepest fingerprint replayed to this many layers (0: not); see
    # docs/fingerprint.md ("replayed depth").
    replay_depth: NonNegInt = 0
    # Appended: the replayed layers get tensors of their own where the GPU has room (a model's
    # memory footprint in the deep run); see docs/fingerprint.md.
    replay_distinct: bool = False
    # Appended: also time the batching engine's decode step at these batch sizes (empty: not);
    # see docs/profiling.md#batched-steps.
    batch_sizes: list[Annotated[int, Meta(ge=1, le=1024)]] = []


class PromptTiming(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    ttft_ms: float


class DecodeTiming(msgspec.Struct, kw_only=True, array_like=True):
    """The decode step that feeds the token at ``position``: median milliseconds over repeats."""

    position: int
    step_ms: float


class BatchDecodeTiming(msgspec.Struct, kw_only=True, array_like=True):
    """A batching engine's decode step of ``batch`` sequences at mean position ``position``: median
    wall milliseconds over repeats (host work and the token read-back included)."""

    batch: int
    position: int
    step_ms: float


class FingerprintMeasurement(msgspec.Struct, kw_only=True):
    num_layers: int
    variant: ProfileVariant
    ttft: list[PromptTiming]
    tpot_ms: float
    decode_steps: int
    peak_bytes: int  # peak of the torch allocator (CUDA) or accounted bytes (CPU)
    nvml_peak_bytes: int = 0  # peak process memory seen by NVML (CUDA only)
    weight_bytes: int = 0
    kv_cache_bytes: int = 0
    timer: str = "perf_counter"  # "perf_counter+cuda_events" with device timing
    # Appended (docs/fingerprint.md, "Measurement"). ``ttft`` and ``tpot_ms`` are host wall times,
    # what a request pays; the ``*_device`` fields are the device's own time for the same work,
    # measured with the host's launches queued ahead (empty on a CPU).
    ttft_device: list[PromptTiming] = []
    decode: list[DecodeTiming] = []  # median wall time of the step feeding each position
    decode_device: list[DecodeTiming] = []
    tpot_device_ms: float = 0.0
    context_tokens: int = 0  # the KV cache's length in tokens, so per-token KV bytes are exact
    reserved_peak_bytes: int = 0  # the torch allocator's reserved peak (CUDA)
    gpu_seconds: float = 0.0  # wall time this measurement held its device(s), load included, times the devices
    tp: int = 1  # tensor-parallel ranks the measurement ran on (peak is the largest rank's)
    base_allocated_bytes: int = 0  # allocated on the device before loading (the runtime's own; a leak shows here)
    decode_graphs: bool = False  # every stage's decode step ran as a captured CUDA graph (no per-layer host work)
    # > 0: a fingerprint of this many layers run as ``num_layers`` (its layers replayed cyclically):
    # its timings are a deep model's, its memory is not (the estimator fits memory without it).
    replayed_from: int = 0
    # Prompts of up to this many tokens were prefilled by captured CUDA graphs (0: eagerly).
    prefill_graph_tokens: int = 0
    # A replayed run: how many of its layers were distinct copies (``ProfileJob.replay_distinct``).
    replay_copies: int = 0
    # Decode ran the fused Triton kernels on every stage; if not, why the engine's check refused them.
    fused_decode: bool = False
    fused_error: str = ""
    # CUDA graphs the engine captured (decode and prefill, all stages). A replayed run that captured
    # as many as the fingerprints (every serving bucket) holds what a served model's graphs hold, so
    # its memory beyond weights and KV says how that grows with depth (the estimator uses it then).
    graphs: int = 0
    # Appended: decode steps of the batching engine at the job's ``batch_sizes`` (empty: not asked,
    # or a TP measurement). See docs/profiling.md#batched-steps.
    batch_decode: list[BatchDecodeTiming] = []


class ProfileResult(Message):
    job_id: str
    device: str
    gpu_type: str
    measurements: list[FingerprintMeasurement] = []
    gpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_bytes: int = 0
    # Appended: why variants of the job were not measured (variant key -> reason), and the measured
    # all-reduce cost of the job's GPUs when it had several.
    skipped: dict[str, str] = {}
    allreduce_latency_us: float = 0.0
    allreduce_bus_gbps: float = 0.0
    nvml_peak_bytes: int = 0


# ---------------------------------------------------------------------------------------------------
# gpu agents and workers


class GpuLoad(Message):
    """One GPU's state, published every second by its agent (subject gpu.load.<agent>.<index>)."""

    agent_id: str
    gpu_index: int
    gpu_type: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    busy_fraction: float  # fraction of the last ``window_s`` seconds the GPU was busy (paper's load)
    window_s: float
    util_percent: float = 0.0  # instantaneous utilization (NVML), or busy fraction of the last second
    simulated: bool = False
    workers: list[str] = []
    ts: float = 0.0


class StageSpec(msgspec.Struct, kw_only=True):
    """One pipeline stage: a contiguous block of layers on one GPU."""

    gpu_index: NonNegInt
    first_layer: NonNegInt
    num_layers: PositiveInt
    memory_bytes: NonNegInt = 0  # estimated bytes this stage holds on its GPU


class LaunchWorker(Message):
    worker_id: Name
    deployment_id: Name
    model: str
    model_path: str
    config: Configuration
    stages: list[StageSpec]
    context_tokens: PositiveInt = 2048
    seed: int = 0
    # Appended: continuous batching. Up to ``max_batch`` requests run at once, their KV cache drawn
    # from one pool of ``kv_tokens`` tokens (0: ``max_batch * context_tokens``, never short).
    max_batch: PositiveInt = 1
    kv_tokens: NonNegInt = 0


class LaunchReply(Message):
    worker_id: str
    pid: int
    agent_id: str


class StopWorker(Message):
    worker_id: Name


class StopReply(Message):
    worker_id: str
    stopped: bool


class WorkerReady(Message):
    worker_id: str
    deployment_id: str
    agent_id: str
    model: str
    context_tokens: int
    device: str
    memory_bytes: list[int] = []  # measured per stage after loading
    load_seconds: float = 0.0


class WorkerExited(Message):
    worker_id: str
    deployment_id: str
    agent_id: str
    exit_code: int
    expected: bool  # True when it was told to stop
    reason: str = ""


class WorkerHeartbeat(Message):
    worker_id: str
    deployment_id: str
    state: WorkerState
    busy_seconds: float  # monotonic total of seconds spent computing
    requests_done: int = 0
    ts: float = 0.0
    # Appended: continuous batching. Requests in the running batch and waiting in the worker, and the
    # KV pool's blocks in use and in all (0 and 0: a worker that does not report its pool).
    running: NonNegInt = 0
    waiting: NonNegInt = 0
    kv_blocks_used: NonNegInt = 0
    kv_blocks_total: NonNegInt = 0


# ---------------------------------------------------------------------------------------------------
# deployment


class Intent(msgspec.Struct, kw_only=True):
    """What the application developer wants (paper section 4.1). Latency is computed for a request of
    ``prompt_tokens`` in and ``output_tokens`` out."""

    kind: IntentKind = "min-cost"
    cost_model: CostModel = "mem-x-latency"
    # 0 means "not set" (loadgen, CLI); the kind that uses one requires it > 0 (ranking.validate_intent).
    slo_ms: NonNegFloat | None = None  # for latency-slo
    budget: NonNegFloat | None = None  # for cost-budget, in the units of ``cost_model``
    prompt_tokens: PositiveInt = 512
    output_tokens: PositiveInt = 128
    # Appended (quality, docs/quality.md): which lossy variants the intent admits.
    quality: QualityPolicy = msgspec.field(default_factory=QualityPolicy)
    # Appended: an expected load (docs/deployment.md#load). ``rate`` requests/s of the size above
    # (0: none stated, one replica as before); ``slo_percentile``: the share of requests latency-slo
    # holds ``slo_ms`` for; ``output_cv2``: the squared coefficient of variation of output lengths
    # (0: all alike, 1: exponential).
    rate: RequestRate = 0.0
    slo_percentile: Percentile = 95.0
    output_cv2: Annotated[float, Meta(ge=0, le=100)] = 1.0


class DeployRequest(Message):
    model: str
    intent: Intent = msgspec.field(default_factory=Intent)
    placement: PlacementChoice = ""
    deployment_id: NameOrEmpty = ""  # optional, makes retries idempotent
    context_tokens: NonNegInt = 0  # 0: the profile's context length
    gpu_type: str = ""  # empty: any GPU type the model was profiled for
    # Appended: continuous batching. Requests a replica runs at once (0: the deployer's default) and
    # its KV pool in tokens (0: max_batch x context_tokens, never short).
    max_batch: NonNegInt = 0
    kv_tokens: NonNegInt = 0
    # Appended: pin a configuration by its key (``iserve profile show`` lists them); "": the intent picks.
    config: str = ""


class GpuAssignment(msgspec.Struct, kw_only=True):
    agent_id: str
    gpu_index: int
    first_layer: int
    num_layers: int
    memory_bytes: int


class Rejection(msgspec.Struct, kw_only=True):
    config: str
    reason: str


class DeploymentRecord(msgspec.Struct, kw_only=True):
    deployment_id: str
    model: str
    model_path: str
    gpu_type: str
    config: Configuration
    estimate: ConfigEstimate
    intent: Intent
    placement_policy: PlacementPolicy
    gpus: list[GpuAssignment]
    agent_id: str
    worker_id: str
    context_tokens: int
    status: DeploymentStatus = "launching"
    reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    # Appended: the resolved batch size and KV pool in tokens (records made before continuous
    # batching decode as one request at a time and 0, "the context").
    max_batch: PositiveInt = 1
    kv_tokens: NonNegInt = 0
    # Appended: reconciliation. Relaunches made so far (each with a new worker id), why the latest
    # worker went (``reason`` adds what the deployer did about it), and whether the deployer gave up
    # relaunching it (a given-up record is deleted after the deployer's --failed-ttl-s).
    restarts: NonNegInt = 0
    cause: str = ""
    given_up: bool = False
    # Appended: autoscaling. A draining replica takes no new request; it is undeployed once the
    # scheduler reports it holds none.
    draining: bool = False


class DeployReply(Message):
    deployment: DeploymentRecord
    why: str  # one sentence: why this configuration
    rejected: list[Rejection] = []  # better-ranked configurations that did not fit, and why
    latency_ms: float = 0.0
    cost: float = 0.0
    decision_ms: float = 0.0
    # Appended: configurations the intent itself ruled out (over the latency SLO or the cost budget),
    # closest to the limit first, each with the estimate that broke the limit. ``cost`` above is in
    # the units of ``deployment.intent.cost_model`` (GiB-s, GiB or GPU-h per request).
    filtered: list[Rejection] = []
    # Appended (quality, docs/quality.md): the chosen configuration's quality, one sentence ("lossless", or
    # which knob is lossy and its measured cost, or that it was not measured), and that cost (None: lossless
    # or not measured). Configurations the quality policy ruled out are in ``filtered``.
    quality: str = ""
    quality_cost: VariantQuality | None = None
    # Appended: replicas at the intent's load. ``replicas`` deployments of the same configuration were
    # made (``deployment`` and ``others``), ``replicas_why`` says why that many; 1 and "" without a load.
    replicas: PositiveInt = 1
    replicas_why: str = ""
    others: list[DeploymentRecord] = []


class UndeployRequest(Message):
    deployment_id: str


class UndeployReply(Message):
    deployment_id: str
    status: str


class ListDeployments(Message):
    model: str = ""


class DeploymentList(Message):
    deployments: list[DeploymentRecord] = []
    # Appended: the autoscaler's state of each model it watches (empty when it is off).
    autoscaling: list[AutoscaleState] = []


class DeploymentChanged(Message):
    deployment: DeploymentRecord


# ---------------------------------------------------------------------------------------------------
# inference


class ChatMessage(msgspec.Struct, kw_only=True):
    """One turn of a chat (OpenAI's ``messages`` entries, text content only)."""

    role: ChatRole
    content: str


class InferRequest(Message):
    request_id: Annotated[str, Meta(max_length=256)]
    model: str
    prompt: str
    max_tokens: TokenCount = 64
    temperature: NonNegFloat = 0.0  # 0: greedy
    top_p: Probability = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (trace replay)
    prompt_tokens: TokenCountOrZero = 0  # >0: pad or truncate the tokenized prompt to this many tokens
    timeout_s: Seconds = 300.0
    deployment_id: str = ""  # empty: any deployment of the model
    stream_to: Inbox = ""  # inbox that receives TokenChunk* then Completion | ErrorReply
    # Appended: a chat. Non-empty: the worker renders these with the model's chat template and
    # ``prompt`` is not used (a model without a template refuses with bad_request).
    messages: list[ChatMessage] = []


class Accepted(Message):
    """Immediate reply to a streamed request: it was queued; tokens go to ``stream_to``."""

    request_id: str
    deployment_id: str = ""
    queue_depth: int = 0
    # Appended: the scheduler sends an empty keep-alive message to ``stream_to`` at least this often
    # while it holds the request (0: it sends none), so a client can tell a dead scheduler from a slow worker.
    keepalive_s: NonNegFloat = 0.0


class GenerateRequest(Message):
    """Scheduler -> worker: one request to run now; the stream goes to ``stream_to``."""

    request: InferRequest
    stream_to: Inbox
    queue_ms: float = 0.0


class TokenChunk(Message):
    request_id: str
    index: int
    token_id: int
    text: str


class Completion(Message):
    """The last message of a stream. ``step_ms`` holds every decode step's time."""

    request_id: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    queue_ms: float = 0.0
    step_ms: list[float] = []
    worker_id: str = ""
    deployment_id: str = ""


class CancelRequest(Message):
    request_id: str


class GetSchedulerStats(Message):
    pass


class QueueStats(msgspec.Struct, kw_only=True):
    deployment_id: str
    model: str
    worker_id: str
    queue_depth: int
    in_flight: int
    completed: int
    failed: int
    ttft_ms_p50: float = 0.0
    tpot_ms_p50: float = 0.0
    e2e_ms_p50: float = 0.0
    e2e_ms_p99: float = 0.0
    cancelled: int = 0  # cancelled while running (also counted in completed) or while queued
    timed_out: int = 0  # appended: past their timeout, queued or running (also counted in failed)
    # Appended: the replica's batch size, and its worker's KV pool blocks from its latest heartbeat
    # (0 and 0: not reported).
    max_batch: int = 1
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


class SchedulerStats(Message):
    queues: list[QueueStats] = []


StreamMessage = TokenChunk | Completion | ErrorReply

# ---------------------------------------------------------------------------------------------------
# autoscaling (docs/deployment.md, "Autoscaling")

ScaleAction = Literal["", "add", "remove", "hold"]  # "": none yet
SCALE_ACTIONS: tuple[ScaleAction, ...] = values(ScaleAction)


class ReplicaLoad(msgspec.Struct, kw_only=True):
    """One replica as a scheduler sees it now, and what completed on it since its previous report."""

    deployment_id: str
    model: str
    queue_depth: NonNegInt = 0  # waiting
    in_flight: NonNegInt = 0  # running
    slots: PositiveInt = 1  # requests it runs at once (max_batch)
    draining: bool = False  # takes no new request
    oldest_wait_ms: NonNegFloat = 0.0  # how long the oldest waiting request has waited
    arrived: NonNegInt = 0  # requests that joined it since the previous report
    completed: NonNegInt = 0  # ... and ended on it
    e2e_ms_p95: NonNegFloat = 0.0  # p95 end-to-end latency of those that completed (0: none)


class SchedulerLoad(Message):
    """Published by each scheduler every ``--publish-load-s`` (subject scheduler.load)."""

    scheduler_id: str
    window_s: NonNegFloat
    replicas: list[ReplicaLoad] = []
    ts: float = 0.0


class AutoscaleState(msgspec.Struct, kw_only=True):
    """The autoscaler's durable state for one model (bucket iserve_autoscaler, key: the model)."""

    model: str
    added: list[str] = []  # deployment ids of the replicas it added (only these are removed)
    draining: list[str] = []  # of those, the ones being drained before they are undeployed
    breach_windows: NonNegInt = 0  # consecutive evaluations over the latency target
    idle_windows: NonNegInt = 0  # consecutive evaluations of low load
    last_action: ScaleAction = ""
    last_action_at: float = 0.0  # wall time
    last_reason: str = ""
    replicas: NonNegInt = 0  # serving replicas at the latest evaluation


# ---------------------------------------------------------------------------------------------------
# encoding

_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


@functools.cache
def decoder(kind: Any) -> msgspec.json.Decoder:
    """A cached, typed decoder; ``kind`` may be a Struct type or a union of tagged Structs."""
    return msgspec.json.Decoder(kind)


def decode(data: bytes, kind: type[T]) -> T:
    return decoder(cast(Any, kind)).decode(data)
