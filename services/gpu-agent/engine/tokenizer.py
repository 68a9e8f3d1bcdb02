"""Tokenizers for the engine: a checkpoint's own ``tokenizer.json``, or a byte-level fallback.

``load_tokenizer`` picks one:

* ``tokenizer.json`` in the checkpoint folder: loaded with the Hugging Face ``tokenizers`` library.
* otherwise a ``ByteTokenizer``: id 0 = pad, 1 = bos, 2 = eos, byte ``b`` = id ``b + 3``. This is what
  the random-weight checkpoints of ``iserve.modelmaker`` use; any model whose vocabulary has at least
  259 entries can run with it.

Both give ``encode(text, add_bos=True) -> list[int]``, ``decode(ids) -> str``, ``bos_id``, ``eos_id``
and ``stream_decoder()``, whose ``push(token_id) -> str`` returns the text that token adds to the
output. Streamed pieces are never broken UTF-8: a character whose bytes are split over several tokens
comes out whole with the token that completes it.
"""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

from iserve.errors import CheckpointError, UnsupportedModel
from iserve.messages import ArchSpec

from .chat import load_chat_template

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b has id b + BYTE_OFFSET
BYTE_VOCAB = BYTE_OFFSET + 256


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text it completes (may be "")."""
        ...

    def flush(self) -> str:
        """Text still held back at the end of the stream (an incomplete character decodes as U+FFFD)."""
        ...


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    chat_template: str | None  # the checkpoint's (``chat.load_chat_template``); None: no chat requests

    def token_text(self, token_id: int | None) -> str:
        """A special token's text, as chat templates write it ("" for None)."""
        ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...


# ---------------------------------------------------------------------------------------------------
# byte-level fallback


class ByteStreamDecoder:
    """Turns byte-token ids back into text, holding back bytes of a character not yet complete."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if BYTE_OFFSET <= token_id < BYTE_VOCAB:
            return self._utf8.decode(bytes((token_id - BYTE_OFFSET,)))
        return ""  # special ids and ids past the byte range carry no text

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    """UTF-8 bytes as tokens: id 0 = pad, 1 = bos, 2 = eos, byte ``b`` = ``b + 3``."""

    bos_id: int | None = BOS_ID
    eos_id: int | None = EOS_ID
    pad_id: int = PAD_ID
    chat_template: str | None = None  # byte tokens have no chat format

    def token_text(self, token_id: int | None) -> str:
        return ""

    def __init__(self, vocab_size: int = BYTE_VOCAB):
        if vocab_size < BYTE_VOCAB:
            raise UnsupportedModel(
                f"the checkpoint has no tokenizer.json and its vocabulary of {vocab_size} ids is too small for the "
                f"byte-level fallback tokenizer, which needs {BYTE_VOCAB}; add the model's tokenizer.json to its "
                "folder."
            )
        self.vocab_size = vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_VOCAB)
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self) -> ByteStreamDecoder:
        return ByteStreamDecoder()


# ---------------------------------------------------------------------------------------------------
# tokenizer.json (Hugging Face tokenizers)


class HFStreamDecoder:
    """Incremental detokenization for ``tokenizers``: decodes a short window of recent ids and emits
    only the new suffix, waiting while the text ends in U+FFFD (a character split across tokens).

    Decoding a window rather than single ids keeps tokenizers that merge pieces (SentencePiece's
    leading-space marker, byte-level BPE) correct.
    """

    def __init__(self, tok: "HFTokenizer") -> None:
        self._tok = tok
        self._ids: list[int] = []
        self._prefix = 0  # start of the window that is decoded for context
        self._read = 0  # ids before this index have been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read])
        now = self._tok.decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._tok.decode(self._ids[self._prefix : self._read])
        now = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :]


class HFTokenizer:
    """A ``tokenizer.json`` loaded with the ``tokenizers`` library; bos/eos ids come from config.json."""

    def __init__(self, path: Path, arch: ArchSpec):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a plain Exception for malformed files
            raise CheckpointError(
                f"{path} cannot be loaded by the tokenizers library ({e}); restore the model's tokenizer.json."
            ) from None
        self.bos_id = arch.bos_token_id
        self.eos_id = arch.eos_token_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = load_chat_template(path.parent)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tok.id_to_token(token_id) or "")

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special tokens are added here rather than by the tokenizer's post-processor, so that
        # add_bos means the same for every tokenizer.json.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            return [self.bos_id, *ids]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def stream_decoder(self) -> HFStreamDecoder:
        return HFStreamDecoder(self)


def load_tokenizer(model_dir: str | Path, arch: ArchSpec) -> Tokenizer:
    """The checkpoint's ``tokenizer.json`` if it has one, else the byte-level fallback."""
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path, arch)
    return ByteTokenizer(arch.vocab_size)
