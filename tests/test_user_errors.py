"""Conditions a user can fix are answered with their own code (``bad_request``, ``not_found``, ...),
never ``internal``, and the handler keeps serving: sent over a real nats-server to the real services."""

from __future__ import annotations

import pytest
from test_services import Cluster, copy_model

from iserve import bus, errors
from iserve.client import Client, CompletionStream
from iserve.messages import ModelRecord

BAD_NAMES = ["", "a b", "a*", "a.>", "x..y", "café"]


async def _generate(client: Client, model: str) -> None:
    async for _ in client.generate(model, "hi", max_tokens=2, stream=CompletionStream()):
        pass


def test_valid_key_follows_the_nats_rule():
    assert bus.valid_key("llama-2.sim-gpu") and bus.valid_key("a/b=c_d")
    assert not any(bus.valid_key(k) for k in BAD_NAMES + [".a", "a."])
    assert all(bus.valid_key(bus.kv_key("m", t)) for t in ("NVIDIA H100 80GB HBM3", "sim-gpu"))


async def test_a_key_no_entry_can_have_reads_as_absent_and_is_refused_on_write(nc):
    kv = await bus.TypedKV.open(nc, "test_keys", ModelRecord)
    assert await kv.get("a b") is None and await kv.get_with_revision("") == (None, 0)
    await kv.delete("a*")  # nothing to delete
    with pytest.raises(errors.BadRequest, match="cannot name an entry"):
        await kv.create("a b", None)  # type: ignore[arg-type]  # refused before anything is encoded


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_names_that_cannot_exist_are_not_found_on_every_subject(cluster, client, name):
    with pytest.raises(errors.NotFound):
        await client.model(name)
    with pytest.raises(errors.NotFound):
        await client.unregister(name)
    with pytest.raises(errors.NotFound):
        await client.profile(name)
    with pytest.raises(errors.NotFound):
        await client.deploy(name)
    with pytest.raises(errors.NotFound):
        await client.undeploy(name)
    with pytest.raises(errors.NotFound):
        await _generate(client, name)
    # every handler still answers a good request
    assert (await client.models()).models == []
    assert (await client.deployments()).deployments == []
    assert (await client.scheduler_stats()).queues == []


async def test_a_bad_deployment_id_or_gpu_type_of_a_profiled_model(cluster, client, tiny_model, tmp_path):
    info = await client.register(str(copy_model(tiny_model, tmp_path / "tiny")))
    name = info.record.name
    await client.wait_profiled(name, timeout=120)
    with pytest.raises(errors.BadRequest, match="deployment_id"):  # refused by the message's type
        await client.deploy(name, deployment_id="x y")
    with pytest.raises(errors.BadRequest, match="deployment id 'x..y' is not usable"):  # a name, but no KV key
        await client.deploy(name, deployment_id="x..y")
    with pytest.raises(errors.NotFound, match="no profile for GPU type 'nope'"):
        await client.profile(name, "nope")
    with pytest.raises(errors.NotFound, match="no profile for GPU type 'nope'"):
        await client.deploy(name, gpu_type="nope")
    with pytest.raises(errors.BadRequest, match="not in"):
        await client.deploy(name, config="tp9-pp1-wfp16-kvfp16-pnone")
    with pytest.raises(errors.NotReady, match="no ready deployment"):
        await _generate(client, name)
    assert (await client.profile(name)).model == name  # still serving
    assert (await client.deployments()).deployments == []  # nothing half-deployed


async def test_a_profile_job_without_its_fingerprints_is_a_checkpoint_error(cluster, client, tmp_path):
    from iserve import subjects
    from iserve.messages import ErrorReply, ProfileJob, ProfileResult, decoder, encode

    job = ProfileJob(job_id="j1", model="m", fingerprint_paths=[str(tmp_path / "gone")], gpu_index=0)
    msg = await client.nc.request(subjects.agent_profile("a0"), encode(job), timeout=10)
    reply = decoder(ProfileResult | ErrorReply).decode(msg.data)
    assert isinstance(reply, ErrorReply) and reply.code == "bad_checkpoint" and "gone" in reply.message


async def test_the_agent_launches_only_registered_checkpoints_with_memory(cluster, client, tiny_model, tmp_path):
    from iserve import subjects
    from iserve.messages import Configuration, ErrorReply, LaunchReply, LaunchWorker, StageSpec, decoder, encode

    info = await client.register(str(copy_model(tiny_model, tmp_path / "reg")))
    layers = info.record.arch.num_layers

    def launch(path: str, memory: int) -> LaunchWorker:
        stage = StageSpec(gpu_index=0, first_layer=0, num_layers=layers, memory_bytes=memory)
        return LaunchWorker(
            worker_id="w-x", deployment_id="x", model=info.record.name, model_path=path, config=Configuration(),
            stages=[stage],
        )  # fmt: skip

    for bad, words in (
        (launch(str(tiny_model), 1 << 20), "is registered at"),
        (launch(info.record.path, 0), "no memory"),
    ):
        msg = await client.nc.request(subjects.agent_launch("a0"), encode(bad), timeout=10)
        reply = decoder(LaunchReply | ErrorReply).decode(msg.data)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request" and words in reply.message, reply


async def test_a_full_queue_answers_overloaded_and_the_queue_goes_on(nats_server, client, tiny_model, tmp_path):
    import asyncio

    from test_services import collect, deployed

    async with Cluster(nats_server.url, tmp_path, max_queued=1):
        name, rep = await deployed(client, copy_model(tiny_model, tmp_path / "q"), max_batch=1)
        running = asyncio.create_task(collect(client, name, "long", max_tokens=120, ignore_eos=True))
        while (await client.scheduler_stats()).queues[0].in_flight == 0:
            await asyncio.sleep(0.05)
        waiting = asyncio.create_task(collect(client, name, "next", max_tokens=2, ignore_eos=True))
        while (await client.scheduler_stats()).queues[0].queue_depth == 0:
            await asyncio.sleep(0.02)
        with pytest.raises(errors.Overloaded, match="1 requests waiting"):
            await collect(client, name, "one too many", max_tokens=2)
        assert (await running)[1].completion_tokens == 120 and (await waiting)[1].completion_tokens == 2
