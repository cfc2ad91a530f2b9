"""The mesh wire envelope: what one router says to another, and its msgpack form.

Every message is an :class:`Envelope`: who sends it (node id, region, advertise URL,
generation, incarnation), a per-(sender, generation) counter and a coarse wall-clock
second for the replay window (``mesh/auth.py``), one body, and a few piggybacked
membership updates. The envelope is encoded as one msgpack array whose first element
is :data:`WIRE_VERSION`; the authenticator seals those bytes into a frame.

Decoding is strict: every field is type-checked and bounded, and any mismatch raises
:class:`crdt.base.DecodeError`, the only error a decoder here raises. CRDT deltas stay
opaque wire primitives at this layer; the gossip scheduler hands them to the owning
state's ``delta_from_wire``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]

from crdt.base import DecodeError, Version

WIRE_VERSION = 2
"""2: the envelope names its recipient (a frame is good only at the router it was sent to)."""
MAX_ID_LEN = 128
MAX_ADDR_LEN = 512
MAX_UPDATES = 4096
"""A full member table rides in a Sync; a mesh of more routers than this is out of scope."""

Digests = Mapping[str, Mapping[str, Version]]
"""State name -> that state's per-origin digest."""


class Status(IntEnum):
    """A member's state. At equal (generation, incarnation) a higher value wins."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    region: str
    addr: str
    """Advertise URL, e.g. ``http://10.0.0.5:8080``; gossip goes to ``addr + /mesh/gossip``."""


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """One claim about one member, ordered by ``(generation, incarnation, status)``."""

    node_id: str
    region: str
    addr: str
    generation: int
    incarnation: int
    status: Status
    accuser: str = ""
    """Who suspects it (SUSPECT only): distinct accusers shorten the suspicion timer."""

    def rank(self) -> tuple[int, int, int]:
        return (self.generation, self.incarnation, int(self.status))


# ---- bodies --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. ``target_id`` empty when the prober does not know the id yet."""

    seq: int
    target_id: str


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class PingReq:
    """Ask the receiver to probe ``target`` on our behalf (SWIM indirect probe)."""

    seq: int
    target_id: str
    target_addr: str


@dataclass(frozen=True, slots=True)
class Nack:
    """The relay did not hear from the target in time (Lifeguard): the relay is alive."""

    seq: int


@dataclass(frozen=True, slots=True)
class Push:
    """CRDT deltas (state -> wire form) and the sender's versions of what it offers.

    ``digests`` holds only the origins the sender believes the receiver lacks, unless
    ``full``: then it is the sender's whole digest (a digest probe, sent with no deltas to
    a peer we know nothing about yet).
    """

    seq: int
    deltas: Mapping[str, object]
    digests: Digests
    full: bool = False


@dataclass(frozen=True, slots=True)
class PushAck:
    """The receiver's versions, after the merge, of every origin the push named.

    Named origins the receiver does not hold at all are listed in ``absent``.
    """

    seq: int
    digests: Digests
    absent: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Sync:
    """Push-pull anti-entropy and join: the full member table and all digests."""

    members: tuple[MemberUpdate, ...]
    digests: Digests


@dataclass(frozen=True, slots=True)
class SyncReply:
    members: tuple[MemberUpdate, ...]
    digests: Digests
    deltas: Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Notice:
    """No body: the piggybacked updates are the message (leave announcements)."""


Body = Ping | Ack | PingReq | Nack | Push | PushAck | Sync | SyncReply | Notice

_KIND: dict[type[Any], int] = {
    Ping: 1,
    Ack: 2,
    PingReq: 3,
    Nack: 4,
    Push: 5,
    PushAck: 6,
    Sync: 7,
    SyncReply: 8,
    Notice: 9,
}


def kind_name(body: Body) -> str:
    """Short lowercase name for counters: ``ping``, ``push_ack``..."""
    return _NAMES[type(body)]


_NAMES: dict[type[Any], str] = {
    Ping: "ping",
    Ack: "ack",
    PingReq: "ping_req",
    Nack: "nack",
    Push: "push",
    PushAck: "push_ack",
    Sync: "sync",
    SyncReply: "sync_reply",
    Notice: "notice",
}


