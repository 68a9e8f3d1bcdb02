"""Engine tokenizers: the byte-level fallback and tokenizer.json, including streamed UTF-8."""

from __future__ import annotations

import pytest

from iserve.checkpoint import arch_from_config
from iserve.errors import UnsupportedModel
from iserve.gpu_agent.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from iserve.presets import PRESETS

TEXT = "Grüße, 世界! 🙂 ok"


def stream(tok, ids):
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    return pieces, dec.flush()


def test_byte_round_trip():
    tok = ByteTokenizer(259)
    ids = tok.encode(TEXT)
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert ids[1:] == [b + 3 for b in TEXT.encode()]
    assert tok.encode(TEXT, add_bos=False) == ids[1:]
    assert tok.decode(ids) == TEXT
    assert max(ids) < 259


def test_byte_stream_holds_back_split_characters():
    tok = ByteTokenizer(259)
    ids = tok.encode(TEXT, add_bos=False)
    pieces, rest = stream(tok, ids)
    assert "".join(pieces) == TEXT and rest == ""
    assert all("\ufffd" not in p for p in pieces)
    # "ü" is two bytes: the first token gives nothing, the second the whole character.
    u = [b + 3 for b in "ü".encode()]
    dec = tok.stream_decoder()
    assert dec.push(u[0]) == "" and dec.push(u[1]) == "ü"
    # "🙂" is four bytes.
    dec = tok.stream_decoder()
    assert [dec.push(b + 3) for b in "🙂".encode()] == ["", "", "", "🙂"]


def test_byte_stream_specials_and_dangling_bytes():
    tok = ByteTokenizer(300)
    dec = tok.stream_decoder()
    assert dec.push(0) == dec.push(1) == dec.push(2) == ""
    assert dec.push(259) == dec.push(299) == ""  # ids past the byte range carry no text
    assert dec.push(ord("a") + 3) == "a"
    assert dec.push("é".encode()[0] + 3) == ""
    assert dec.flush() == "\ufffd"


def test_byte_tokenizer_needs_259_ids(tmp_path):
    with pytest.raises(UnsupportedModel, match="259"):
        ByteTokenizer(258)
    arch = arch_from_config({**PRESETS["tiny-llama"], "vocab_size": 200})
    with pytest.raises(UnsupportedModel, match="tokenizer.json"):
        load_tokenizer(tmp_path, arch)


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    tok = load_tokenizer(tmp_path, arch_from_config(PRESETS["tiny-llama"]))
    assert isinstance(tok, ByteTokenizer)


def _write_bpe_tokenizer(path):
    """A small byte-level BPE (GPT-2 style) trained on a few sentences: multi-byte characters it
    has not merged come out as several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world, hello there", "the world says hello", "Grüße aus der Welt"], trainer)
    tok.save(str(path))


def test_tokenizer_json(tmp_path):
    _write_bpe_tokenizer(tmp_path / "tokenizer.json")
    arch = arch_from_config(PRESETS["tiny-llama"])
    tok = load_tokenizer(tmp_path, arch)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT)
    assert ids[0] == arch.bos_token_id == tok.bos_id and tok.eos_id == arch.eos_token_id
    assert tok.decode(ids) == TEXT  # bos is a special token and is skipped
    assert len(tok.encode("hello world", add_bos=False)) < len("hello world")  # merges happened
    body = ids[1:]
    pieces, rest = stream(tok, body)
    assert "".join(pieces) + rest == TEXT
    assert all("\ufffd" not in p for p in pieces)
    # The emoji is split over several tokens: only the last one of them emits it.
    emoji_ids = tok.encode("🙂", add_bos=False)
    assert len(emoji_ids) > 1
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in emoji_ids][-1] == "🙂"


# ---------------------------------------------------------------------------------------------------
# chat templates


def test_chat_templates_are_read_from_either_file_and_rendered_like_transformers(tmp_path):
    import json

    from iserve.errors import BadRequest
    from iserve.gpu_agent.engine.chat import load_chat_template, render_chat

    assert load_chat_template(tmp_path) is None
    llama2 = (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] | trim + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "default", "template": llama2}]})
    )
    template = load_chat_template(tmp_path)
    assert template == llama2
    msgs = [
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Go"},
    ]
    assert render_chat(template, msgs, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] Hi [/INST] Hello </s><s>[INST] Go [/INST]"
    )
    with pytest.raises(BadRequest, match="alternate"):
        render_chat(template, msgs[:1] * 2, bos_token="<s>", eos_token="</s>")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # the newer file wins
    assert load_chat_template(tmp_path) == "{{ messages[0]['content'] }}"


def test_a_chat_request_is_rendered_by_the_template_and_refused_without_one(tmp_path):
    from iserve.checkpoint import scan_checkpoint
    from iserve.errors import BadRequest
    from iserve.gpu_agent.engine.tokenizer import load_tokenizer
    from iserve.gpu_agent.prompts import prompt_ids
    from iserve.messages import ChatMessage, InferRequest
    from iserve.modelmaker import make_checkpoint
    from iserve.tokenizer_files import write_byte_tokenizer

    path = make_checkpoint(tmp_path / "m", "tiny-llama", num_layers=1)
    arch = scan_checkpoint(path).arch
    chat = InferRequest(request_id="r", model="m", prompt="", messages=[ChatMessage(role="user", content="Hi")])
    with pytest.raises(BadRequest, match="no chat template"):
        prompt_ids(load_tokenizer(path, arch), chat, 256)  # the byte fallback has none
    write_byte_tokenizer(path)
    tok = load_tokenizer(path, arch)
    ids = prompt_ids(tok, chat, 256)
    assert ids[0] == tok.bos_id and tok.decode(ids) == "<|user|>\nHi\n<|assistant|>\n"
    plain = InferRequest(request_id="p", model="m", prompt="Hi")
    assert prompt_ids(tok, plain, 256) == [tok.bos_id, *tok.encode("Hi", add_bos=False)]
