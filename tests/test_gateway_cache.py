"""The gateway's model cache: a request is checked without a round trip, and registering,
deploying, undeploying, unregistering and re-registering a model are seen at once (real services,
real nats-server, real HTTP)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from test_services import Cluster, copy_model, deployed

from iserve import bus, errors
from iserve.client import Client
from iserve.gateway.config import GatewayConfig, check
from iserve.gateway.model_cache import Cached, ModelCache, is_fresh
from iserve.gateway.service import GatewayService
from iserve.natsserver import free_port
from iserve.tokenizer_files import write_byte_tokenizer


def test_an_entry_is_fresh_for_ttl_seconds():
    entry = Cached(record=None, at=10.0)  # type: ignore[arg-type]
    assert is_fresh(entry, 39.9, 30.0) and not is_fresh(entry, 40.0, 30.0)
    assert not is_fresh(None, 10.0, 30.0) and not is_fresh(entry, 10.0, 0.0)


async def test_a_reply_older_than_an_update_is_not_kept():
    class SlowClient:
        async def model(self, name):
            await cache.on_update(Deleted())  # the model is unregistered while its lookup is in flight
            return type("Info", (), {"record": "old record"})()

    class Deleted:
        subject = "$KV.iserve_models.m"
        headers = {"KV-Operation": "DEL"}
        data = b""

    cache = ModelCache(SlowClient(), ttl_s=60.0)  # type: ignore[arg-type]
    assert await cache.get("m") == "old record"
    assert "m" not in cache.entries  # the next request asks again


async def _post(h: httpx.AsyncClient, model: str) -> httpx.Response:
    return await h.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2, "ignore_eos": True})


async def _until(predicate, what: str) -> None:
    for _ in range(100):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_gateway_sees_models_come_and_go_without_waiting_for_its_cache(nats_server, tmp_path, tiny_model):
    async with Cluster(nats_server.url, tmp_path) as cluster:
        cluster.services["deployer"].cfg.default_max_batch = 1
        port = free_port()
        # a long TTL: whatever is seen below is seen through the bucket's updates, not by expiry
        cfg = GatewayConfig(nats_url=nats_server.url, log_level="warning", log_json=True, http_port=port, no_auth=True)
        cfg.model_cache_s = 3600.0
        gw = GatewayService(check(cfg), await bus.connect(nats_server.url, "gateway"))
        await gw.start()
        cache = gw.gateway.model_cache
        client = await Client.connect(nats_server.url)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as h:
                r = await _post(h, "late")
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
                model = copy_model(tiny_model, tmp_path / "late")
                write_byte_tokenizer(model)
                name, rep = await deployed(client, model, "late")
                assert (await _post(h, name)).status_code == 200
                asked = cache.asked
                assert (await _post(h, name)).status_code == 200
                assert cache.asked == asked  # served from the cache

                await client.undeploy(rep.deployment.deployment_id)
                r = await _post(h, name)
                assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"

                assert name in cache.entries
                await client.unregister(name)
                await _until(lambda: name not in cache.entries, "the unregistration to reach the gateway")
                r = await _post(h, name)
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

                # the same name, now a checkpoint without a tokenizer: the new record is what counts
                bare = copy_model(tiny_model, tmp_path / "bare")
                await client.register(str(bare), name)
                r = await _post(h, name)
                assert r.status_code == 400 and "no tokenizer.json" in r.json()["error"]["message"]
                with pytest.raises(errors.NotFound):
                    await cache.get("a b")  # a name no model can have
        finally:
            await client.close()
            await gw.close()
            await gw.nc.drain()
