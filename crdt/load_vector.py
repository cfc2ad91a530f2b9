"""LoadVector: how busy every replica is, and how many requests each router has sent it.

Load records. The router(s) scraping an engine *report* its load: waiting, running, KV usage,
tokens queued, health. A record is keyed by ``(replica, reporter)`` -- several routers of a
region may scrape the same engine, each owning its own record -- and ordered by the
reporter's ``(generation, counter)``, never by a clock. Readers take the freshest record of
a replica.

Ages, not timestamps. Clocks of different machines are not comparable, so a record carries
the *age* it had when it was shipped. Locally it stores ``observed_at`` (the local ``now``
when it was observed or received) plus the age it had then, so ``age(now)`` is always in the
reader's own clock: ``delta_since(..., now)`` ships ``age(now)`` and ``merge(delta, now)``
stamps receipt. An age grows by the time a record sits anywhere; a hop adds no error except
the transfer time it does not see.

In-flight counts. Every router owns its own ``replica -> requests in flight`` counts (its
dispatches minus completions), LWW by that router's version, so between load reports each
router still sees the others' fresh dispatches: ``inflight(replica, exclude_router=me)`` is
the herd-avoidance input.

Records older than ``max_age`` are neither shipped nor accepted, and ``expire(now)`` forgets
them, so a reporter or router that went away fades out everywhere. Owners must therefore
refresh their records (a new version) more often than ``max_age``; a record owned by
``node_id`` (this node) is never expired locally.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgpack  # type: ignore[import-untyped,unused-ignore]

from crdt.base import DecodeError, Digest, Version
from crdt.wire import as_bool, as_float, as_int, as_list, as_str

__all__ = ["Inflight", "Load", "LoadDelta", "LoadVector"]

_TAG = "load"
_WIRE_VERSION = 1
_SEP = "\x1f"
_MAX_NAME = 1024
_MAX_COUNT = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class Load:
    """One reporter's view of one replica, with its age at the time it was read or shipped."""

    replica: str
    reporter: str
    version: Version
    waiting: int
    running: int
    kv_usage: float
    tokens_queued: int
    healthy: bool
    age: float

    def to_wire(self) -> list[object]:
        return [
            self.replica,
            self.reporter,
            self.version[0],
            self.version[1],
            self.waiting,
            self.running,
            self.kv_usage,
            self.tokens_queued,
            self.healthy,
            self.age,
        ]

    def payload(self) -> _LoadPayload:
        return (self.waiting, self.running, self.kv_usage, self.tokens_queued, self.healthy)


@dataclass(frozen=True, slots=True)
class Inflight:
    """One router's requests in flight per replica."""

    router: str
    version: Version
    counts: Mapping[str, int]
    age: float

    def to_wire(self) -> list[object]:
        return [self.router, self.version[0], self.version[1], dict(self.counts), self.age]


@dataclass(frozen=True, slots=True)
class LoadDelta:
    loads: tuple[Load, ...] = ()
    inflight: tuple[Inflight, ...] = ()

    def to_wire(self) -> list[object]:
        return [
            _TAG,
            _WIRE_VERSION,
            [x.to_wire() for x in self.loads],
            [x.to_wire() for x in self.inflight],
        ]

    def is_empty(self) -> bool:
        return not self.loads and not self.inflight


_LoadPayload = tuple[int, int, float, int, bool]
_Counts = tuple[tuple[str, int], ...]
P = TypeVar("P", _LoadPayload, _Counts)


@dataclass(slots=True)
class _Held(Generic[P]):
    """A record plus when it was observed here and the age it had then."""

    version: Version
    payload: P
    observed_at: float
    age0: float

    def age(self, now: float) -> float:
        return self.age0 + max(0.0, now - self.observed_at)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or _SEP in name:
        raise ValueError(f"{what} must be a non-empty str without \\x1f, at most {_MAX_NAME}")
    return name


def _check_version(version: Version) -> Version:
    gen, counter = version
    if type(gen) is not int or type(counter) is not int or gen < 0 or counter < 0:
        raise ValueError(f"version must be (generation, counter) of non-negative ints: {version!r}")
    return (gen, counter)


