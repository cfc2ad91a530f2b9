"""Deterministic output text: the same seed and prompt always produce the same tokens.

Generated tokens alternate words and single spaces, each one piece of ``BuiltinTokenizer``. So
the reply text re-tokenizes to exactly the token ids the engine generated (and cached), and the
next turn of a chat, which embeds the reply in its prompt, hits the engine's cache the way it
would on a real engine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from kvevents.tokenizers.base import BuiltinTokenizer

_WORD_TEXT = """
the of and to in is that for it as was with be by on not he this are or his from at which but
have an they you were her she there been one all we their has would when if so no what up out
them some into more time could other than then now only its about over also new these two may
first any like our well way even because most through where much down good make many before
must such long great just know see after take every place little world cache block route region
engine token prefix model request replica mesh gossip latency
"""
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class OutputPlan:
    token_ids: tuple[int, ...]
    """Tokens the request will generate, in order (as many as it may ever need)."""
    stops_naturally: bool
    """True when the plan ends at the model's own stop (no ``max_tokens`` given)."""


class TextGenerator:
    def __init__(self, seed: int, tokenizer: BuiltinTokenizer | None = None) -> None:
        self.seed = seed
        tok = tokenizer or BuiltinTokenizer()
        self._space_id = tok.encode(" ")[0]
        self._text: dict[int, str] = {self._space_id: " "}
        for word in _WORDS:  # skip the rare word whose id collides with another piece's
            self._text.setdefault(tok.encode(word)[0], word)
        self._word_ids = [tid for tid in self._text if tid != self._space_id]

    def plan(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int | None,
        natural_range: tuple[int, int] = (16, 256),
    ) -> OutputPlan:
        """Exactly ``max_tokens`` tokens when given; otherwise a prompt-determined length."""
        digest = xxhash.xxh64_intdigest(
            b"".join((t & 0xFFFF_FFFF).to_bytes(4, "little") for t in prompt_token_ids),
            seed=self.seed & 0xFFFF_FFFF_FFFF_FFFF,
        )
        rng = random.Random(digest)
        n = max_tokens if max_tokens is not None else rng.randint(*natural_range)
        ids = tuple(
            self._word_ids[rng.randrange(len(self._word_ids))] if i % 2 == 0 else self._space_id
            for i in range(n)
        )
        return OutputPlan(ids, stops_naturally=max_tokens is None)

    def text(self, token_ids: Sequence[int]) -> str:
        return "".join(self._text.get(t, "") for t in token_ids)
