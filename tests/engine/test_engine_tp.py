"""Tensor parallelism: ranks in separate processes (gloo on the CPU, NCCL on GPUs) give the same
tokens as one process; the GPU agent launches a TP worker as one process per rank."""

from __future__ import annotations

import asyncio

import pytest
import torch

from iserve.gpu_agent.engine import Engine
from iserve.modelmaker import make_checkpoint

IDS = list(range(3, 40))
CONFIGS = [
    dict(),
    dict(weight_quant="int8", kv_quant="int8", pruning="structured"),
    dict(weight_quant="int4", pruning="2:4"),
]


def _run(engine: Engine) -> tuple[list[int], list[int]]:
    greedy = engine.generate(IDS, max_tokens=8, ignore_eos=True).tokens
    sampled = engine.generate(IDS, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True).tokens
    return greedy, sampled


def _rank(rank: int, size: int, port: int, path: str, stages_of_rank: list, configs: list[dict], queue) -> None:
    import torch.distributed as dist

    stages = stages_of_rank[rank]
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    try:
        cuda = stages[0][0].startswith("cuda")
        if cuda:
            torch.cuda.set_device(stages[0][0])
        dist.init_process_group(
            "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size
        )
        out: list = []
        for kw in configs:
            engine = Engine.load(path, stages, 96, tp_rank=rank, tp_size=size, **kw)
            if rank == 0:
                res = _run(engine)
                stopped = engine.generate(
                    IDS, max_tokens=8, ignore_eos=True, should_stop=iter([False, False, True]).__next__
                )
                out.append(
                    (
                        res,
                        stopped.tokens,
                        stopped.finish_reason,
                        engine.weight_bytes(),
                        (engine.graphs_captured, engine.prefill_graph_tokens),
                    )
                )
                engine.close()
            else:
                out.append(engine.follow())
                engine.close()
            groups = len(engine._groups)
            engine.release_groups()  # every rank, after close: the next engine makes its own
            assert groups == len(stages) + 1 and not engine._groups, groups  # one per stage, and the control group
        queue.put((rank, out))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(e).__name__}: {e}"))


def _spawn(spawn_ranks, path, stages_of_rank, configs) -> dict:
    return spawn_ranks(_rank, len(stages_of_rank), str(path), stages_of_rank, configs)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 16 heads in 8 KV groups (6 kept by structured pruning), an odd vocabulary (259) so the
    # vocab-parallel shards are padded.
    return make_checkpoint(
        tmp_path_factory.mktemp("tp"),
        "tiny-llama",
        num_layers=4,
        std=0.06,
        seed=5,
        overrides={"hidden_size": 256, "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 256},
    )


def test_tp2_on_cpu_gives_the_tokens_of_tp1(model, spawn_ranks):
    stages = [[("cpu", 0, 1), ("cpu", 1, 3)]] * 2  # PP=2 x TP=2
    results = _spawn(spawn_ranks, model, stages, CONFIGS)
    for i, kw in enumerate(CONFIGS):
        (greedy, sampled), stopped, reason, wbytes, _ = results[0][i]
        one = Engine.load(model, [("cpu", 0, 4)], 96, **kw)
        assert (greedy, sampled) == _run(one), kw
        # Cancellation, decided by the leader, stops every rank at the same token.
        assert stopped == greedy[:2] and reason == "cancelled"
        assert results[1][i] == 3  # the follower ran the leader's 3 generations
        assert wbytes < one.weight_bytes()


BATCH_PROMPTS = [IDS[: 5 + 9 * i] for i in range(4)]


def _batch_rank(rank: int, size: int, port: int, path: str, stages: list, queue) -> None:
    import torch.distributed as dist

    from iserve.gpu_agent.engine.batch import BatchEngine

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        engine = Engine.load(path, stages, 96, tp_rank=rank, tp_size=size)
        batch = BatchEngine(engine, max_batch=3, step_tokens=16)
        if rank == 0:
            for i, p in enumerate(BATCH_PROMPTS):
                batch.submit(f"s{i}", p, max_tokens=8, ignore_eos=True)
            out = {e.seq_id: e.result.tokens for e in batch.run_until_idle() if e.result is not None}
            engine.close()
        else:
            out = batch.follow()
            engine.close()
        engine.release_groups()
        queue.put((rank, out))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(e).__name__}: {e}"))


