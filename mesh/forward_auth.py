"""Signed one-hop forwards between routers, with a replay window.

A router that forwards a request to another region's router signs what the receiver acts on:

    HMAC-SHA256(key, "kvmesh-forward-v2" | origin | target | request id | timestamp | path
                     | session | SHA-256(body) [| tier])

and sends it with the origin (``x-kvmesh-from``), the replica it chose (``x-kvmesh-target``),
its wall-clock timestamp in milliseconds (``x-kvmesh-ts``) and its own request id
(``x-request-id``), and the request's service tier with the seconds left to its SLO deadline
(``x-kvmesh-tier: batch;3512.250``, signed when present: a client cannot promote itself by
posing as a peer). The receiver recomputes the body digest from the bytes it read, so a
captured signature pins nothing but that exact body; it refuses timestamps further than
``window`` seconds from its clock, and remembers every ``(origin, request id)`` it accepted
for that long, so the same forward is served once. A router without a mesh key refuses
every hop header: without a key nobody can prove to be a peer.

Verification is sans-I/O: headers, path, body and the wall clock in, a :class:`Forward` or a
:class:`ForwardRejected` out. Several keys verify (rotation, as for gossip); the first signs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

HOP = "x-kvmesh-hop"
FROM = "x-kvmesh-from"
TARGET = "x-kvmesh-target"
SIG = "x-kvmesh-sig"
TS = "x-kvmesh-ts"
REQUEST_ID = "x-request-id"
SESSION = "x-session-id"
TIER = "x-kvmesh-tier"
HOP_HEADERS = (HOP, FROM, TARGET, SIG, TS)
VERSION = "2"
_DOMAIN = "kvmesh-forward-v2"
_TOKEN = re.compile(r"[!-~][ -~]{0,511}")


class ForwardRejected(Exception):
    """A hop the receiver refuses; ``reason`` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Forward:
    """A verified forward: who sent it, the replica it names, the origin's request id."""

    origin: str
    target: str
    request_id: str
    tier: str = ""
    """The signed ``x-kvmesh-tier`` value (``tier;seconds left``), empty when none was sent."""


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def signature(key: str, origin: str, target: str, request_id: str, ts_ms: int, path: str,
              session: str, digest: str, tier: str = "") -> str:
    parts = (_DOMAIN, origin, target, request_id, str(ts_ms), path, session, digest)
    msg = "\n".join((*parts, tier) if tier else parts)
    return hmac.new(key.encode(), msg.encode(), hashlib.sha256).hexdigest()


def sign_headers(key: str, origin: str, target: str, request_id: str, path: str,
                 session: str | None, digest: str, wall: float,
                 tier: str = "") -> dict[str, str]:
    """The hop headers of one forward (session, request id and tier included)."""
    ts_ms = int(wall * 1000)
    headers = {HOP: VERSION, FROM: origin, TS: str(ts_ms),
               REQUEST_ID: request_id,
               SIG: signature(key, origin, target, request_id, ts_ms, path, session or "",
                              digest, tier)}
    if tier:
        headers[TIER] = tier
    if target:
        headers[TARGET] = target
    if session:
        headers[SESSION] = session
    return headers


def has_hop(headers: Mapping[str, str]) -> bool:
    for h in HOP_HEADERS:  # noqa: SIM110 (a loop, not any(): asked twice on every request)
        if h in headers:
            return True
    return False


class ForwardVerifier:
    """Checks hop headers; remembers accepted forwards for ``window`` seconds."""

    def __init__(self, keys: Sequence[str], window: float = 30.0,
                 max_remembered: int = 200_000) -> None:
        self.keys = tuple(keys)
        self.window = window
        self.max_remembered = max_remembered
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._floor_ms = -1
        """Forwards stamped at or before this were forgotten early (table full): refused."""

    def _field(self, headers: Mapping[str, str], name: str, required: bool = True) -> str:
        value = headers.get(name)
        if value is None or value == "":
            if required:
                raise ForwardRejected("missing_header", name)
            return ""
        if not _TOKEN.fullmatch(value):
            raise ForwardRejected("malformed_header", name)
        return value

    def verify(self, headers: Mapping[str, str], path: str, digest: str,
               wall: float) -> Forward:
        """The forward, or ``ForwardRejected``; records it (a second use is a replay)."""
        if not self.keys:
            raise ForwardRejected("no_mesh_key", "this router accepts no forwards")
        if headers.get(HOP) != VERSION:
            raise ForwardRejected("bad_version", "expected hop protocol " + VERSION)
        origin = self._field(headers, FROM)
        target = self._field(headers, TARGET, required=False)  # empty: the region decides
        rid = self._field(headers, REQUEST_ID)
        sig = self._field(headers, SIG)
        ts_text = self._field(headers, TS)
        session = self._field(headers, SESSION, required=False)
        tier = self._field(headers, TIER, required=False)
        if not ts_text.isdigit() or len(ts_text) > 16:
            raise ForwardRejected("malformed_header", TS)
        ts_ms = int(ts_text)
        ok = any(
            hmac.compare_digest(sig.encode(), signature(key, origin, target, rid, ts_ms, path,
                                                        session, digest, tier).encode())
            for key in self.keys
        )
        if not ok:
            raise ForwardRejected("bad_signature")
        now_ms = wall * 1000
        if abs(now_ms - ts_ms) > self.window * 1000:
            raise ForwardRejected("stale_timestamp", f"{(now_ms - ts_ms) / 1000:.1f}s off")
        self.record(origin, rid, ts_ms, now_ms)
        return Forward(origin, target, rid, tier)

    def record(self, origin: str, rid: str, ts_ms: int, now_ms: float) -> None:
        """Remember a verified forward; ``ForwardRejected`` when it was seen before (the
        primary of a node with several processes keeps the node's table this way)."""
        if ts_ms <= self._floor_ms:
            raise ForwardRejected("stale_timestamp", "older than the replay table")
        self._expire(now_ms)
        key = (origin, rid)
        if key in self._seen:
            raise ForwardRejected("replayed", rid)
        self._seen[key] = ts_ms + self.window * 1000
        while len(self._seen) > self.max_remembered:
            _, until = self._seen.popitem(last=False)
            self._floor_ms = max(self._floor_ms, int(until - self.window * 1000))

    def _expire(self, now_ms: float) -> None:
        # Entries go in roughly in time order; stop at the first one still live.
        seen = self._seen
        while seen:
            k, until = next(iter(seen.items()))
            if until + self.window * 1000 >= now_ms:
                break
            del seen[k]

    def __len__(self) -> int:
        return len(self._seen)
