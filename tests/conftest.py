"""Shared fixtures: a real nats-server with JetStream on a free port, tiny real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from iserve.natsserver import EmbeddedNats


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nats_server(tmp_path):
    with EmbeddedNats(tmp_path / "nats") as srv:
        yield srv


@pytest.fixture
async def nc(nats_server):
    from iserve import bus

    conn = await bus.connect(nats_server.url, "test")
    yield conn
    await conn.drain()


@pytest.fixture
async def cluster(nats_server, tmp_path):
    """Every service in this event loop on the test's nats-server (``test_services.Cluster``)."""
    from test_services import Cluster

    async with Cluster(nats_server.url, tmp_path) as c:
        yield c


@pytest.fixture
async def client(nats_server):
    """An iServe client of the test's nats-server."""
    from iserve.client import Client

    c = await Client.connect(nats_server.url)
    yield c
    await c.close()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-layer tiny Llama (GQA) with random weights, in 2 shards with an index."""
    from iserve.modelmaker import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny", "tiny-llama", num_layers=4, seed=0, shards=2)


@pytest.fixture
def spawn_ranks():
    """``spawn_ranks(target, size, *args)``: run ``target(rank, size, port, *args, queue)`` in ``size``
    spawned processes (``port`` a free TCP port for ``torch.distributed``), collect one
    ``(rank, result)`` from each, and fail the test with the text of a rank that put a string."""
    import multiprocessing as mp

    from iserve.gpu_agent.profiling.tp_ranks import free_port

    def run(target, size: int, *args) -> dict:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = free_port()
        procs = [ctx.Process(target=target, args=(r, size, port, *args, queue)) for r in range(size)]
        for p in procs:
            p.start()
        try:
            results = dict(queue.get(timeout=240) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        for r, v in results.items():
            assert not isinstance(v, str), f"rank {r}: {v}"
        return results

    return run
