"""Continuous batching: ``BatchEngine`` against the batch-1 ``Engine`` on the CPU in float32.

Greedy tokens of every sequence in a batch must equal the same prompt run alone, for every family,
weight format, pruning mode and KV format; admission, EOS, cancellation and pool limits keep the
rest of the batch exact. The GPU run of the same checks is marked ``gpu``.
"""

from __future__ import annotations

import random

import pytest
import torch

from iserve.errors import BadRequest, PromptTooLong
from iserve.gpu_agent.engine import Engine, kernels
from iserve.gpu_agent.engine.batch import BatchEngine
from iserve.gpu_agent.engine.batch_forward import paged_attend
from iserve.gpu_agent.engine.batch_graphs import StepInputs
from iserve.gpu_agent.engine.batch_plan import Chunk, SeqState, admit, plan_step
from iserve.gpu_agent.engine.kv_pool import BlockAllocator, PagedKV
from iserve.modelmaker import make_checkpoint

PROMPTS = [[1] + list(range(5 + i, 5 + i + 2 + 9 * i)) for i in range(6)]  # 3 to 48 tokens


def _load(path, device="cpu", **kw) -> Engine:
    return Engine.load(path, [(device, 0, 2), (device, 2, 2)], context_tokens=128, **kw)


def _alone(engine: Engine, prompts, max_tokens=12, **kw) -> list[list[int]]:
    return [engine.generate(p, max_tokens=max_tokens, ignore_eos=True, **kw).tokens for p in prompts]