def _newer(version: Version, payload: P, held: _Held[P] | None) -> bool:
    """Version decides; equal versions (one writer, so normally equal payloads) by payload."""
    if held is None:
        return True
    if version != held.version:
        return version > held.version
    return _packed(payload) > _packed(held.payload)


def _packed(payload: object) -> bytes:
    out: bytes = msgpack.packb(payload, use_bin_type=True)
    return out


class LoadVector:
    """Per-replica load records and per-router in-flight counts; see the module docstring."""

    def __init__(self, *, max_age: float = 60.0, node_id: str | None = None) -> None:
        self.max_age = max_age
        self.node_id = node_id
        self._loads: dict[tuple[str, str], _Held[_LoadPayload]] = {}
        self._inflight: dict[str, _Held[_Counts]] = {}
        self._totals: dict[str, int] = {}
        """In-flight requests per replica summed over every router, kept as records change,
        so a view of N replicas costs N lookups rather than N x routers."""

    # ---- writes ------------------------------------------------------------------------

    def report(
        self,
        replica: str,
        reporter: str,
        version: Version,
        *,
        waiting: int,
        running: int,
        kv_usage: float,
        tokens_queued: int,
        healthy: bool,
        now: float,
        age: float = 0.0,
    ) -> bool:
        """Record ``reporter``'s observation of ``replica``; False if it already has newer."""
        _check_name(replica, "replica")
        _check_name(reporter, "reporter")
        load = Load(
            replica,
            reporter,
            _check_version(version),
            _count(waiting, "waiting"),
            _count(running, "running"),
            _usage(kv_usage),
            _count(tokens_queued, "tokens_queued"),
            bool(healthy),
            float(age),
        )
        return self._put_load(load, now)

    def set_inflight(
        self, router: str, version: Version, counts: Mapping[str, int], now: float
    ) -> bool:
        """Replace ``router``'s in-flight counts (zero counts are dropped)."""
        _check_name(router, "router")
        clean = {_check_name(r, "replica"): _count(n, "in-flight count") for r, n in counts.items()}
        return self._put_inflight(
            Inflight(router, _check_version(version), _nonzero(clean), 0.0), now
        )

    def adjust_inflight(
        self, router: str, replica: str, delta: int, version: Version, now: float
    ) -> int:
        """Owner-side helper: add ``delta`` to one count at a new version; returns the count."""
        held = self._inflight.get(router)
        counts = dict(held.payload) if held is not None else {}
        counts[replica] = max(0, counts.get(replica, 0) + delta)
        self.set_inflight(router, version, counts, now)
        return counts[replica]

    def _put_load(self, load: Load, now: float) -> bool:
        if load.age > self.max_age:
            return False
        key = (load.replica, load.reporter)
        held = self._loads.get(key)
        payload = load.payload()
        if _newer(load.version, payload, held):
            self._loads[key] = _Held(load.version, payload, now, load.age)
            return True
        if held is not None and load.version == held.version and load.age < held.age(now):
            held.observed_at, held.age0 = now, load.age  # same record, fresher estimate
        return False

    def _put_inflight(self, rec: Inflight, now: float) -> bool:
        if rec.age > self.max_age:
            return False
        held = self._inflight.get(rec.router)
        payload = tuple(sorted(rec.counts.items()))
        if _newer(rec.version, payload, held):
            self._count(held, -1)
            self._inflight[rec.router] = new = _Held(rec.version, payload, now, rec.age)
            self._count(new, 1)
            return True
        if held is not None and rec.version == held.version and rec.age < held.age(now):
            held.observed_at, held.age0 = now, rec.age
        return False

    def expire(self, now: float) -> int:
        """Forget records older than ``max_age`` (except this node's own); returns how many."""
        old_loads = [
            k for k, h in self._loads.items() if h.age(now) > self.max_age and k[1] != self.node_id
        ]
        for k in old_loads:
            del self._loads[k]
        old_inflight = [
            r for r, h in self._inflight.items() if h.age(now) > self.max_age and r != self.node_id
        ]
        for r in old_inflight:
            self._count(self._inflight.pop(r), -1)
        return len(old_loads) + len(old_inflight)

    # ---- reads -------------------------------------------------------------------------

    def load(self, replica: str, now: float) -> Load | None:
        """The freshest record of ``replica`` (smallest age), or None."""
        best: Load | None = None
        for rec in self.reports(replica, now):
            if best is None or (rec.age, rec.reporter) < (best.age, best.reporter):
                best = rec
        return best

    def reports(self, replica: str, now: float) -> list[Load]:
        return [self._as_load(k, h, now) for k, h in sorted(self._loads.items()) if k[0] == replica]

    def loads(self, now: float, skip: Container[str] = ()) -> dict[str, Load]:
        """The freshest record of every replica (but those in ``skip``)."""
        out: dict[str, Load] = {}
        for k, h in sorted(self._loads.items()):
            if k[0] in skip:
                continue
            rec = self._as_load(k, h, now)
            best = out.get(k[0])
            if best is None or rec.age < best.age:
                out[k[0]] = rec
        return out

    def replicas(self) -> list[str]:
        return sorted({k[0] for k in self._loads})

    def inflight(self, replica: str, exclude_router: str | None = None) -> int:
        """Requests in flight to ``replica`` summed over routers (optionally all but one)."""
        total = self._totals.get(replica, 0)
        if exclude_router is not None and total:
            held = self._inflight.get(exclude_router)
            if held is not None:
                for name, n in held.payload:
                    if name == replica:
                        total -= n
                        break
        return total

    def inflight_age(self, router: str, now: float) -> float:
        """Age of ``router``'s in-flight record here (inf: none held)."""
        held = self._inflight.get(router)
        return held.age(now) if held is not None else float("inf")

    def _count(self, held: _Held[_Counts] | None, sign: int) -> None:
        if held is None:
            return
        totals = self._totals
        for name, n in held.payload:
            left = totals.get(name, 0) + sign * n
            if left:
                totals[name] = left
            else:
                totals.pop(name, None)

    def inflight_by_router(self, replica: str) -> dict[str, int]:
        out = {}
        for router, h in sorted(self._inflight.items()):
            n = dict(h.payload).get(replica, 0)
            if n:
                out[router] = n
        return out

    def inflight_records(self, now: float) -> dict[str, Inflight]:
        return {r: self._as_inflight(r, h, now) for r, h in sorted(self._inflight.items())}

    def content(self) -> dict[str, tuple[object, ...]]:
        """Versions and payloads of everything held, without ages (what convergence means)."""
        out: dict[str, tuple[object, ...]] = {}
        for (replica, reporter), h in self._loads.items():
            out[_SEP.join(("L", replica, reporter))] = (h.version, h.payload)
        for router, held in self._inflight.items():
            out[_SEP.join(("I", router))] = (held.version, held.payload)
        return out

    def _as_load(self, key: tuple[str, str], h: _Held[_LoadPayload], now: float) -> Load:
        w, r, kv, tq, ok = h.payload
        return Load(key[0], key[1], h.version, w, r, kv, tq, ok, h.age(now))

    def _as_inflight(self, router: str, h: _Held[_Counts], now: float) -> Inflight:
        return Inflight(router, h.version, dict(h.payload), h.age(now))

    # ---- Replicated --------------------------------------------------------------------

    def digest(self) -> dict[str, Version]:
        out = {_SEP.join(("L", r, rep)): h.version for (r, rep), h in self._loads.items()}
        for router, held in self._inflight.items():
            out[_SEP.join(("I", router))] = held.version
        return out

    def delta_since(self, peer: Digest, now: float, max_bytes: int | None = None) -> LoadDelta:
        """Records newer than the peer's, with their ages at ``now``; freshest first.

        In-flight counts go before load records (they move fastest). The first record always
        fits the budget.
        """
        items: list[tuple[int, float, str, Load | Inflight]] = []
        for router, held in self._inflight.items():
            theirs = peer.get(_SEP.join(("I", router)))
            age = held.age(now)
            if age <= self.max_age and (theirs is None or tuple(theirs) < held.version):
                items.append((0, age, router, self._as_inflight(router, held, now)))
        for key, h in self._loads.items():
            theirs = peer.get(_SEP.join(("L", *key)))
            age = h.age(now)
            if age <= self.max_age and (theirs is None or tuple(theirs) < h.version):
                items.append((1, age, _SEP.join(key), self._as_load(key, h, now)))
        items.sort(key=lambda x: (x[0], x[1], x[2]))
        loads: list[Load] = []
        inflight: list[Inflight] = []
        used = 8
        for _, _, _, rec in items:
            if max_bytes is not None:
                cost = len(_packed(rec.to_wire()))
                if (loads or inflight) and used + cost > max_bytes:
                    continue
                used += cost
            if isinstance(rec, Load):
                loads.append(rec)
            else:
                inflight.append(rec)
        return LoadDelta(tuple(loads), tuple(inflight))

    def delta_from_wire(self, obj: object) -> LoadDelta:
        top = as_list(obj, "load delta", length=4)
        if top[0] != _TAG:
            raise DecodeError(f"load delta: wrong tag {top[0]!r}")
        as_int(top[1], "load delta version", _WIRE_VERSION, _WIRE_VERSION)
        loads = tuple(_load_from_wire(x) for x in as_list(top[2], "load records"))
        inflight = tuple(_inflight_from_wire(x) for x in as_list(top[3], "in-flight records"))
        return LoadDelta(loads, inflight)

    def merge(self, delta: LoadDelta, now: float) -> bool:
        changed = False
        for load in delta.loads:
            changed |= self._put_load(load, now)
        for rec in delta.inflight:
            changed |= self._put_inflight(rec, now)
        return changed

    def full_delta(self, now: float) -> LoadDelta:
        return self.delta_since({}, now)