def test_tp2_batches_with_the_tokens_of_tp1(model, spawn_ranks):
    """The leader's BatchEngine broadcasts each step; the follower runs it: same tokens as TP=1 batched."""
    from iserve.gpu_agent.engine.batch import BatchEngine

    results = spawn_ranks(_batch_rank, 2, str(model), [("cpu", 0, 1), ("cpu", 1, 3)])
    one = BatchEngine(Engine.load(model, [("cpu", 0, 4)], 96), max_batch=3, step_tokens=16)
    for i, p in enumerate(BATCH_PROMPTS):
        one.submit(f"s{i}", p, max_tokens=8, ignore_eos=True)
    want = {e.seq_id: e.result.tokens for e in one.run_until_idle() if e.result is not None}
    assert results[0] == want
    assert results[1] >= 8  # the follower ran every step (at least one per generated token)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_on_two_gpus_gives_the_tokens_of_tp1(model, spawn_ranks):
    # float32: in fp16 the ranks' partial sums round differently from one GPU's sum, and greedy tokens
    # of a random-weight model can flip after a few steps (seen on 2 H200s with Llama-2-7B's shapes).
    configs = [dict(dtype="float32"), dict(dtype="float32", weight_quant="int8")]
    results = _spawn(spawn_ranks, model, [[("cuda:0", 0, 4)], [("cuda:1", 0, 4)]], configs)
    for i, kw in enumerate(configs):
        (greedy, sampled), _, _, _, graphs = results[0][i]
        # Decode and prefill (the 37-token prompt padded to 64) replay graphs with NCCL in them.
        assert graphs == ([True], 64)
        one = Engine.load(model, [("cuda:0", 0, 4)], 96, **kw)
        assert (greedy, sampled) == _run(one), kw


@pytest.mark.parametrize("max_batch", [1, 3])
async def test_agent_launches_a_tp_worker(model, nats_server, tmp_path, max_batch):
    """tp=2: two worker processes, one worker id; rank 0 streams the same tokens as one process,
    one request at a time (max_batch 1) or batching (the followers run the leader's steps)."""
    from iserve import bus, subjects
    from iserve.gpu_agent.config import AgentConfig
    from iserve.gpu_agent.gpus import SimulatedGpus
    from iserve.gpu_agent.load import parse_simulated
    from iserve.gpu_agent.service import AgentService
    from iserve.messages import (
        Accepted,
        Completion,
        Configuration,
        GenerateRequest,
        InferRequest,
        LaunchReply,
        LaunchWorker,
        StageSpec,
        StopReply,
        StopWorker,
        WorkerExited,
        WorkerReady,
        decoder,
    )

    nc = await bus.connect(nats_server.url, "test")
    cfg = AgentConfig(
        nats_url=nats_server.url,
        log_level="warning",
        log_json=True,
        agent_id="a0",
        simulate_gpus="2x24GB",
        gpu_type="sim",
        interval_s=0.5,
        load_window_s=120,
        work_dir=tmp_path / "agent",
        profile_timeout_s=60,
        verify_launches=False,  # no model registry in this test: the launch is sent by hand
    )
    gpus = SimulatedGpus(parse_simulated("2x24GB"), "sim")
    agent = AgentService(cfg, await bus.connect(nats_server.url, "agent"), gpus)
    await agent.start()
    ready: asyncio.Queue = asyncio.Queue()
    exited: asyncio.Queue = asyncio.Queue()

    async def on_ready(m):
        ready.put_nowait(decoder(WorkerReady).decode(m.data))

    async def on_exited(m):
        exited.put_nowait(decoder(WorkerExited).decode(m.data))

    async def on_chunk(m):
        chunks.put_nowait(m.data)

    chunks: asyncio.Queue = asyncio.Queue()
    await nc.subscribe(subjects.WORKER_READY, cb=on_ready)
    await nc.subscribe(subjects.WORKER_EXITED, cb=on_exited)
    try:
        launch = LaunchWorker(
            worker_id="w-tp",
            deployment_id="d-tp",
            model="tiny",
            model_path=str(model),
            config=Configuration(tp=2, pp=1),
            context_tokens=96,
            max_batch=max_batch,
            stages=[
                StageSpec(gpu_index=0, first_layer=0, num_layers=4, memory_bytes=1 << 28),
                StageSpec(gpu_index=1, first_layer=0, num_layers=4, memory_bytes=1 << 28),
            ],
        )
        rep = await bus.request(nc, subjects.agent_launch("a0"), launch, LaunchReply, timeout=60)
        assert rep.worker_id == "w-tp" and len(agent.workers["w-tp"].procs) == 2
        r = await asyncio.wait_for(ready.get(), 120)
        assert r.worker_id == "w-tp"
        inbox = nc.new_inbox()
        await nc.subscribe(inbox, cb=on_chunk)
        req = InferRequest(request_id="r1", model="tiny", prompt="The quick brown fox", max_tokens=8, ignore_eos=True)
        await bus.request(
            nc, subjects.worker_generate("w-tp"), GenerateRequest(request=req, stream_to=inbox), Accepted, timeout=60
        )
        done = None
        while done is None:
            data = await asyncio.wait_for(chunks.get(), 60)
            try:
                done = decoder(Completion).decode(data)
            except Exception:  # a TokenChunk
                continue
        one = Engine.load(model, [("cpu", 0, 4)], 96)
        ids = one.tokenizer.encode("The quick brown fox", add_bos=True)
        expected = one.generate(ids, max_tokens=8, ignore_eos=True).tokens
        assert done.completion_tokens == 8 and done.text == one.tokenizer.decode(expected)
        stop = await bus.request(nc, subjects.agent_stop("a0"), StopWorker(worker_id="w-tp"), StopReply, timeout=30)
        assert stop.stopped
        ex = await asyncio.wait_for(exited.get(), 30)
        assert ex.worker_id == "w-tp" and ex.expected
        assert "w-tp" not in agent.workers
    finally:
        await agent.close()
        await nc.drain()