def _batched(batch: BatchEngine, prompts, max_tokens=12, **kw) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        batch.submit(f"s{i}", p, max_tokens=max_tokens, ignore_eos=True, **kw)
    return {e.seq_id: e.result.tokens for e in batch.run_until_idle() if e.result is not None}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return {
        "llama": make_checkpoint(root / "llama", "tiny-llama", num_layers=4, seed=1, std=0.05),
        "mixtral": make_checkpoint(root / "mixtral", "tiny-mixtral", num_layers=4, seed=2, std=0.05),
        "falcon": make_checkpoint(root / "falcon", "tiny-falcon", num_layers=4, seed=3, std=0.05),
        "gptj": make_checkpoint(root / "gptj", "tiny-gptj", num_layers=4, seed=4, std=0.05),
        "neox": make_checkpoint(root / "neox", "tiny-neox", num_layers=4, seed=5, std=0.05),
        "window": make_checkpoint(
            root / "window",
            "tiny-llama",
            num_layers=4,
            seed=6,
            std=0.05,
            overrides={"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16},
        ),
    }


@pytest.mark.parametrize("family", ["llama", "mixtral", "falcon", "gptj", "neox", "window"])
def test_batched_greedy_tokens_equal_each_prompt_alone(models, family):
    engine = _load(models[family])
    want = _alone(engine, PROMPTS)
    got = _batched(BatchEngine(engine, max_batch=4, step_tokens=24), PROMPTS)
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want


@pytest.mark.parametrize(
    "kw",
    [
        {"weight_quant": "int8"},
        {"weight_quant": "int4"},
        {"pruning": "2:4"},
        {"pruning": "structured"},
        {"kv_quant": "int8"},
        {"weight_quant": "int8", "kv_quant": "int8", "pruning": "2:4"},
    ],
)
def test_every_variant_batches_exactly(models, kw):
    engine = _load(models["llama"], **kw)
    want = _alone(engine, PROMPTS)
    got = _batched(BatchEngine(engine, max_batch=6, step_tokens=200), PROMPTS)
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want


def test_chunked_prefill_and_a_tiny_step_budget_give_the_same_tokens(models):
    engine = _load(models["llama"])
    want = _alone(engine, PROMPTS)
    batch = BatchEngine(engine, max_batch=3, step_tokens=5, block_size=4)  # 48-token prompts in 5-token chunks
    got = _batched(batch, PROMPTS)
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want
    assert batch.blocks_used == 0


def test_seeded_sampling_in_a_batch_equals_alone(models):
    engine = _load(models["llama"])
    want = [
        engine.generate(p, max_tokens=10, temperature=0.9, top_p=0.8, seed=11 + i, ignore_eos=True).tokens
        for i, p in enumerate(PROMPTS)
    ]
    batch = BatchEngine(engine, max_batch=6)
    for i, p in enumerate(PROMPTS):
        batch.submit(f"s{i}", p, max_tokens=10, temperature=0.9, top_p=0.8, seed=11 + i, ignore_eos=True)
    got = {e.seq_id: e.result.tokens for e in batch.run_until_idle() if e.result is not None}
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want


def test_eos_ends_one_sequence_mid_batch_and_the_others_go_on(models):
    engine = _load(models["llama"])
    want = _alone(engine, PROMPTS)
    eos = want[2][4]  # the fifth token of prompt 2 becomes the end of sequence
    engine.tokenizer.eos_id = eos
    batch = BatchEngine(engine, max_batch=6)
    batch.submit("eos", PROMPTS[2], max_tokens=12)
    for i, p in enumerate(PROMPTS):
        batch.submit(f"s{i}", p, max_tokens=12, ignore_eos=True)
    results = {e.seq_id: e.result for e in batch.run_until_idle() if e.result is not None}
    stop = want[2].index(eos) + 1
    assert results["eos"].tokens == want[2][:stop] and results["eos"].finish_reason == "stop"
    assert [results[f"s{i}"].tokens for i in range(len(PROMPTS))] == want


def test_cancel_ends_one_sequence_and_returns_its_blocks(models):
    engine = _load(models["llama"])
    want = _alone(engine, PROMPTS[:3], max_tokens=20)
    batch = BatchEngine(engine, max_batch=4)
    for i, p in enumerate(PROMPTS[:3]):
        batch.submit(f"s{i}", p, max_tokens=20, ignore_eos=True)
    batch.submit("queued", PROMPTS[0], max_tokens=5)
    batch.cancel("queued")  # cancelled before it ran: ends with no tokens
    events = batch.step() + batch.step() + batch.step()
    batch.cancel("s1")
    events += batch.run_until_idle()
    results = {e.seq_id: e.result for e in events if e.result is not None}
    assert results["queued"].finish_reason == "cancelled" and results["queued"].tokens == []
    assert results["s1"].finish_reason == "cancelled" and results["s1"].tokens == want[1][:3]
    assert results["s0"].tokens == want[0] and results["s2"].tokens == want[2]
    assert batch.blocks_used == 0 and not batch.busy


def test_oversized_requests_are_refused_and_the_batch_is_undisturbed(models):
    engine = _load(models["llama"])
    want = _alone(engine, PROMPTS[:2])
    batch = BatchEngine(engine, max_batch=2, kv_tokens=64, block_size=8)
    batch.submit("s0", PROMPTS[0], max_tokens=12, ignore_eos=True)
    with pytest.raises(PromptTooLong, match="pool holds 64"):
        batch.submit("big", PROMPTS[5], max_tokens=30)  # 48 + 30 > 64 slots
    with pytest.raises(PromptTooLong, match="context"):
        batch.submit("long", PROMPTS[5], max_tokens=100)  # > 128 of context
    with pytest.raises(BadRequest, match="vocabulary"):
        batch.submit("bad", [10**7], max_tokens=4)
    batch.submit("s1", PROMPTS[1], max_tokens=12, ignore_eos=True)
    got = {e.seq_id: e.result.tokens for e in batch.run_until_idle() if e.result is not None}
    assert got == {"s0": want[0], "s1": want[1]}


def test_a_short_pool_admits_in_order_and_never_overcommits(models):
    engine = _load(models["llama"])
    want = _alone(engine, PROMPTS)
    # 64 slots of 8: room for the worst case of two short prompts at once, one of the long ones.
    batch = BatchEngine(engine, max_batch=6, kv_tokens=64, block_size=8)
    for i, p in enumerate(PROMPTS):
        batch.submit(f"s{i}", p, max_tokens=12, ignore_eos=True)
    first_token: list[str] = []
    got: dict[str, list[int]] = {}
    most = 0
    while batch.busy:
        for e in batch.step():
            if e.seq_id not in first_token:
                first_token.append(e.seq_id)
            if e.result is not None:
                got[e.seq_id] = e.result.tokens
        most = max(most, batch.running)
        assert batch.blocks_used <= batch.blocks_total
    assert first_token == [f"s{i}" for i in range(len(PROMPTS))]  # FCFS: none overtook an older one
    assert most < 6
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want
    assert batch.blocks_used == 0


def test_running_never_exceeds_max_batch_and_steps_are_shared(models):
    engine = _load(models["llama"])
    batch = BatchEngine(engine, max_batch=3)
    for i in range(8):
        batch.submit(f"s{i}", PROMPTS[0], max_tokens=10, ignore_eos=True)
    steps = 0
    while batch.busy:
        batch.step()
        steps += 1
        assert batch.running <= 3
    # Three at a time: ceil(8 / 3) rounds of about 10 steps, far fewer than 8 x 10 alone.
    assert steps <= 3 * 11


def test_batching_refuses_bad_settings_and_the_engine_refuses_generate_after(models):
    engine = _load(models["llama"])
    with pytest.raises(BadRequest, match="step_tokens"):
        BatchEngine(engine, max_batch=8, step_tokens=8)
    BatchEngine(engine, max_batch=2)
    with pytest.raises(BadRequest, match="BatchEngine"):
        engine.generate(PROMPTS[0], max_tokens=2)


# ---------------------------------------------------------------------------------------------------
# the pure parts


def test_admission_is_fcfs_and_stops_at_the_first_that_does_not_fit():
    assert admit([16, 16, 16], 0, 0, max_batch=2, pool_blocks=10, block_size=8) == 2  # batch full
    assert admit([40, 8, 8], 0, 6, max_batch=8, pool_blocks=10, block_size=8) == 0  # head blocks the rest
    assert admit([8, 40], 1, 0, max_batch=8, pool_blocks=5, block_size=8) == 1


def test_a_step_runs_every_decode_then_prompt_chunks_under_the_budget():
    running = [SeqState("a", 4, 6), SeqState("b", 30, 0), SeqState("c", 10, 4), SeqState("d", 5, 5)]
    assert plan_step(running, 12) == [
        Chunk("a", 6, 1, True, decode=True),
        Chunk("d", 5, 1, True, decode=True),
        Chunk("b", 0, 10, False),
    ]
    assert plan_step(running, 40)[2:] == [Chunk("b", 0, 30, True), Chunk("c", 4, 6, True)]


def test_block_allocator_grows_and_releases():
    a = BlockAllocator(4, 8)
    table: list[int] = []
    a.grow(table, 9)
    assert table == [0, 1] and a.used == 2
    a.grow(table, 16)
    assert table == [0, 1]
    with pytest.raises(RuntimeError, match="exhausted"):
        a.grow(table, 100)
    a.release(table)
    assert table == [] and a.free == 4


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"weight_quant": "int8"}, {"weight_quant": "int4"}, {"kv_quant": "int8"}])
def test_gpu_batched_greedy_agrees_with_batch_one(models, kw):
    """fp16 on CUDA: batched and alone differ in rounding only; most greedy tokens agree."""
    engine = _load(models["llama"], device="cuda:0", **kw)
    want = _alone(engine, PROMPTS)
    got = _batched(BatchEngine(engine, max_batch=6), PROMPTS)
    same = sum(a == b for i in range(len(PROMPTS)) for a, b in zip(got[f"s{i}"], want[i]))
    assert same >= 0.9 * sum(len(w) for w in want)
    torch.cuda.synchronize()


