"""Command-line flags with environment-variable twins.

Every flag ``--foo-bar`` of a service also reads ``ISERVE_FOO_BAR`` (the flag wins); ``--help`` shows
both and the default. Services declare their flags in their ``config.py`` with ``flag(...)``.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable


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
    choices: list[str] | None = None,
) -> None:
    """Add ``--name`` whose default comes from ``ISERVE_NAME`` when set."""
    env = env_name(name)
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
    kwargs: dict[str, Any] = {"default": value, "help": f"{help} [env {env}; default {default!r}]"}
    if type is bool:
        kwargs["type"] = _parse_bool
        kwargs["nargs"] = "?"
        kwargs["const"] = True
    else:
        kwargs["type"] = conv
    if choices:
        kwargs["choices"] = choices
    parser.add_argument(name, **kwargs)


def common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags every service has."""
    flag(parser, "--nats-url", default="nats://127.0.0.1:4222", help="NATS server URL")
    flag(parser, "--log-level", default="info", help="log level", choices=["debug", "info", "warning", "error"])
    flag(parser, "--log-json", default=None, type=bool, help="JSON log lines (default: JSON unless stderr is a TTY)")
