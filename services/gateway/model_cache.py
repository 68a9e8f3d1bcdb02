"""The gateway's view of the registered models, so that a request is checked without a NATS round
trip: a ``ModelRecord`` per name, kept current by the ``iserve_models`` bucket's own messages.

Every put or delete of a JetStream KV bucket is a message on ``$KV.<bucket>.<key>``; a core
subscription to those subjects replaces or drops an entry as the fingerprint service writes it. A
name not cached is asked for (``model.get``) and cached, so a model registered a moment ago is seen at
once; an entry older than ``ttl_s`` is asked for again, which bounds how stale it can be if updates
were missed (NATS reconnecting). An unknown name is not cached: it costs a round trip each time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg

from iserve import subjects
from iserve.client import Client
from iserve.messages import ModelRecord

DELETES = ("DEL", "PURGE")


@dataclass
class Cached:
    record: ModelRecord
    at: float  # the cache's clock when it was stored


def is_fresh(entry: Cached | None, now: float, ttl_s: float) -> bool:
    """Whether ``entry`` may answer without asking the fingerprint service."""
    return entry is not None and now - entry.at < ttl_s


def update_of(msg: Msg, prefix: str) -> tuple[str, bool]:
    """The key a bucket message is about, and whether it deletes it."""
    op = (msg.headers or {}).get("KV-Operation", "")
    return msg.subject[len(prefix) :], op in DELETES or not msg.data


class ModelCache:
    """``get(name)``: the model's record (``NotFound`` if it is not registered)."""

    def __init__(self, client: Client, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.client = client
        self.ttl_s = ttl_s
        self.clock = clock
        self.entries: dict[str, Cached] = {}
        self.changes: dict[str, int] = {}  # name -> updates seen, so a reply older than an update is not kept
        self.asked = 0  # round trips made (the tests read it)
        self._prefix = subjects.kv_updates(subjects.BUCKET_MODELS)[:-1]
        self._dec = msgspec.json.Decoder(ModelRecord)

    @property
    def subject(self) -> str:
        return subjects.kv_updates(subjects.BUCKET_MODELS)

    async def on_update(self, msg: Msg) -> None:
        name, deleted = update_of(msg, self._prefix)
        self.changes[name] = self.changes.get(name, 0) + 1
        if deleted:
            self.entries.pop(name, None)
            return
        try:
            self.entries[name] = Cached(self._dec.decode(msg.data), self.clock())
        except (msgspec.ValidationError, msgspec.DecodeError):
            self.entries.pop(name, None)  # asked for on the next request instead

    async def get(self, name: str) -> ModelRecord:
        entry = self.entries.get(name)
        if is_fresh(entry, self.clock(), self.ttl_s):
            assert entry is not None
            return entry.record
        seen = self.changes.get(name, 0)
        self.asked += 1
        record = (await self.client.model(name)).record
        if self.ttl_s > 0 and self.changes.get(name, 0) == seen:
            self.entries[name] = Cached(record, self.clock())
        return record