@dataclass(frozen=True, slots=True)
class Envelope:
    sender: NodeInfo
    generation: int
    incarnation: int
    counter: int
    """Strictly increasing per (sender, generation): the replay window's sequence."""
    sent_at: int
    """Sender's wall clock in whole seconds: bounds how long a captured frame stays replayable."""
    body: Body
    updates: tuple[MemberUpdate, ...] = ()
    recipient: str = ""
    """Node id the frame is for; empty only for a first-contact :class:`Sync` to an address
    whose router the sender does not know yet (a seed). Receivers refuse frames for others."""

    def sender_update(self) -> MemberUpdate:
        """The envelope itself is the sender's own claim to be alive."""
        s = self.sender
        return MemberUpdate(
            s.node_id, s.region, s.addr, self.generation, self.incarnation, Status.ALIVE
        )


# ---- encoding ------------------------------------------------------------------------


def update_wire(u: MemberUpdate) -> list[object]:
    return [u.node_id, u.region, u.addr, u.generation, u.incarnation, int(u.status), u.accuser]


def _digests_wire(d: Digests) -> dict[str, dict[str, list[int]]]:
    return {name: {o: [v[0], v[1]] for o, v in dg.items()} for name, dg in d.items()}


def _body_wire(body: Body) -> list[object]:
    match body:
        case Ping(seq, target_id):
            return [seq, target_id]
        case Ack(seq) | Nack(seq):
            return [seq]
        case PingReq(seq, target_id, target_addr):
            return [seq, target_id, target_addr]
        case Push(seq, deltas, digests, full):
            return [seq, dict(deltas), _digests_wire(digests), full]
        case PushAck(seq, digests, absent):
            return [seq, _digests_wire(digests), {k: list(v) for k, v in absent.items()}]
        case Sync(members, digests):
            return [[update_wire(u) for u in members], _digests_wire(digests)]
        case SyncReply(members, digests, deltas):
            return [[update_wire(u) for u in members], _digests_wire(digests), dict(deltas)]
        case Notice():
            return []
    raise TypeError(f"not a message body: {body!r}")  # pragma: no cover


def envelope_wire(env: Envelope) -> list[object]:
    s = env.sender
    return [
        WIRE_VERSION,
        s.node_id,
        s.region,
        s.addr,
        env.generation,
        env.incarnation,
        env.counter,
        env.sent_at,
        _KIND[type(env.body)],
        _body_wire(env.body),
        [update_wire(u) for u in env.updates],
        env.recipient,
    ]


def encode_envelope(env: Envelope) -> bytes:
    data: bytes = msgpack.packb(envelope_wire(env), use_bin_type=True)
    return data


def packed_size(obj: object) -> int:
    """Bytes ``obj`` takes in msgpack: how deltas are measured against the message budget."""
    return len(msgpack.packb(obj, use_bin_type=True))


# ---- decoding ------------------------------------------------------------------------


def _fail(what: str, got: object) -> DecodeError:
    return DecodeError(f"{what}: unexpected {type(got).__name__}")


