"""The checkpoint's own tokenizer (tokenizer.json through the `tokenizers` library) and
incremental detokenization for streaming."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from expert_store.errors import FateError


class TokenizerError(FateError, ValueError):
    """No usable tokenizer for text input."""


class TextTokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (pass token ids instead of text, or add the tokenizer)")
        self._tok = Tokenizer.from_file(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as the checkpoint's post-processor builds them (it decides about BOS); without its special
        tokens when add_special_tokens is false. Through encode_batch, which releases the GIL while it works
        (encode holds it): a long prompt tokenized in one thread does not stall the compute thread."""
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> "IncrementalDecoder":
        return IncrementalDecoder(self)


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces; holds back a piece while it ends in an
    incomplete UTF-8 sequence (byte-level BPE can split one character over tokens)."""

    def __init__(self, tokenizer: TextTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return piece

    @property
    def text(self) -> str:
        return self._tok.decode(self._ids)
