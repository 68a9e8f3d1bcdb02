"""The OpenAI-compatible gateway: the official ``openai`` client (and raw HTTP) against the gateway
over the real services and a real nats-server, simulated GPUs, CPU workers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import pytest_asyncio
from test_services import Cluster, copy_model, deployed

from iserve.client import Client
from iserve.gateway.config import GatewayConfig, check
from iserve.gateway.service import GatewayService
from iserve.natsserver import free_port
from iserve.tokenizer_files import write_byte_tokenizer

openai = pytest.importorskip("openai")  # a test dependency; absent on the GPU hosts
KEY = "test-key"


# One stack for the module: deploying three models takes longer than the tests that use them.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, tiny_model):
    """Services, a deployed tiny model with a real tokenizer.json and chat template, and the gateway."""
    from iserve import bus
    from iserve.natsserver import EmbeddedNats

    tmp_path = tmp_path_factory.mktemp("gateway")
    with EmbeddedNats(tmp_path / "nats") as nats_server:
        async with Cluster(nats_server.url, tmp_path, context_tokens=2048) as cluster:
            cluster.services["deployer"].cfg.default_max_batch = 4
            model = copy_model(tiny_model, tmp_path / "chatty")
            write_byte_tokenizer(model)
            plain = copy_model(tiny_model, tmp_path / "plain")  # no tokenizer files
            nochat = copy_model(tiny_model, tmp_path / "nochat")
            write_byte_tokenizer(nochat, chat_template=None)
            client = await Client.connect(nats_server.url)
            name, _ = await deployed(client, model, "chatty")
            await deployed(client, plain, "plain")
            await deployed(client, nochat, "nochat")
            port = free_port()
            cfg = GatewayConfig(
                nats_url=nats_server.url, log_level="warning", log_json=True, http_port=port, api_key=KEY
            )
            gw = GatewayService(check(cfg), await bus.connect(nats_server.url, "gateway"))
            await gw.start()
            try:
                yield f"http://127.0.0.1:{port}", name, client
            finally:
                await gw.close()
                await gw.nc.drain()
                await client.close()


def metric(text: str, line_start: str) -> float:
    """The value of the sample whose line starts with ``line_start`` (0 when absent)."""
    return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)), 0.0)


async def test_the_openai_client_lists_completes_and_chats(stack):
    base, name, client = stack
    oa = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    models = await oa.models.list()
    assert {m.id for m in models.data} == {"chatty", "plain", "nochat"}

    done = await oa.completions.create(
        model=name, prompt="Hello", max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    assert done.usage.prompt_tokens == len("Hello") + 1  # byte tokens and BOS

    # streamed, with usage at the end: the same greedy text
    pieces, usage = [], None
    stream = await oa.completions.create(
        model=name,
        prompt="Hello",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == done.choices[0].text and usage.completion_tokens == 6

    # chat, rendered by the checkpoint's template on the worker, streamed and not
    chat = await oa.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    text = ""
    async for chunk in await oa.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == chat.choices[0].message.content


async def test_stop_strings_end_the_text_before_them(stack):
    base, name, _ = stack
    oa = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    full = await oa.completions.create(
        model=name, prompt="abc", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[5:8]
    assert len(stop) == 3
    cut = await oa.completions.create(
        model=name, prompt="abc", max_tokens=24, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


async def test_errors_are_openai_shaped_with_the_right_status(stack):
    base, name, _ = stack
    oa = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        await oa.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:
        await oa.completions.create(model=name, prompt="x", max_tokens=2, n=2)
    assert e.value.body["code"] == "bad_request" and "n" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # refused, not silently ignored
        await oa.completions.create(model=name, prompt="x", max_tokens=2, echo=True)
    assert "echo is not supported" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a tokenizer without a chat template
        await oa.chat.completions.create(model="nochat", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert "chat template" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # no tokenizer at all: no text endpoint serves it
        await oa.completions.create(model="plain", prompt="x", max_tokens=2)
    assert "no tokenizer.json" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        await oa.completions.create(model=name, prompt="x", max_tokens=5000)
    assert e.value.body["code"] == "prompt_too_long"
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    async with httpx.AsyncClient() as h:
        r = await h.post(base + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


async def test_health_ready_and_metrics_show_the_request_just_served(stack):
    base, name, _ = stack
    served = f'iserve_requests_total{{model="{name}",outcome="length"}}'
    tokens = f'iserve_completion_tokens_total{{model="{name}"}}'
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as h:
        assert (await h.get("/health")).json() == {"status": "ok"}
        ready = await h.get("/ready")
        assert ready.status_code == 200 and all(ready.json()["checks"].values())
        before = (await h.get("/metrics")).text
        r = await h.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200
        text = (await h.get("/metrics")).text
    assert metric(text, served) == metric(before, served) + 1
    assert metric(text, tokens) == metric(before, tokens) + 3
    assert "iserve_ttft_seconds_bucket" in text and 'iserve_deployments{state="ready"} 3.0' in text
    assert "iserve_kv_blocks_total" in text and "iserve_gpu_memory_total_bytes" in text


async def test_a_client_that_disconnects_cancels_its_request(stack):
    base, name, client = stack

    async def stats():
        return next(q for q in (await client.scheduler_stats()).queues if q.model == name)

    cancelled = (await stats()).cancelled
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}) as h:
        body = {"model": name, "prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        async with h.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break  # the first token came; now hang up
    for _ in range(100):
        q = await stats()
        if q.cancelled == cancelled + 1 and q.in_flight == 0:
            break
        await asyncio.sleep(0.1)
    assert q.cancelled == cancelled + 1 and q.in_flight == 0
