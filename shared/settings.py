"""Command-line flags with environment-variable twins, generated from config dataclasses.

A service's config is a dataclass whose fields are declared with ``option(default, help=...)``; each
becomes a flag ``--field-name`` that also reads ``ISERVE_FIELD_NAME`` (the flag wins), and ``--help``
shows both and the default. A ``Literal`` field type gives the flag its choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import PurePath
from typing import Any, Callable, Literal, TypeVar, get_args, get_origin, get_type_hints

LogLevel = Literal["debug", "info", "warning", "error"]

C = TypeVar("C")


def env_name(flag: str) -> str:
    return "ISERVE_" + flag.lstrip("-").replace("-", "_").upper()


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def flag(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str = "",
    choices: typing.Sequence[str] | None = None,
    env: str = "",
) -> None:
    """Add ``--name`` whose default comes from ``ISERVE_NAME`` (or ``env``) when set."""
    env = env or env_name(name)
    conv = _parse_bool if type is bool else type
    raw = os.environ.get(env)
    value = default
    if raw is not None:
        try:
            value = conv(raw)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"environment variable {env}={raw!r} is invalid: {e}")
        if choices and value not in choices:  # argparse checks only values given as flags
            parser.error(f"environment variable {env}={raw!r} is invalid: use one of {', '.join(choices)}")
    shown = str(default) if isinstance(default, PurePath) else default
    kwargs: dict[str, Any] = {"default": value, "help": f"{help} [env {env}; default {shown!r}]"}
    if type is bool:
        kwargs["type"] = _parse_bool
        kwargs["nargs"] = "?"
        kwargs["const"] = True
    else:
        kwargs["type"] = conv
    if choices:
        kwargs["choices"] = list(choices)
    parser.add_argument(name, **kwargs)


def option(default: Any, *, help: str, flag: str = "", env: str = "", type: Callable[[str], Any] | None = None) -> Any:
    """A config field that is also a flag: ``--<field-name>`` unless ``flag`` names it, its
    environment twin derived from the flag unless ``env`` names it, its parser from the field's type
    unless ``type`` is given. A list default is copied for each instance."""
    meta = {"help": help, "flag": flag, "env": env, "type": type}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _parser_of(hint: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """The string parser and the choices of a field's type (``X | None`` is read as ``X``)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Literal:
        return str, get_args(hint)
    if hint in (bool, int, float, str):
        return hint, None
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return hint, None
    raise TypeError(f"no flag parser for {hint!r}; pass option(type=...)")


def options(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for each ``option`` field of ``cls``, with the field's default."""
    hints = get_type_hints(cls)
    for f in options(cls):
        conv, choices = (f.metadata["type"], None) if f.metadata["type"] else _parser_of(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag(
            parser,
            _flag_name(f),
            default=default,
            type=conv,
            help=f.metadata["help"],
            choices=choices,
            env=f.metadata["env"],
        )


def from_args(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """An instance of ``cls`` from parsed flags (``extra`` sets fields that are not flags)."""
    values = {f.name: getattr(args, _flag_name(f).lstrip("-").replace("-", "_")) for f in options(cls)}
    return cls(**values, **extra)


@dataclasses.dataclass
class ServiceConfig:
    """Flags every service has."""

    nats_url: str = option("nats://127.0.0.1:4222", help="NATS server URL")
    nats_creds: str = option("", help="NATS credentials file (`iserve up` writes them in <data dir>/credentials)")
    kv_replicas: int = option(
        1,
        help="copies of each JetStream bucket this service creates (3 on a three-node NATS cluster; docs/security.md)",
    )
    log_level: LogLevel = option("info", help="log level")
    log_json: bool | None = option(None, help="JSON log lines (default: JSON unless stderr is a TTY)")


def common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every service has."""
    add_flags(parser, ServiceConfig)


def add_env_twins(parser: argparse.ArgumentParser) -> None:
    """Give every ``--flag`` of ``parser`` and its sub-commands that has no environment twin yet the
    twin ``ISERVE_FLAG`` (the flag still wins): a set variable becomes the default, ``--help`` names
    it. Flags declared with ``flag``/``option`` (whose help already names their variable) are left
    as they are, and so is an action marked ``action.env_twin = False``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                add_env_twins(sub)
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or action.dest in ("help", "version") or "[env " in (action.help or ""):
            continue
        if not getattr(action, "env_twin", True):
            continue
        env = env_name(longs[0])
        action.help = f"{action.help or ''} [env {env}]".strip()
        raw = os.environ.get(env)
        if raw is None:
            continue
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                value: Any = _parse_bool(raw)
            elif isinstance(action, argparse.BooleanOptionalAction):
                value = _parse_bool(raw)
            elif action.type is not None and callable(action.type):
                value = action.type(raw)
            else:
                value = raw
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(f"environment variable {env}={raw!r} is invalid: {e}")
        if action.choices is not None and value not in action.choices:
            parser.error(
                f"environment variable {env}={raw!r} is invalid: use one of {', '.join(map(str, action.choices))}"
            )
        action.default = value
