"""Token counting and cutting with a tokenizer the user names.

``load_tokenizer(spec)`` accepts:

- ``None`` or ``"whitespace"``: whitespace-separated words (no dependency);
- a SentencePiece model file (``*.model``, ``*.spm``), read with ``sentencepiece``;
- a ``tokenizer.json`` file, or a model folder holding one (Hugging Face ``tokenizers``);
- a model folder holding only ``tokenizer.model`` (SentencePiece).

Nothing is downloaded: a name that is not a local path is an error.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache

@lru_cache(maxsize=32)
def _first_words(n: int) -> re.Pattern:
    """Matches leading space and the first ``n`` words (no match: the text has fewer)."""
    return re.compile(r"\s*(?:\S+\s+){%d}\S+" % (n - 1))


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """Counts tokens of texts and cuts a text to its first ``n`` tokens."""

    kind = ""
    path: str | None = None

    def count(self, texts: list[str]) -> list[int]:
        raise NotImplementedError

    def truncate(self, text: str, n: int) -> str:
        """The text of the first ``n`` tokens (the text itself when it has at most ``n``)."""
        raise NotImplementedError

    def vocab(self) -> set[str]:
        """Vocabulary pieces, word-initial pieces written with SentencePiece's ``▁`` prefix."""
        raise TokenizerError(f"the {self.kind} tokenizer has no vocabulary")


class WhitespaceTokenizer(Tokenizer):
    kind = "whitespace"

    def count(self, texts: list[str]) -> list[int]:
        return [len(t.split()) if t else 0 for t in texts]

    def truncate(self, text: str, n: int) -> str:
        if n <= 0:
            return ""
        m = _first_words(n).match(text)
        if m is None or m.end() == len(text) or text[m.end():].isspace():
            return text  # at most n words
        return text[: m.end()]


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError("a SentencePiece model needs the `sentencepiece` package: "
                                 "pip install 'curate[rc]'") from None
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self._chars_per_token = 4.0

    def count(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.sp.encode(list(texts))] if texts else []

    def truncate(self, text: str, n: int) -> str:
        """``decode(encode(text)[:n])`` when the text is longer than ``n`` tokens, as AdaptLLM cuts
        its bodies. Only a prefix is encoded: SentencePiece splits on spaces before it segments
        (``split_by_whitespace``), so the pieces of a prefix that ends just before a space are the
        pieces of the whole text up to there."""
        # prefix size from the characters per token seen last time (+25%), doubled if short
        size = max(64, int(n * self._chars_per_token * 1.25))
        while size < len(text):
            cut = text.find(" ", size)
            if cut < 0:
                break
            ids = self.sp.encode(text[:cut])
            if len(ids) > n:
                self._chars_per_token = min(8.0, max(1.0, cut / len(ids)))
                return self.sp.decode(ids[:n])
            size *= 2
        ids = self.sp.encode(text)
        return self.sp.decode(ids[:n]) if len(ids) > n else text

    def encode_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def vocab(self) -> set[str]:
        return {self.sp.id_to_piece(i) for i in range(len(self.sp))}


class HFTokenizer(Tokenizer):
    kind = "tokenizers"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as _T
        except ImportError:
            raise TokenizerError("a tokenizer.json needs the `tokenizers` package") from None
        self.path = path
        self.tok = _T.from_file(path)

    def count(self, texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(e.ids) for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def truncate(self, text: str, n: int) -> str:
        enc = self.tok.encode(text, add_special_tokens=False)
        if len(enc.ids) <= n:
            return text
        return text[: enc.offsets[n - 1][1]] if n > 0 else ""

    def vocab(self) -> set[str]:
        out = set()
        for piece in self.tok.get_vocab():
            # byte-level BPE marks a leading space with "Ġ"; SentencePiece with "▁"
            out.add("▁" + piece[1:] if piece.startswith("Ġ") else piece)
        return out


def resolve_tokenizer_path(spec: str) -> tuple[str, str]:
    """(kind, file) for a local tokenizer spec; a clear error otherwise."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        for name, kind in (("tokenizer.json", "tokenizers"), ("tokenizer.model", "sentencepiece")):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                return kind, f
        raise TokenizerError(f"tokenizer folder {spec!r} has no tokenizer.json or tokenizer.model")
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer {spec!r} is not a local file or folder (give a "
                             "tokenizer.json, a SentencePiece .model file or a model folder)")
    if path.endswith(".json"):
        return "tokenizers", path
    return "sentencepiece", path


@lru_cache(maxsize=16)
def load_tokenizer(spec: str | None) -> Tokenizer:
    if spec is None or spec == "whitespace":
        return WhitespaceTokenizer()
    kind, path = resolve_tokenizer_path(spec)
    return HFTokenizer(path) if kind == "tokenizers" else SentencePieceTokenizer(path)
