"""The authenticated bus: a nats-server configured by ``auth.server_config`` refuses connections
without credentials and keeps each role to its subjects (a client cannot launch workers, forge
worker events, write the buckets or read another role's replies)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess

import msgspec
import pytest

from iserve import auth, bus, errors
from iserve import subjects as S
from iserve.messages import InferRequest, LaunchWorker, StopWorker, decoder
from iserve.natsserver import EmbeddedNats


@pytest.fixture
def secured(tmp_path):
    passwords = auth.ensure_credentials(tmp_path)
    with EmbeddedNats(tmp_path / "nats", config=auth.server_config(passwords)) as srv:
        yield srv, tmp_path


async def _as(srv, tmp_path, role: auth.Role):
    return await bus.connect(srv.url, f"test-{role}", creds=auth.creds_path(tmp_path, role), give_up_after=5)


async def _delivered(sender, receiver, subject: str) -> bool:
    """Whether ``sender``'s publish on ``subject`` reaches ``receiver``'s subscription."""
    got: asyncio.Queue = asyncio.Queue()
    sub = await receiver.subscribe(subject, cb=got.put)
    await receiver.flush()
    await sender.publish(subject, b"{}")
    await sender.flush()
    try:
        await asyncio.wait_for(got.get(), 1.0)
        return True
    except asyncio.TimeoutError:
        return False
    finally:
        await sub.unsubscribe()


def test_credentials_are_private_and_kept(tmp_path):
    first = auth.ensure_credentials(tmp_path)
    assert set(first) == set(auth.ROLES) and len(set(first.values())) == len(auth.ROLES)
    for role in auth.ROLES:
        mode = stat.S_IMODE(os.stat(auth.creds_path(tmp_path, role)).st_mode)
        assert mode == 0o600, (role, oct(mode))
    assert auth.ensure_credentials(tmp_path) == first  # clients keep working across restarts


def test_a_client_may_not_publish_what_only_services_may():
    client = auth.permissions("client")
    for subject in (S.agent_launch("a0"), S.WORKER_EXITED, S.gpu_load("a0", 0), f"$KV.{S.BUCKET_MODELS}.m"):
        assert subject not in client.publish
    assert not any(s.startswith("$JS") for s in client.publish)
    assert client.subscribe[-1] == "_INBOX.client.>" and "_INBOX.>" not in client.subscribe


async def test_a_connection_without_credentials_is_refused_with_a_sentence(secured):
    srv, _ = secured
    with pytest.raises(errors.BadRequest, match="refused a connection without credentials"):
        await bus.connect(srv.url, "anonymous", give_up_after=5)


async def test_a_wrong_credentials_file_is_named(secured, tmp_path):
    srv, _ = secured
    with pytest.raises(errors.BadRequest, match="does not exist"):
        await bus.connect(srv.url, "x", creds=tmp_path / "nope.json", give_up_after=5)


async def test_each_role_is_kept_to_its_subjects(secured):
    srv, d = secured
    client, deployer, agent, scheduler = [await _as(srv, d, r) for r in ("client", "deployer", "agent", "scheduler")]
    try:
        assert await _delivered(scheduler, deployer, S.SCHEDULER_LOAD)  # the autoscaler's observations
        launch = S.agent_launch("a0")
        assert await _delivered(deployer, agent, launch)  # the deployer may launch workers
        assert not await _delivered(client, agent, launch)  # a client may not
        assert not await _delivered(client, agent, S.agent_stop("a0"))
        assert await _delivered(agent, deployer, S.WORKER_EXITED)
        assert not await _delivered(client, deployer, S.WORKER_EXITED)  # no forged exits
        assert not await _delivered(client, deployer, S.gpu_load("a0", 0))
        assert not await _delivered(client, deployer, S.SCHEDULER_LOAD)  # no forged load
        assert await _delivered(client, scheduler, S.INFER)
        # the scheduler streams to any inbox, never onto a system subject
        assert await _delivered(scheduler, client, "_INBOX.client.abc")
        assert not await _delivered(scheduler, deployer, S.WORKER_EXITED)
        # a client may not watch another role's replies
        assert not await _delivered(scheduler, client, "_INBOX.gateway.abc")
        # request-reply works across roles: the deployer answers the client once

        async def answer(msg) -> None:
            await msg.respond(b"ok")

        await deployer.subscribe(S.DEPLOYMENT_LIST, cb=answer)
        await deployer.flush()
        assert (await client.request(S.DEPLOYMENT_LIST, b"{}", timeout=2)).data == b"ok"
    finally:
        for nc in (client, deployer, agent, scheduler):
            await nc.close()


async def test_only_a_bucket_s_owner_writes_it(secured):
    srv, d = secured
    deployer, scheduler, client = [await _as(srv, d, r) for r in ("deployer", "scheduler", "client")]
    try:
        kv = await bus.bucket(deployer, S.BUCKET_DEPLOYMENTS)
        await kv.put("d1", b"v")
        read = await bus.bucket(scheduler, S.BUCKET_DEPLOYMENTS)
        assert (await read.get("d1")).value == b"v"  # the scheduler reads deployments
        with pytest.raises(Exception):
            await asyncio.wait_for(read.put("d1", b"forged"), 2)
        assert (await kv.get("d1")).value == b"v"
        scaler = await bus.bucket(deployer, S.BUCKET_AUTOSCALER)  # the autoscaler's state: the deployer's
        await scaler.put("m", b"s")
        with pytest.raises(Exception):
            await asyncio.wait_for((await bus.bucket(scheduler, S.BUCKET_AUTOSCALER)).put("m", b"forged"), 2)
        with pytest.raises(Exception):  # a client has no JetStream access at all
            await asyncio.wait_for(bus.bucket(client, S.BUCKET_DEPLOYMENTS), 2)
    finally:
        for nc in (deployer, scheduler, client):
            await nc.close()


@pytest.mark.parametrize("stream_to", ["iserve.v1.worker.exited", "iserve.v1.agent.a0.launch", "_INBOX.>", "x"])
def test_streams_go_only_to_inboxes(stream_to):
    with pytest.raises(msgspec.ValidationError, match="stream_to"):
        decoder(InferRequest).decode(
            msgspec.json.encode({"request_id": "r", "model": "m", "prompt": "p", "stream_to": stream_to})
        )


def test_worker_ids_are_names_not_paths():
    for bad in ("../../etc/x", "a/b", "", ".hidden"):
        with pytest.raises(msgspec.ValidationError, match="worker_id"):
            decoder(StopWorker).decode(msgspec.json.encode({"worker_id": bad}))
    assert decoder(StopWorker).decode(b'{"worker_id": "w-m-1a2b3c4d-9f"}').worker_id == "w-m-1a2b3c4d-9f"
    assert "worker_id" in LaunchWorker.__struct_fields__


@pytest.mark.parametrize(
    "field,value", [("timeout_s", 1e308), ("prompt_tokens", 360_000_000), ("max_tokens", 10**9), ("max_tokens", 0)]
)
def test_work_is_bounded_before_it_starts(field, value):
    with pytest.raises(msgspec.ValidationError, match=field):
        decoder(InferRequest).decode(
            msgspec.json.encode({"request_id": "r", "model": "m", "prompt": "p", field: value})
        )


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make a certificate")
async def test_tls_one_flag_away(tmp_path, monkeypatch):
    """The embedded server with a certificate speaks TLS only; a client trusting the CA connects
    (with its credentials), one that does not is refused."""
    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    run = lambda *a: subprocess.run(["openssl", *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=t")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = tmp_path / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", ext)  # fmt: skip
    passwords = auth.ensure_credentials(tmp_path)
    config = auth.server_config(passwords, tls_cert=str(cert), tls_key=str(key))
    with EmbeddedNats(tmp_path / "nats", config=config, tls=True) as srv:
        assert srv.url.startswith("tls://")
        monkeypatch.setenv(auth.TLS_CA_ENV, str(ca))
        nc = await bus.connect(srv.url, "t", creds=auth.creds_path(tmp_path, "client"), give_up_after=5)
        assert nc.is_connected
        await nc.close()
        monkeypatch.delenv(auth.TLS_CA_ENV)
        with pytest.raises(errors.IServeError):  # the server's certificate is not trusted
            await bus.connect(srv.url, "t", creds=auth.creds_path(tmp_path, "client"), give_up_after=3)
