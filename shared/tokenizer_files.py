"""A real ``tokenizer.json`` (Hugging Face ``tokenizers``) for random-weight checkpoints: byte-level,
ids 0/1/2 = ``<pad>``/``<s>``/``</s>`` and byte ``b`` = ``b + 3`` (the same ids as the engine's
byte fallback), with a chat template in ``tokenizer_config.json``, so that a made model serves
``/v1/completions`` and ``/v1/chat/completions`` like a released one."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>"]

# A ChatML-style template (system, user and assistant turns), written as transformers templates are.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (what ``ByteLevel`` expects)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_byte_tokenizer(model_dir: str | Path, *, chat_template: str | None = CHAT_TEMPLATE) -> None:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (with ``chat_template`` unless None)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    d = Path(model_dir)
    alphabet = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({alphabet[b]: b + len(SPECIALS) for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(d / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
