"""Tokenizers behind one small protocol.

The router must turn a request into exactly the token ids the engine will
cache, so it tokenizes (and renders chat templates) the way the engine does.
``BuiltinTokenizer`` is the deterministic tokenizer that the engine simulator
uses too, so a router and a simulated engine agree without model files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import xxhash

from kvevents.tokenizers.prefix_cache import PrefixTokenCache

Message = Mapping[str, object]


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        """Render chat messages to the prompt text the engine sees (with generation prompt)."""
        ...


# Words, single punctuation marks and whitespace runs: prefix-stable at every
# whitespace or punctuation boundary, which is where chat turns end.
_PIECE = re.compile(r"\w+|[^\w\s]|\s+", re.UNICODE)


def message_text(content: object) -> str:
    """The text of an OpenAI message ``content`` (a string or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError(f"unsupported message content of type {type(content).__name__}")


class BuiltinTokenizer:
    """Deterministic word-piece tokenizer: each piece maps to a stable id in ``[1000, vocab)``.

    Ids below 1000 are reserved for the chat template's special tokens. Same text, same ids,
    in every process and on every machine.
    """

    name = "builtin"
    _RESERVED = 1000

    def __init__(self, vocab_size: int = 128_000, *, prefix_cache: bool = True) -> None:
        if vocab_size <= self._RESERVED:
            raise ValueError(f"vocab_size must exceed {self._RESERVED}, got {vocab_size}")
        self.vocab_size = vocab_size
        self._span = vocab_size - self._RESERVED
        self._cache: dict[str, int] = {}
        self.prefix_cache: PrefixTokenCache | None = (
            PrefixTokenCache(_turn_ends, self._encode_chunks, self.encode)
            if prefix_cache else None
        )
        self.cache_bytes = 0
        """Approximate memory held by the piece cache; it stops growing at ``CACHE_BYTES``."""

    CACHE_BYTES = 16 * 1024 * 1024
    CACHE_PIECE = 64
    """Longer pieces are hashed every time: they are rare and would crowd out common ones."""
    _ENTRY = 120
    """Per cached piece beyond its characters: the str header and the dict slot."""

    def _piece_id(self, piece: str) -> int:
        tid = self._cache.get(piece)
        if tid is None:
            tid = self._RESERVED + xxhash.xxh3_64_intdigest(piece.encode()) % self._span
            if len(piece) <= self.CACHE_PIECE and self.cache_bytes < self.CACHE_BYTES:
                self._cache[piece] = tid
                self.cache_bytes += self._ENTRY + len(piece)
        return tid

    def encode(self, text: str) -> list[int]:
        return [self._piece_id(m.group()) for m in _PIECE.finditer(text)]

    def _encode_chunks(self, chunks: list[str]) -> list[list[int]]:
        return [self.encode(c) for c in chunks]

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Rendered and encoded; earlier turns of a conversation come from the prefix cache."""
        text = self.apply_chat_template(messages)
        cache = self.prefix_cache
        return cache.encode(text) if cache is not None else self.encode(text)

    def apply_chat_template(self, messages: Sequence[Message]) -> str:
        out = []
        for msg in messages:
            role = msg.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError("every message needs a non-empty string 'role'")
            out.append(f"<|{role}|>\n{message_text(msg.get('content'))}<|end|>\n")
        out.append("<|assistant|>\n")
        return "".join(out)


_TURN_END = "<|end|>\n"


def _turn_ends(text: str) -> list[int]:
    """Offsets just after each rendered turn, where no piece spans the cut (the next character
    is not whitespace): the prefix cache's cut points."""
    out = []
    at = text.find(_TURN_END)
    while at != -1:
        end = at + len(_TURN_END)
        if end < len(text) and not text[end].isspace():
            out.append(end)
        at = text.find(_TURN_END, end)
    return out