def _count(n: int, what: str) -> int:
    if type(n) is not int or not 0 <= n <= _MAX_COUNT:
        raise ValueError(f"{what} must be a non-negative int, got {n!r}")
    return n


def _usage(x: float) -> float:
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"kv_usage must be within [0, 1], got {x!r}")
    return x


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {r: n for r, n in sorted(counts.items()) if n}


def _wire_name(obj: object, what: str) -> str:
    name = as_str(obj, what, max_len=_MAX_NAME)
    if _SEP in name:
        raise DecodeError(f"{what}: contains a separator character")
    return name


def _load_from_wire(obj: object) -> Load:
    f = as_list(obj, "load record", length=10)
    return Load(
        replica=_wire_name(f[0], "load replica"),
        reporter=_wire_name(f[1], "load reporter"),
        version=(as_int(f[2], "load generation", 0), as_int(f[3], "load counter", 0)),
        waiting=as_int(f[4], "waiting", 0, _MAX_COUNT),
        running=as_int(f[5], "running", 0, _MAX_COUNT),
        kv_usage=as_float(f[6], "kv_usage", 0.0, 1.0),
        tokens_queued=as_int(f[7], "tokens_queued", 0, _MAX_COUNT),
        healthy=as_bool(f[8], "healthy"),
        age=as_float(f[9], "load age", 0.0),
    )


def _inflight_from_wire(obj: object) -> Inflight:
    f = as_list(obj, "in-flight record", length=5)
    router = _wire_name(f[0], "in-flight router")
    version = (as_int(f[1], "in-flight generation", 0), as_int(f[2], "in-flight counter", 0))
    raw = f[3]
    if type(raw) is not dict:
        raise DecodeError("in-flight counts: expected a map")
    counts = {
        _wire_name(k, "in-flight replica"): as_int(v, "in-flight count", 0, _MAX_COUNT)
        for k, v in raw.items()
    }
    return Inflight(router, version, _nonzero(counts), as_float(f[4], "in-flight age", 0.0))
