"""Who may say what on the bus: one NATS user per role, least-privilege permissions, credentials.

``iserve up`` runs its nats-server with :func:`server_config`: every connection authenticates as one
of :data:`ROLES` and may publish and subscribe only where its role needs to. What it prevents: a
client cannot launch or stop workers, forge ``worker.exited`` or load events, write the JetStream
buckets, or read another connection's replies (each role has its own inbox prefix,
``_INBOX.<role>``, and may subscribe only under it). The role table is the single source; the
permissions are pure data, so tests read them directly (docs/reliability.md).

Credentials are JSON files ``{"user": ..., "password": ...}`` readable by their owner only, one per
role, in ``<data dir>/credentials/``; a process points at its file with ``--nats-creds`` /
``ISERVE_NATS_CREDS``. The server config holds the same passwords and is written 0600 too.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from . import subjects as S
from .errors import BadRequest

Role = Literal["agent", "fingerprint", "deployer", "scheduler", "gateway", "client"]
ROLES: tuple[Role, ...] = get_args(Role)
CREDS_ENV = "ISERVE_NATS_CREDS"
TLS_CA_ENV = "ISERVE_NATS_TLS_CA"

P = S.PREFIX
BUCKETS = (S.BUCKET_MODELS, S.BUCKET_PROFILES, S.BUCKET_DEPLOYMENTS, S.BUCKET_AUTOSCALER)


def inbox_prefix(role: str) -> str:
    """Where a connection of ``role`` receives replies; only that role may subscribe there."""
    return f"_INBOX.{role}"


def _js_read() -> list[str]:
    """Read and watch any iServe bucket (KV get, history, watchers), create/bind it on start-up.
    (NATS wildcards match whole tokens only, so each bucket's stream is named.)"""
    out = ["$JS.API.INFO", "$JS.FC.>"]  # $JS.FC: flow-control replies of ordered consumers (watchers)
    for b in BUCKETS:
        kv = f"KV_{b}"
        out += [
            f"$JS.API.STREAM.INFO.{kv}",
            f"$JS.API.STREAM.CREATE.{kv}",
            f"$JS.API.STREAM.MSG.GET.{kv}",
            f"$JS.API.DIRECT.GET.{kv}",
            f"$JS.API.DIRECT.GET.{kv}.>",
            f"$JS.API.CONSUMER.CREATE.{kv}",
            f"$JS.API.CONSUMER.CREATE.{kv}.>",
            f"$JS.API.CONSUMER.INFO.{kv}.*",
            f"$JS.API.CONSUMER.DELETE.{kv}.*",
        ]
    return out


def _js_write(*buckets: str) -> list[str]:
    return [f"$KV.{b}.>" for b in buckets] + [f"$JS.API.STREAM.PURGE.KV_{b}" for b in buckets]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


_CLIENT_PUB = [
    S.MODEL_REGISTER,
    S.MODEL_GET,
    S.MODEL_LIST,
    S.MODEL_UNREGISTER,
    S.PROFILE_GET,
    S.DEPLOY_REQUEST,
    S.UNDEPLOY_REQUEST,
    S.DEPLOYMENT_LIST,
    S.INFER,
    S.INFER_CANCEL,
    S.SCHEDULER_STATS,
]
_EVENTS = [S.DEPLOYMENT_CHANGED, S.PROFILE_DONE, S.MODEL_REGISTERED, S.GPU_LOAD_ALL, S.WORKER_READY, S.WORKER_EXITED]


def permissions(role: Role) -> Permissions:
    """What ``role`` may publish and subscribe to (every role may also answer requests it receives:
    the server config sets ``allow_responses``)."""
    inbox = inbox_prefix(role) + ".>"
    pub: list[str]
    sub: list[str]
    if role == "agent":  # the gpu-agent and the workers it starts
        pub = [
            S.GPU_LOAD_ALL,
            S.WORKER_READY,
            S.WORKER_EXITED,
            f"{S.WORKER_HEARTBEAT}.>",
            inbox_prefix("scheduler") + ".>",
            S.MODEL_GET,  # a launch's model path is checked against the registry
        ]
        sub = [f"{P}.agent.*.>", S.worker_generate("*"), S.worker_cancel("*"), f"{S.WORKER_HEARTBEAT}.>"]
    elif role == "deployer":
        pub = [
            f"{P}.agent.*.launch",
            f"{P}.agent.*.stop",
            S.DEPLOYMENT_CHANGED,
            S.MODEL_GET,
            S.MODEL_LIST,
            S.PROFILE_GET,
        ]
        pub += _js_read() + _js_write(S.BUCKET_DEPLOYMENTS, S.BUCKET_AUTOSCALER)
        sub = [
            S.DEPLOY_REQUEST,
            S.UNDEPLOY_REQUEST,
            S.DEPLOYMENT_LIST,
            f"{S.WORKER_HEARTBEAT}.>",
            S.SCHEDULER_LOAD,  # the autoscaler's observations
            *_EVENTS,
        ]
    elif role == "fingerprint":
        pub = [f"{P}.agent.*.profile", S.MODEL_REGISTERED, S.PROFILE_DONE, S.DEPLOYMENT_LIST]
        pub += _js_read() + _js_write(S.BUCKET_MODELS, S.BUCKET_PROFILES)
        sub = [S.MODEL_REGISTER, S.MODEL_GET, S.MODEL_LIST, S.MODEL_UNREGISTER, S.PROFILE_GET, *_EVENTS]
    elif role == "scheduler":
        # streams go to whoever asked (a client, the gateway): any inbox, never a system subject
        pub = [S.worker_generate("*"), S.worker_cancel("*"), "_INBOX.>", S.DEPLOYMENT_LIST, S.SCHEDULER_LOAD]
        pub += _js_read()
        sub = [S.INFER, S.INFER_CANCEL, S.SCHEDULER_STATS, f"{S.WORKER_HEARTBEAT}.>", *_EVENTS]
    else:  # "client" (CLI, loadgen, SDK) and "gateway": register, deploy, infer and read
        pub, sub = list(_CLIENT_PUB), list(_EVENTS)
        if role == "gateway":  # its model cache follows the models bucket's writes (model_cache.py)
            sub.append(f"$KV.{S.BUCKET_MODELS}.>")
    return Permissions(publish=tuple(pub), subscribe=tuple([*sub, inbox]))


def server_config(passwords: Mapping[Role, str], *, tls_cert: str = "", tls_key: str = "") -> str:
    """The ``authorization`` block of a nats-server config (none without ``passwords``), and its
    ``tls`` block with a certificate."""
    users = []
    for role, password in passwords.items():
        perms = permissions(role)
        users.append(
            {
                "user": role,
                "password": password,
                "permissions": {
                    "publish": {"allow": list(perms.publish)},
                    "subscribe": {"allow": list(perms.subscribe)},
                    # one reply to each request received, however long the work takes (profiling: minutes;
                    # the server's default lets a reply permission lapse after 2 minutes)
                    "allow_responses": {"max": 1, "expires": "24h"},
                },
            }
        )
    text = "authorization " + json.dumps({"users": users}, indent=1) + "\n" if users else ""
    if tls_cert or tls_key:
        if not (tls_cert and tls_key):
            raise BadRequest("TLS needs both --nats-tls-cert and --nats-tls-key.")
        text += "tls " + json.dumps({"cert_file": tls_cert, "key_file": tls_key}) + "\n"
    return text


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only, never briefly readable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def creds_path(data_dir: Path, role: Role) -> Path:
    return data_dir / "credentials" / f"{role}.json"


def ensure_credentials(data_dir: Path) -> dict[Role, str]:
    """Each role's password, made on first use and kept in ``data_dir/credentials`` (0600), so
    clients keep working across restarts of the stack."""
    out: dict[Role, str] = {}
    for role in ROLES:
        path = creds_path(data_dir, role)
        if path.is_file():
            out[role] = load_credentials(path).password
            continue
        out[role] = secrets.token_urlsafe(24)
        write_private(path, json.dumps({"user": role, "password": out[role]}) + "\n")
    return out


def load_credentials(path: str | os.PathLike) -> Credentials:
    """The credentials in ``path``; a sentence saying what to fix when it cannot be used."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return Credentials(user=str(data["user"]), password=str(data["password"]))
    except FileNotFoundError:
        raise BadRequest(
            f"NATS credentials file {p} does not exist; `iserve up` writes them in <data dir>/credentials."
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadRequest(f"NATS credentials file {p} is unreadable ({e}); expected {{'user': ..., 'password': ...}}.")


def write_server_files(data_dir: Path, *, tls_cert: str = "", tls_key: str = "") -> Path:
    """Credentials for every role (kept if present) and the nats-server config that checks them,
    ``data_dir/nats/nats.conf``: what ``iserve nats-config`` writes for a NATS run outside ``iserve up``
    (docker compose)."""
    config = server_config(ensure_credentials(data_dir), tls_cert=tls_cert, tls_key=tls_key)
    return write_private(data_dir / "nats" / "nats.conf", config)
