"""Chat templates: a checkpoint's own, rendered as ``transformers`` renders them (jinja2, sandboxed).

The template comes from ``chat_template.jinja`` (what current ``transformers`` saves) or from
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: "default").
A model without one cannot take chat requests: the caller gets a sentence saying so.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from iserve.errors import BadRequest


def load_chat_template(model_dir: str | Path) -> str | None:
    """The checkpoint's chat template, or None when it has none."""
    d = Path(model_dir)
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def _raise(message: str) -> None:
    raise BadRequest(f"the chat template refused the conversation: {message}")


@lru_cache(maxsize=16)
def _compiled(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, ensure_ascii=False, indent=indent, **kw)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str, messages: list[dict[str, Any]], *, bos_token: str, eos_token: str, add_generation_prompt: bool = True
) -> str:
    """The prompt text of ``messages`` (``{"role", "content"}``) under ``template``, ending with the
    assistant's turn opened (``add_generation_prompt``), as ``transformers``' ``apply_chat_template``
    renders it before tokenizing (special tokens in the text, none added by the tokenizer)."""
    from jinja2 import TemplateError

    try:
        return _compiled(template).render(
            messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as e:
        raise BadRequest(f"the model's chat template failed on this conversation: {e}") from None