def _int(x: object, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if type(x) is not int:
        raise _fail(what, x)
    if not lo <= x <= hi:
        raise DecodeError(f"{what}: {x} out of range")
    return x


def _str(x: object, what: str, max_len: int = MAX_ID_LEN) -> str:
    if type(x) is not str:
        raise _fail(what, x)
    if len(x) > max_len:
        raise DecodeError(f"{what}: longer than {max_len}")
    return x


def _list(x: object, what: str, length: int | None = None) -> list[object]:
    if type(x) is not list:
        raise _fail(what, x)
    if length is not None and len(x) != length:
        raise DecodeError(f"{what}: {len(x)} fields, expected {length}")
    return x


def _dict(x: object, what: str) -> dict[object, object]:
    if type(x) is not dict:
        raise _fail(what, x)
    return x


_U63 = (1 << 63) - 1
_STATUS = tuple(Status)


def _update(x: object) -> MemberUpdate:
    # The hot path of big member tables: check the common shape inline, and fall back to
    # the field-by-field checks only to say what is wrong.
    if type(x) is list and len(x) == 7:
        n, r, a, g, i, st, acc = x
        if (
            type(n) is str
            and type(r) is str
            and type(a) is str
            and type(acc) is str
            and type(g) is int
            and type(i) is int
            and type(st) is int
            and len(n) <= MAX_ID_LEN
            and len(r) <= MAX_ID_LEN
            and len(a) <= MAX_ADDR_LEN
            and len(acc) <= MAX_ID_LEN
            and 0 <= g <= _U63
            and 0 <= i <= _U63
            and 0 <= st < len(_STATUS)
        ):
            return MemberUpdate(n, r, a, g, i, _STATUS[st], acc)
    f = _list(x, "member update", 7)
    try:
        status = Status(_int(f[5], "status"))
    except ValueError as exc:
        raise DecodeError(f"status: {f[5]!r} unknown") from exc
    return MemberUpdate(
        node_id=_str(f[0], "node id"),
        region=_str(f[1], "region"),
        addr=_str(f[2], "address", MAX_ADDR_LEN),
        generation=_int(f[3], "generation"),
        incarnation=_int(f[4], "incarnation"),
        status=status,
        accuser=_str(f[6], "accuser"),
    )


def _updates(x: object) -> tuple[MemberUpdate, ...]:
    items = _list(x, "updates")
    if len(items) > MAX_UPDATES:
        raise DecodeError(f"updates: more than {MAX_UPDATES}")
    return tuple(_update(u) for u in items)


def _version(x: object) -> Version:
    f = _list(x, "version", 2)
    return (_int(f[0], "version epoch"), _int(f[1], "version seq"))


def _digest(x: object) -> dict[str, Version]:
    d = _dict(x, "digest")
    out: dict[str, Version] = {}
    for o, v in d.items():
        if (
            type(o) is str
            and len(o) <= MAX_ADDR_LEN
            and type(v) is list
            and len(v) == 2
            and type(e := v[0]) is int
            and type(q := v[1]) is int
            and 0 <= e <= _U63
            and 0 <= q <= _U63
        ):
            out[o] = (e, q)
        else:
            out[_str(o, "origin", MAX_ADDR_LEN)] = _version(v)
    return out


def _digests(x: object) -> dict[str, dict[str, Version]]:
    return {_str(name, "state name"): _digest(dg) for name, dg in _dict(x, "digests").items()}


def _bool(x: object, what: str) -> bool:
    if type(x) is not bool:
        raise _fail(what, x)
    return x


def _absent(x: object) -> dict[str, tuple[str, ...]]:
    return {
        _str(name, "state name"): tuple(_str(o, "origin", MAX_ADDR_LEN) for o in _list(v, "absent"))
        for name, v in _dict(x, "absent").items()
    }


def _deltas(x: object) -> dict[str, object]:
    return {_str(k, "state name"): v for k, v in _dict(x, "deltas").items()}


def _body(kind: int, x: object) -> Body:
    match kind:
        case 1:
            f = _list(x, "ping", 2)
            return Ping(_int(f[0], "seq"), _str(f[1], "target id"))
        case 2:
            return Ack(_int(_list(x, "ack", 1)[0], "seq"))
        case 3:
            f = _list(x, "ping-req", 3)
            return PingReq(
                _int(f[0], "seq"), _str(f[1], "target id"), _str(f[2], "address", MAX_ADDR_LEN)
            )
        case 4:
            return Nack(_int(_list(x, "nack", 1)[0], "seq"))
        case 5:
            f = _list(x, "push", 4)
            return Push(_int(f[0], "seq"), _deltas(f[1]), _digests(f[2]), _bool(f[3], "full"))
        case 6:
            f = _list(x, "push-ack", 3)
            return PushAck(_int(f[0], "seq"), _digests(f[1]), _absent(f[2]))
        case 7:
            f = _list(x, "sync", 2)
            return Sync(_updates(f[0]), _digests(f[1]))
        case 8:
            f = _list(x, "sync-reply", 3)
            return SyncReply(_updates(f[0]), _digests(f[1]), _deltas(f[2]))
        case 9:
            _list(x, "notice", 0)
            return Notice()
    raise DecodeError(f"unknown message kind {kind}")


def unpack(data: bytes) -> object:
    """msgpack bytes -> primitives; any decoder failure becomes ``DecodeError``."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # the C decoder raises several unrelated types
        raise DecodeError(f"not msgpack: {exc}") from exc


def decode_envelope(data: bytes) -> Envelope:
    f = _list(unpack(data), "envelope")
    if not f or f[0] != WIRE_VERSION:
        raise DecodeError(f"wire version {f[0] if f else None!r}, expected {WIRE_VERSION}")
    if len(f) != 12:
        raise DecodeError(f"envelope: {len(f)} fields, expected 12")
    return Envelope(
        sender=NodeInfo(
            _str(f[1], "node id"), _str(f[2], "region"), _str(f[3], "address", MAX_ADDR_LEN)
        ),
        generation=_int(f[4], "generation"),
        incarnation=_int(f[5], "incarnation"),
        counter=_int(f[6], "counter"),
        sent_at=_int(f[7], "sent_at", -(1 << 62), 1 << 62),
        body=_body(_int(f[8], "kind"), f[9]),
        updates=_updates(f[10]),
        recipient=_str(f[11], "recipient"),
    )
