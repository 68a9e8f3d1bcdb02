"""NATS plumbing shared by every service: connect, typed request-reply, streamed replies, typed
JetStream key-value buckets.

Handlers registered with ``serve`` never die on bad input: a message that fails to decode gets an
``ErrorReply(code="bad_request")``, an ``IServeError`` becomes its own reply, and any other exception
is logged and answered with ``code="internal"``.
"""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from . import auth, errors
from .messages import Completion, ErrorReply, Message, StreamMessage, TokenChunk, decoder, encode

log = structlog.get_logger()

Req = TypeVar("Req", bound=Message)
Rep = TypeVar("Rep", bound=Message)
T = TypeVar("T", bound=msgspec.Struct)


async def connect(
    url: str,
    name: str,
    *,
    creds: str | os.PathLike | None = None,
    connect_timeout: float = 5.0,
    give_up_after: float | None = None,
) -> NATS:
    """Connect with unlimited reconnects (a restarted nats-server is picked up again). A service
    waits for its server as long as it takes; a command (``give_up_after`` seconds) raises
    ``Unavailable`` with a sentence instead of retrying forever.

    ``creds`` (else ``$ISERVE_NATS_CREDS``) names a credentials file (``auth.load_credentials``):
    the connection then authenticates as that user and takes replies under its role's inbox prefix.
    ``$ISERVE_NATS_TLS_CA`` names the CA that signed a ``tls://`` server's certificate."""

    holder: list[NATS] = []

    refused: list[str] = []
    refused_now = asyncio.Event()  # a command stops at the first refusal instead of retrying

    async def on_error(e: Exception) -> None:
        if "authorization violation" in str(e).lower():
            refused.append(str(e))
            refused_now.set()
        if give_up_after is not None and not holder:
            return  # a command still connecting: its error says what went wrong, once
        log.warning("nats error", error=str(e))

    async def on_disconnect() -> None:
        closing = bool(holder) and (holder[0].is_draining or holder[0].is_closed)
        if not closing:  # a drain at shutdown disconnects too; that is not news
            log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    creds = creds or os.environ.get(auth.CREDS_ENV) or None
    login: dict[str, Any] = {}
    if creds:
        c = auth.load_credentials(creds)
        login = {"user": c.user, "password": c.password, "inbox_prefix": auth.inbox_prefix(c.user)}
    ca = os.environ.get(auth.TLS_CA_ENV)
    if ca:
        login["tls"] = ssl.create_default_context(cafile=ca)
    try:
        connecting = nats.connect(
            [u.strip() for u in url.split(",") if u.strip()],  # a cluster: several URLs, comma-separated
            name=name,
            **login,
            connect_timeout=connect_timeout,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        if give_up_after is None:
            nc = await connecting
        else:
            task = asyncio.ensure_future(connecting)
            watch = asyncio.ensure_future(refused_now.wait())
            await asyncio.wait({task, watch}, timeout=give_up_after, return_when=asyncio.FIRST_COMPLETED)
            watch.cancel()
            if not task.done():
                task.cancel()
                raise asyncio.TimeoutError()
            nc = task.result()
        holder.append(nc)
        return nc
    except (OSError, nats.errors.NoServersError, asyncio.TimeoutError) as e:
        if refused:
            who = f"user {login['user']}" if creds else "a connection without credentials"
            raise errors.BadRequest(
                f"NATS at {url} refused {who} ({refused[-1]}); pass the credentials `iserve up` wrote "
                f"(--nats-creds or ${auth.CREDS_ENV}, in <data dir>/credentials)."
            ) from None
        why = str(e) or f"no answer in {give_up_after or connect_timeout:g} s"
        raise errors.Unavailable(
            f"cannot reach NATS at {url} ({why}); start one with `iserve up` or pass --nats-url."
        ) from None


def bad_request_reply(kind: type, subject: str, err: Exception) -> ErrorReply:
    return ErrorReply(
        code=errors.BadRequest.code,
        message=f"malformed {kind.__name__ if isinstance(kind, type) else 'message'} on {subject}: {err}; "
        "send a message that matches iserve.messages.",
    )


async def reply_to(nc: NATS, msg: Msg, reply: msgspec.Struct) -> None:
    if msg.reply:
        await nc.publish(msg.reply, encode(reply))


def serve(
    nc: NATS,
    subject: str,
    kind: type[Req],
    handler: Callable[[Req, Msg], Awaitable[msgspec.Struct | None]],
    *,
    queue: str = "",
    concurrent: bool = True,
) -> Awaitable[Any]:
    """Subscribe ``handler`` to ``subject``. Each message is decoded as ``kind``; the handler's return
    value (if any) is the reply. With ``concurrent`` each message runs in its own task."""
    dec = decoder(kind)
    tasks: set[asyncio.Task] = set()

    async def handle(msg: Msg) -> None:
        try:
            req = dec.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.warning("bad request", subject=msg.subject, error=str(e))
            await reply_to(nc, msg, bad_request_reply(kind, msg.subject, e))
            return
        try:
            reply = await handler(req, msg)
        except errors.IServeError as e:
            log.info("request refused", subject=msg.subject, code=e.code, error=e.message)
            reply = e.to_reply()
        except Exception as e:  # a bug: keep serving, tell the caller
            log.exception("handler failed", subject=msg.subject)
            reply = ErrorReply(
                code=errors.InternalError.code,
                message=f"internal error handling {msg.subject}: {type(e).__name__}: {e}",
            )
        if reply is not None:
            try:
                await reply_to(nc, msg, reply)
            except Exception:
                log.exception("reply failed", subject=msg.subject)

    async def cb(msg: Msg) -> None:
        if concurrent:
            t = asyncio.create_task(handle(msg))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        else:
            await handle(msg)

    return nc.subscribe(subject, queue=queue, cb=cb)


async def request(nc: NATS, subject: str, msg: msgspec.Struct, kind: type[Rep], *, timeout: float = 10.0) -> Rep:
    """Send ``msg`` and decode the reply as ``kind``; an ``ErrorReply`` raises its ``IServeError``."""
    try:
        resp = await nc.request(subject, encode(msg), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise errors.Unavailable(f"nobody serves {subject}; is the service running (`iserve status`)?") from None
    except nats.errors.TimeoutError:
        raise errors.Timeout(
            f"no reply on {subject} within {timeout:.0f} s; the service may be overloaded or stuck."
        ) from None
    try:
        reply = decoder(kind | ErrorReply).decode(resp.data)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise errors.InternalError(f"unexpected reply on {subject}: {e}") from None
    if isinstance(reply, ErrorReply):
        raise errors.from_reply(reply)
    return reply


KEEPALIVE_MISSES = 4  # keep-alive intervals a stream waits before it declares its scheduler gone


class Stream:
    """The receiving end of a streamed reply: an inbox subscription yielding ``TokenChunk`` messages
    and ending with a ``Completion`` (returned by ``iterate``'s caller via ``.completion``).

    ``expect_keepalive(s)``: the sender promised an empty keep-alive at least every ``s`` seconds
    (``Accepted.keepalive_s``); ``KEEPALIVE_MISSES`` intervals without any message then raise
    ``Unavailable`` instead of waiting for ``idle_timeout``."""

    def __init__(self, nc: NATS, *, idle_timeout: float):
        self.nc = nc
        self.inbox = nc.new_inbox()
        self.idle_timeout = idle_timeout
        self.liveness_s = 0.0
        self.completion: Completion | None = None
        self._sub: Subscription | None = None

    def expect_keepalive(self, interval_s: float) -> None:
        self.liveness_s = KEEPALIVE_MISSES * interval_s if interval_s > 0 else 0.0

    async def open(self) -> "Stream":
        self._sub = await self.nc.subscribe(self.inbox)
        return self

    async def close(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None

    async def _next(self) -> Msg:
        """The next message with data; keep-alives (empty) only prove that the sender is alive."""
        assert self._sub is not None, "call open() first"
        loop = asyncio.get_running_loop()
        last_data = last_any = loop.time()
        while True:
            wait = self.idle_timeout - (loop.time() - last_data)
            if self.liveness_s > 0:
                wait = min(wait, self.liveness_s - (loop.time() - last_any))
            try:
                msg = await self._sub.next_msg(timeout=max(wait, 0.001))
            except nats.errors.TimeoutError:
                t = loop.time()
                if self.liveness_s > 0 and t - last_any >= self.liveness_s:
                    raise errors.Unavailable(
                        f"the scheduler holding this request sent nothing for {t - last_any:.0f} s (it promised a "
                        f"keep-alive every {self.liveness_s / KEEPALIVE_MISSES:g} s): it died or lost its "
                        "connection; send the request again."
                    ) from None
                if t - last_data >= self.idle_timeout:
                    raise errors.Timeout(
                        f"the stream went silent for {self.idle_timeout:.0f} s; the worker may be stuck."
                    ) from None
                continue
            last_any = loop.time()
            if msg.data:
                return msg

    async def __aiter__(self) -> AsyncIterator[TokenChunk]:
        dec = decoder(StreamMessage)
        while True:
            msg = await self._next()
            try:
                item = dec.decode(msg.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                raise errors.InternalError(f"malformed stream message: {e}") from None
            if isinstance(item, ErrorReply):
                raise errors.from_reply(item)
            if isinstance(item, Completion):
                self.completion = item
                return
            yield item


# ---------------------------------------------------------------------------------------------------
# JetStream key-value


_KEY_BAD = re.compile(r"[^-/_=.a-zA-Z0-9]")
_KEY_OK = re.compile(r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$")  # the NATS KV key rule


def valid_key(key: str) -> bool:
    """Whether ``key`` can name a KV entry (NATS: dot-separated tokens of ``-/_=`` and alphanumerics)."""
    return bool(_KEY_OK.match(key))


def kv_key(*parts: str) -> str:
    """A valid KV key from free text (GPU names have spaces): other characters become '_'."""
    return ".".join(_KEY_BAD.sub("_", p) for p in parts)


async def bucket(nc: NATS, name: str, *, history: int = 5, replicas: int = 1) -> KeyValue:
    """Bind the KV bucket ``name``, creating it (with ``replicas`` copies on a NATS cluster) if absent."""
    js = nc.jetstream()
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(bucket=name, history=history, replicas=replicas)
    except nats.js.errors.BadRequestError:
        # another service created it between our two calls
        return await js.key_value(name)


class TypedKV(Generic[T]):
    """A JetStream KV bucket whose values are one msgspec Struct type (JSON)."""

    def __init__(self, kv: KeyValue, kind: type[T], *, js: Any = None, name: str = ""):
        self.kv = kv
        self.kind = kind
        self._dec = msgspec.json.Decoder(kind)
        self._js = js
        self._name = name

    @classmethod
    async def open(cls, nc: NATS, name: str, kind: type[T], *, replicas: int = 1) -> "TypedKV[T]":
        return cls(await bucket(nc, name, replicas=replicas), kind, js=nc.jetstream(), name=name)

    def _writable(self, key: str) -> str:
        if not valid_key(key):
            raise errors.BadRequest(
                f"{key!r} cannot name an entry of {self._name or 'the bucket'}: use letters, digits, '-', '_', "
                "'=', '/' and single dots."
            )
        return key

    async def get(self, key: str) -> T | None:
        """The entry of ``key``; None if there is none (a key no entry can have, e.g. with a space, has none)."""
        if not valid_key(key):
            return None
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return self._dec.decode(entry.value)

    async def get_with_revision(self, key: str) -> tuple[T | None, int]:
        if not valid_key(key):
            return None, 0
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, entry.revision or 0
        return self._dec.decode(entry.value), entry.revision or 0

    async def put(self, key: str, value: T) -> int:
        """Write ``value``; ``BadRequest`` if ``key`` cannot name an entry."""
        return await self.kv.put(self._writable(key), msgspec.json.encode(value))

    async def create(self, key: str, value: T) -> bool:
        """Write only if the key does not exist; False if it does (atomic)."""
        try:
            await self.kv.create(self._writable(key), msgspec.json.encode(value))
            return True
        except nats.js.errors.KeyWrongLastSequenceError:
            return False

    async def delete(self, key: str) -> None:
        if not valid_key(key):
            return  # no entry can have it
        try:
            await self.kv.delete(key)
        except nats.js.errors.KeyNotFoundError:
            pass

    async def keys(self) -> list[str]:
        """Every key that has an entry (a deleted key may be listed; :meth:`get` then returns None).

        Read from the bucket's stream (``KV_<bucket>``, subjects ``$KV.<bucket>.<key>``, the NATS KV
        layout) rather than with nats-py's ``KeyValue.keys()``: that one watches the bucket and, on a
        busy process, can signal "no more keys" before the watch's first messages are processed,
        returning no keys at all, which made a loaded deployer answer an empty deployment list (and
        the scheduler drop every replica with the requests running on it)."""
        if self._js is None:
            try:
                return list(await self.kv.keys())
            except nats.js.errors.NoKeysError:
                return []
        prefix = f"$KV.{self._name}."
        info = await self._js.stream_info(f"KV_{self._name}", subjects_filter=f"{prefix}>")
        return sorted(subject[len(prefix) :] for subject in (info.state.subjects or {}))

    async def values(self) -> list[T]:
        """Every entry; one that no longer decodes (written under older constraints) is logged and skipped,
        so that a single bad record cannot stop a service from starting."""
        out = []
        for k in await self.keys():
            try:
                v = await self.get(k)
            except msgspec.ValidationError as e:
                log.warning("skipping an entry that does not decode", bucket=self._name, key=k, error=str(e))
                continue
            if v is not None:
                out.append(v)
        return out