@pytest.mark.parametrize("preset", ["tiny-falcon", "tiny-gptj", "tiny-neox"])
def test_tp2_on_cpu_gives_the_tokens_of_tp1_for_other_families(preset, tmp_path, spawn_ranks):
    path = make_checkpoint(tmp_path / preset, preset, num_layers=2, std=0.06, seed=3)
    results = _spawn(spawn_ranks, path, [[("cpu", 0, 2)]] * 2, [dict()])
    (greedy, sampled), stopped, reason, _, _ = results[0][0]
    one = Engine.load(path, [("cpu", 0, 2)], 96)
    assert (greedy, sampled) == _run(one)
    assert stopped == greedy[:2] and reason == "cancelled"


def _agree_rank(rank: int, size: int, port: int, votes: list[bool], queue) -> None:
    import torch.distributed as dist

    from iserve.gpu_agent.engine.tp import TPControl

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        control = dist.new_group(list(range(size)), backend="gloo")
        tp = TPControl(rank, size, control, control, torch.device("cpu"))
        queue.put((rank, [tp.all_agree(votes[rank]), tp.all_agree(True)]))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(e).__name__}: {e}"))


def test_ranks_take_a_local_decision_together(spawn_ranks):
    """A decision each rank takes from its own check (fused kernels, prefill graphs) holds only if it
    holds on every rank: a fused stage captures one decode graph, an unfused one a graph per
    bucket, and ranks that decided differently would run unpaired collectives and hang."""
    results = spawn_ranks(_agree_rank, 2, [True, False])
    assert results == {0: [False, True], 1: [False, True]}


def test_local_checks_run_no_collectives():
    """The fused decode check runs each rank's layer without collectives (``TensorParallel.local``):
    a rank that failed part-way through it left the other waiting in a layer's all-reduce (Llama-2-7B
    2:4 at TP=2 on two H200s). Inside, nothing reaches torch.distributed (no group exists here)."""
    from iserve.gpu_agent.engine.tp import TensorParallel

    tp = TensorParallel(rank=1, size=2, group=object())
    t = torch.ones(2, 3)
    with tp.local():
        assert tp.all_reduce(t) is t and torch.equal(t, torch.ones(2, 3))
        assert tp.all_gather_columns(t) is t
    assert tp.collectives
    with pytest.raises(ValueError), tp.local():
        raise ValueError("a failed check")
    assert tp.collectives  # restored after a failure too