@pytest.mark.skipif(not kernels.available(), reason="needs Triton (a CUDA GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("quant", ["fp16", "int8"])
@pytest.mark.parametrize("window", [0, 6])
def test_paged_decode_kernel_matches_attention_over_gathered_slots(quant, window):
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    B, H, KVH, D, BS = 3, 8, 2, 32, 4
    pool = PagedKV(1, 64, KVH, D, torch.float32, torch.device(device), quant)
    pool.write(
        0,
        torch.arange(64, device=device),
        torch.randn(64, KVH, D, device=device),
        torch.randn(64, KVH, D, device=device),
    )
    tables = torch.tensor([[3, 5, 7, 1, 0], [2, 4, 6, 8, 9], [10, 11, 0, 0, 0]], dtype=torch.int32, device=device)
    lens = torch.tensor([13, 20, 5], dtype=torch.int32, device=device)
    q = torch.randn(B, H, D, device=device)
    out = paged_attend(pool, 0, q, tables, lens, BS, window, 2)
    for b in range(B):
        n = int(lens[b])
        lo = max(0, n - window) if window else 0
        slots = torch.tensor([int(tables[b, p // BS]) * BS + p % BS for p in range(lo, n)], device=device)
        k, v = pool.gather(0, slots)
        k = k.transpose(0, 1).repeat_interleave(H // KVH, 0)
        v = v.transpose(0, 1).repeat_interleave(H // KVH, 0)
        ref = torch.softmax(q[b].unsqueeze(1) @ k.transpose(1, 2) * D**-0.5, -1) @ v
        assert torch.allclose(out[b], ref.reshape(-1), atol=2e-3), b


@pytest.mark.skipif(not kernels.available(), reason="needs Triton (a CUDA GPU, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("window", [0, 6])
def test_batch_one_decode_kernel_matches_attention_over_its_cache_rows(quant, window):
    """The batch-1 engine's split-K kernel shares its block update, slice bounds and merge with the
    paged one: checked here against plain attention over cache rows [0, pos]."""
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(1)
    H, KVH, D, ctx, pos = 8, 2, 32, 40, 22
    k, v = torch.randn(KVH, ctx, D, device=device), torch.randn(KVH, ctx, D, device=device)
    ks = vs = None
    if quant:
        ks, vs = k.abs().amax(-1) / 127, v.abs().amax(-1) / 127
        k, v = torch.round(k / ks[..., None]).to(torch.int8), torch.round(v / vs[..., None]).to(torch.int8)
    q = torch.randn(H * D, device=device)
    out = kernels.decode_attention(q, k, v, ks, vs, torch.tensor([pos], device=device), window, 3)
    lo = max(0, pos + 1 - window) if window else 0
    kr, vr = k[:, lo : pos + 1].float(), v[:, lo : pos + 1].float()
    if quant:
        kr, vr = kr * ks[:, lo : pos + 1, None], vr * vs[:, lo : pos + 1, None]
    kr, vr = kr.repeat_interleave(H // KVH, 0), vr.repeat_interleave(H // KVH, 0)
    ref = torch.softmax(q.view(H, 1, D) @ kr.transpose(1, 2) * D**-0.5, -1) @ vr
    assert out.shape == (1, H * D) and torch.allclose(out[0], ref.reshape(-1), atol=2e-3)


@pytest.mark.gpu
def test_gpu_captured_decode_steps_agree_with_eager_steps(models):
    engine = _load(models["llama"], device="cuda:0")
    graphs = BatchEngine(engine, max_batch=6, release_static_cache=False)
    assert graphs.graphs_captured == [1, 2, 4, 6], graphs.graph_error
    got = _batched(graphs, PROMPTS)
    eager = _batched(BatchEngine(engine, max_batch=6, cuda_graphs=False), PROMPTS)
    same = sum(a == b for i in range(len(PROMPTS)) for a, b in zip(got[f"s{i}"], eager[f"s{i}"]))
    assert same >= 0.95 * sum(len(v) for v in eager.values())


def test_step_inputs_rewrite_only_what_changed_and_equal_a_fresh_build():
    """The captured step's host mirrors, filled incrementally step after step (sequences grow, leave,
    move rows, a key comes back with another table), equal the same step built from scratch."""
    blocks, scratch, bs = 5, 0, 4
    inc = StepInputs(8, blocks, scratch, bs, pinned=False)
    rng = random.Random(3)
    live: dict[int, list[int]] = {}
    serial = 0
    for _ in range(60):
        for k in [k for k in live if rng.random() < 0.15]:
            del live[k]
        while len(live) < rng.randint(1, 8):
            serial += 1
            live[serial] = [rng.randint(1, 40)]
        for t in live.values():
            if len(t) < blocks + 2 and rng.random() < 0.4:
                t.append(rng.randint(1, 40))  # longer than ``blocks``: cut to the first ones
        keys = list(live)
        rng.shuffle(keys)
        n = len(keys)
        b = min(8, 1 << (n - 1).bit_length())
        tables = [live[k] for k in keys]
        ids, positions = [rng.randint(0, 99) for _ in keys], [rng.randint(0, 19) for _ in keys]
        slots = [rng.randint(0, 99) for _ in keys]
        inc.fill(ids, positions, slots, tables, keys, b)
        fresh = StepInputs(8, blocks, scratch, bs, pinned=False)
        fresh.fill(ids, positions, slots, tables, None, b)
        assert torch.equal(inc.meta[:, :b], fresh.meta[:, :b])
        assert torch.equal(inc.tables[:b], fresh.tables[:b])
        assert inc.meta[3, :n].tolist() == [p + 1 for p in positions]
        assert inc.tables[n:b].eq(scratch).all() and inc.meta[2, n:b].eq(scratch * bs).all()
        for i, k in enumerate(keys):
            t = live[k][:blocks]
            assert inc.tables[i, : len(t)].tolist() == t and inc.tables[i, len(t) :].eq(scratch).all()


@pytest.mark.skipif(not kernels.available(), reason="needs Triton (a CUDA GPU, or TRITON_INTERPRET=1)")
def test_fused_projections_of_a_batched_step_equal_the_plain_step(models):
    """``DecoderLayer.step_fused`` (the Triton GEMV with RMSNorm, SwiGLU and residual fused, used by
    captured steps of a few rows) against ``step`` on the same rows: same attention inputs and output."""
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    engine = Engine.load(models["llama"], [(device, 0, 4)], context_tokens=64)
    stage = engine.stages[0]
    layer = stage.layers[1]
    torch.manual_seed(0)
    x = torch.randn(3, engine.arch.hidden_size, device=device, dtype=stage.dtype)
    pos = torch.tensor([5, 17, 40], device=device)
    cos, sin = stage.cos.index_select(0, pos).unsqueeze(1), stage.sin.index_select(0, pos).unsqueeze(1)
    seen: list[tuple[torch.Tensor, ...]] = []

    def attend(q, k, v):  # any function of q, k, v: the projections and rotations are what is compared
        seen.append((q, k, v))
        return (q * 0.5).reshape(q.shape[0], -1) + k.float().mean().to(q.dtype)

    want = layer.step(x, cos, sin, attend)
    got = layer.step_fused(x, cos, sin, attend)
    for a, b in zip(seen[0], seen[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
