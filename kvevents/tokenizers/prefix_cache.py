"""A token cache keyed by text prefix, so a multi-turn prompt only tokenizes its new turn.

The text is cut into *chunks* at points where the tokenizer itself cuts (for Hugging Face
tokenizers: right after a special token such as ``<|im_end|>``, which is split out before any
normalization or pre-tokenization). Each chunk's ids are cached under a hash of the *whole text
up to the chunk's end*, so a hit means the same prefix, not just the same chunk; turn N+1 of a
conversation finds turns 1..N cached and encodes only what is new. Because the tokenizer never
merges across those cut points, ``concat(chunk ids)`` is exactly the full encoding; a short
self-check on the first calls guards that promise and turns caching off if it ever fails.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import xxhash

log = logging.getLogger(__name__)


class PrefixTokenCache:
    """LRU of per-chunk token ids keyed by the 128-bit hash of the text up to the chunk end.

    ``cut_points(text)``: offsets where chunks end (ascending, each in ``(0, len(text))``).
    ``encode_chunks(chunks)``: ids of each chunk, encoded on its own. ``encode_full(text)``:
    the reference encoding, used for the self-check of the first ``verify`` calls.
    """

    def __init__(
        self,
        cut_points: Callable[[str], Sequence[int]],
        encode_chunks: Callable[[list[str]], list[list[int]]],
        encode_full: Callable[[str], list[int]],
        *,
        max_chunks: int = 8192,
        max_bytes: int = 64 * 1024 * 1024,
        verify: int = 16,
    ) -> None:
        self.cut_points = cut_points
        self.encode_chunks = encode_chunks
        self.encode_full = encode_full
        self.max_chunks = max_chunks
        self.max_bytes = max_bytes
        """Bound on the cached ids' memory (``ENTRY_BYTES`` per chunk + ``ID_BYTES`` per id)."""
        self.bytes = 0
        self.verify_left = verify
        self.enabled = True
        self.hits = 0
        self.misses = 0
        self._lru: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def encode(self, text: str) -> list[int]:
        if not self.enabled:
            return self.encode_full(text)
        ends = [*self.cut_points(text), len(text)]
        hasher = xxhash.xxh3_128()
        keys: list[int] = []
        start = 0
        for end in ends:
            hasher.update(text[start:end].encode())
            keys.append(hasher.intdigest())
            start = end
        parts: list[tuple[int, ...] | None] = []
        missing: list[int] = []
        lru = self._lru
        for i, key in enumerate(keys):
            got = lru.get(key)
            if got is None:
                missing.append(i)
            else:
                lru.move_to_end(key)
            parts.append(got)
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            bounds = [0, *ends]
            encoded = self.encode_chunks([text[bounds[i] : bounds[i + 1]] for i in missing])
            for i, ids in zip(missing, encoded, strict=True):
                part = tuple(ids)
                parts[i] = part
                size = _size(part)
                if size > self.max_bytes // 4:
                    continue  # one huge chunk would flush everything else
                old = lru.get(keys[i])
                if old is not None:
                    self.bytes -= _size(old)
                lru[keys[i]] = part
                self.bytes += size
            while len(lru) > self.max_chunks or self.bytes > self.max_bytes:
                _, evicted = lru.popitem(last=False)
                self.bytes -= _size(evicted)
        out = list(parts[0])  # type: ignore[arg-type]
        for i in range(1, len(parts)):  # every part is filled by now
            out.extend(parts[i])  # type: ignore[arg-type]
        if self.verify_left > 0:
            self.verify_left -= 1
            full = self.encode_full(text)
            if full != out:
                log.warning("prefix token cache disagrees with a full encode: caching disabled")
                self.enabled = False
                self._lru.clear()
                self.bytes = 0
                return full
        return out


ENTRY_BYTES = 200
"""Per cached chunk: the dict slot, its key and the tuple header (CPython, 64-bit)."""
ID_BYTES = 8
"""Per cached id: the tuple slot (small ints are shared)."""


def _size(part: tuple[int, ...]) -> int:
    return ENTRY_BYTES + ID_BYTES * len(part)
