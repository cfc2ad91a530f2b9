"""Authenticated frames and the replay window for mesh messages.

A frame is ``b"KM" | format byte | key id (4 bytes) | HMAC-SHA256 tag (32 bytes) | payload``.
The tag covers the header and the payload. Several keys are accepted so a mesh key can be
rotated without a flag day: roll out ``[old, new]`` everywhere (old still signs), then
``[new, old]`` (new signs, old still verifies), then ``[new]``. The key id is the first
four bytes of a hash of the key; it only picks which key to try, it proves nothing.

Replay protection has two layers, checked only after the tag verified, so a forger cannot
poison them:

* per sender, the highest generation seen and, within it, a sliding bitmap of the last
  ``window`` message counters (the IPsec anti-replay window): a counter seen before, or
  older than the window, or a generation older than the newest one seen is rejected;
* a coarse timestamp window: a frame whose sender clock is further than ``max_skew``
  seconds from ours is rejected. This bounds how long a captured frame stays useful to
  a receiver that never heard of that sender (a new router, or one whose sender table
  evicted it: the table is bounded by ``max_senders``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC = b"KM\x01"
KEY_ID_LEN = 4
TAG_LEN = 32
HEADER_LEN = len(MAGIC) + KEY_ID_LEN + TAG_LEN
MIN_KEY_LEN = 16


class Rejected(Exception):
    """A frame refused before any of it was used; ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"kvmesh key id\x00" + key).digest()[:KEY_ID_LEN]


def parse_key(text: str) -> bytes:
    """``hex:...``, ``base64:...`` or plain text -> key bytes (for config files and env)."""
    if text.startswith("hex:"):
        return bytes.fromhex(text[4:])
    if text.startswith("base64:"):
        return base64.b64decode(text[7:], validate=True)
    return text.encode()


class Authenticator:
    """Signs with the first key, verifies with any."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("the mesh needs at least one key")
        for k in keys:
            if len(k) < MIN_KEY_LEN:
                raise ValueError(f"mesh keys must be at least {MIN_KEY_LEN} bytes")
        self._signing = bytes(keys[0])
        self._signing_header = MAGIC + key_id(self._signing)
        self._by_id: dict[bytes, list[bytes]] = {}
        for k in keys:
            self._by_id.setdefault(key_id(k), []).append(bytes(k))

    def seal(self, payload: bytes) -> bytes:
        header = self._signing_header
        tag = hmac.digest(self._signing, header + payload, "sha256")
        return header + tag + payload

    def open(self, frame: bytes) -> bytes:
        """The payload of a frame whose tag verifies; raises ``Rejected`` otherwise."""
        if len(frame) < HEADER_LEN or not frame.startswith(MAGIC):
            raise Rejected("malformed", "not a mesh frame")
        kid = frame[len(MAGIC) : len(MAGIC) + KEY_ID_LEN]
        candidates = self._by_id.get(kid)
        if not candidates:
            raise Rejected("unknown_key", kid.hex())
        tag = frame[len(MAGIC) + KEY_ID_LEN : HEADER_LEN]
        signed = frame[: len(MAGIC) + KEY_ID_LEN] + frame[HEADER_LEN:]
        for key in candidates:
            if hmac.compare_digest(tag, hmac.digest(key, signed, "sha256")):
                return frame[HEADER_LEN:]
        raise Rejected("bad_signature")


@dataclass(slots=True)
class _Window:
    generation: int
    top: int
    """Highest counter accepted in this generation."""
    seen: int
    """Bit i set: counter ``top - i`` was accepted."""


class ReplayGuard:
    """Per-sender sliding windows over (generation, counter), plus a timestamp window."""

    def __init__(
        self, window: int = 1024, max_skew: float = 120.0, max_senders: int = 4096
    ) -> None:
        if window < 1 or max_senders < 1:
            raise ValueError("window and max_senders must be positive")
        self.window = window
        self.max_skew = max_skew
        self.max_senders = max_senders
        self._senders: OrderedDict[str, _Window] = OrderedDict()

    def admit(
        self, sender: str, generation: int, counter: int, sent_at: float, wall: float
    ) -> None:
        """Record the message or raise ``Rejected``; call only for verified frames."""
        if sent_at < wall - self.max_skew:
            raise Rejected("stale_timestamp", f"{wall - sent_at:.0f}s old")
        if sent_at > wall + self.max_skew:
            raise Rejected("future_timestamp", f"{sent_at - wall:.0f}s ahead")
        w = self._senders.get(sender)
        if w is None or generation > w.generation:
            self._senders[sender] = _Window(generation, counter, 1)
            self._senders.move_to_end(sender)
            while len(self._senders) > self.max_senders:
                self._senders.popitem(last=False)
            return
        if generation < w.generation:
            raise Rejected("stale_generation", f"{generation} < {w.generation}")
        if counter > w.top:
            shift = counter - w.top
            mask = (1 << self.window) - 1
            w.seen = ((w.seen << shift) | 1) & mask if shift < self.window else 1
            w.top = counter
        else:
            age = w.top - counter
            if age >= self.window:
                raise Rejected("outside_window", f"counter {counter} is {age} behind")
            bit = 1 << age
            if w.seen & bit:
                raise Rejected("replayed", f"counter {counter}")
            w.seen |= bit
        self._senders.move_to_end(sender)

    def forget(self, sender: str) -> None:
        self._senders.pop(sender, None)

    def __len__(self) -> int:
        return len(self._senders)
