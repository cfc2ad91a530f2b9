"""SWIM membership with Lifeguard suspicion, as a sans-I/O state machine.

Theory of operation. Every member is ``(node_id, generation)`` plus an incarnation
number. A claim about a member is a :class:`~mesh.messages.MemberUpdate`; claims are
ordered by ``(generation, incarnation, status)`` with ALIVE < SUSPECT < DEAD < LEFT, and a
node keeps the highest claim it has seen. So a restart (higher generation) supersedes
everything about the previous life, a suspicion beats the aliveness it doubts, and only
the member itself can beat a suspicion: it *refutes* by raising its incarnation.

Failure detection (SWIM): once per ``probe_interval`` a node pings the next member of a
shuffled round-robin list. Without a direct ack within the probe timeout it asks
``indirect_checks`` other members to ping the target for it; with no ack at all by the end
of the interval it marks the target SUSPECT and gossips that. A suspicion becomes DEAD when
its timer expires.

Lifeguard refinements (memberlist's numbers, see docs/gossip.md):

* dynamic suspicion: the timer starts at ``max = suspicion_max_timeout_mult * min`` and
  shrinks towards ``min`` as independent accusers confirm it;
* local health awareness: failed probes whose indirect relays did not even send a nack, and
  having to refute a suspicion, raise a score that stretches our probe interval, so a
  starved node accuses less instead of failing healthy peers;
* buddy system: every message to a member we hold SUSPECT or DEAD carries that claim first,
  so the member refutes at once.

The probe timeout adapts to the target: ``max(probe_timeout, rtt_timeout_mult * RTT)``,
because a far region's round trip must not look like a failure. RTT is the smoothed
(EWMA) time from a direct ping to its ack.

Inputs are verified envelopes and ``now`` (monotonic seconds); outputs are :class:`Send`
intents. The caller (``mesh.gossip.MeshCore``) adds piggybacked updates, signs and sends.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from mesh.messages import (
    Ack,
    Body,
    Envelope,
    MemberUpdate,
    Nack,
    NodeInfo,
    Ping,
    PingReq,
    Status,
)

ACTIVE = (Status.ALIVE, Status.SUSPECT)
"""States in which a member is probed."""

MAX_RELAYS = 1024


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Failure-detector timings. Defaults are memberlist's LAN profile."""

    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    retransmit_mult: int = 4
    awareness_max: int = 8
    dead_grace: float = 60.0
    """How long a DEAD or LEFT member is remembered (and offered reconnects) before forgotten."""
    rtt_alpha: float = 0.2
    """EWMA weight of a new RTT sample."""
    rtt_timeout_mult: float = 3.0
    max_piggyback: int = 12
    """Membership updates carried per message."""

    @classmethod
    def lan(cls) -> SwimConfig:
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        return cls(probe_interval=5.0, probe_timeout=3.0, suspicion_mult=6, dead_grace=300.0)

    @classmethod
    def local(cls) -> SwimConfig:
        return cls(
            probe_interval=1.0,
            probe_timeout=0.2,
            indirect_checks=1,
            suspicion_mult=3,
            retransmit_mult=2,
            dead_grace=30.0,
        )

    @classmethod
    def profile(cls, name: str) -> SwimConfig:
        try:
            return {"lan": cls.lan, "wan": cls.wan, "local": cls.local}[name]()
        except KeyError:
            raise ValueError(f"unknown membership profile {name!r} (lan, wan, local)") from None

    def suspicion_timeouts(self, n: int) -> tuple[float, float]:
        """(min, max) suspicion timeout for a mesh of ``n`` members (memberlist, log10)."""
        lo = self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval
        return lo, lo * self.suspicion_max_timeout_mult

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def detection_bound(self, n: int) -> float:
        """Worst case from a crash until some member declares it DEAD, awareness at rest.

        Every prober reaches the dead member within two of its round-robin rounds
        (``2 (n - 1)`` intervals), the failed probe resolves one interval later, and an
        unconfirmed suspicion lasts at most the max timeout. Dissemination to everyone else
        then takes a few gossip rounds on top.
        """
        return (2 * (n - 1) + 1) * self.probe_interval + self.suspicion_timeouts(n)[1]


@dataclass(frozen=True, slots=True)
class Send:
    """Something to send: ``body`` to ``addr``, where we believe ``peer_id`` listens."""

    addr: str
    body: Body
    peer_id: str = ""


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change the gossip layer reacts to (reset what it believes about a peer)."""

    node_id: str
    generation: int
    status: Status
    kind: str
    """``new``, ``status``, ``restarted`` or ``forgotten``."""


@dataclass(slots=True)
class Member:
    node_id: str
    region: str
    addr: str
    generation: int
    incarnation: int
    status: Status
    since: float
    """When ``status`` last changed (our clock)."""
    last_seen: float | None = None
    """When an authenticated message from this life of the member last arrived."""
    rtt: float | None = None
    """Smoothed round-trip time of direct probes, seconds."""

    def claim(self, accuser: str = "") -> MemberUpdate:
        return MemberUpdate(
            self.node_id,
            self.region,
            self.addr,
            self.generation,
            self.incarnation,
            self.status,
            accuser if self.status == Status.SUSPECT else "",
        )

    def rank(self) -> tuple[int, int, int]:
        return (self.generation, self.incarnation, int(self.status))


@dataclass(frozen=True, slots=True)
class PeerView:
    """A snapshot of one member for policies, metrics and /mesh/status."""

    node_id: str
    region: str
    addr: str
    generation: int
    incarnation: int
    status: Status
    since: float
    last_seen: float | None
    rtt_ms: float | None


@dataclass(slots=True)
class _Probe:
    seq: int
    target_id: str
    target_addr: str
    sent: float
    direct_deadline: float
    end: float
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester_id: str
    requester_addr: str
    requester_seq: int
    nack_at: float
    expire: float
    nacked: bool = False


@dataclass(slots=True)
class _Suspicion:
    start: float
    lo: float
    hi: float
    k: int
    accusers: set[str] = field(default_factory=set)

    def deadline(self) -> float:
        if self.k < 1:
            return self.start + self.lo
        n = len(self.accusers) - 1
        frac = math.log(n + 1) / math.log(self.k + 1)
        return self.start + max(self.lo, self.hi - frac * (self.hi - self.lo))


@dataclass(slots=True)
class _Queued:
    update: MemberUpdate
    order: int
    transmits: int = 0


class Membership:
    """One node's view of the mesh and its failure detector."""

    def __init__(
        self,
        me: NodeInfo,
        generation: int,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        counters: Counter[str] | None = None,
    ) -> None:
        self.me = me
        self.generation = generation
        self.incarnation = 0
        self.status = Status.ALIVE
        self.config = config
        self.rng = rng
        self.counters: Counter[str] = counters if counters is not None else Counter()
        self.members: dict[str, Member] = {}
        self.awareness = 0
        self._queue: dict[str, _Queued] = {}
        self._queue_seq = 0
        self._probe_order: list[str] = []
        self._probe_idx = 0
        self._probe: _Probe | None = None
        self._next_probe = now + rng.uniform(0.0, config.probe_interval)
        self._relays: dict[int, _Relay] = {}
        self._suspicions: dict[str, _Suspicion] = {}
        self._seq = 0
        self._events: list[MemberEvent] = []
        self._next_reap = now + 1.0
        self._enqueue(self.self_claim())

    # ---- views -----------------------------------------------------------------------

    def self_claim(self) -> MemberUpdate:
        m = self.me
        return MemberUpdate(
            m.node_id, m.region, m.addr, self.generation, self.incarnation, self.status
        )

    def table(self) -> tuple[MemberUpdate, ...]:
        """Every claim we hold, ourselves included: the membership half of a Sync."""
        return (self.self_claim(), *(m.claim() for m in self.members.values()))

    def with_status(self, *statuses: Status) -> list[Member]:
        return [m for m in self.members.values() if m.status in statuses]

    def alive(self) -> list[Member]:
        return self.with_status(Status.ALIVE)

    def size(self) -> int:
        """Members believed up, ourselves included: the N of the log(N) scalings."""
        return 1 + sum(1 for m in self.members.values() if m.status in ACTIVE)

    def by_addr(self, addr: str) -> Member | None:
        for m in self.members.values():
            if m.addr == addr:
                return m
        return None

    def views(self) -> list[PeerView]:
        return [
            PeerView(
                m.node_id,
                m.region,
                m.addr,
                m.generation,
                m.incarnation,
                m.status,
                m.since,
                m.last_seen,
                None if m.rtt is None else m.rtt * 1000.0,
            )
            for m in sorted(self.members.values(), key=lambda m: (m.region, m.node_id))
        ]

    def rtt(self, node_id: str) -> float | None:
        m = self.members.get(node_id)
        return m.rtt if m is not None else None

    def region_rtt(self) -> dict[str, float]:
        """Region -> median smoothed RTT (seconds) over its members that are ALIVE and measured."""
        samples: dict[str, list[float]] = {}
        for m in self.members.values():
            if m.status == Status.ALIVE and m.rtt is not None:
                samples.setdefault(m.region, []).append(m.rtt)
        return {r: statistics.median(v) for r, v in samples.items()}

    def drain_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    # ---- claims ----------------------------------------------------------------------

    def apply(self, u: MemberUpdate, now: float) -> bool:
        """Keep ``u`` if it beats what we hold; True when our view changed."""
        if u.node_id == self.me.node_id:
            self._about_me(u)
            return False
        m = self.members.get(u.node_id)
        if m is None:
            if u.status == Status.SUSPECT:
                return False  # a doubt about a stranger tells us nothing we can act on
            m = Member(u.node_id, u.region, u.addr, u.generation, u.incarnation, u.status, now)
            self.members[u.node_id] = m
            if u.status == Status.ALIVE:
                self._add_to_probe_order(u.node_id)
            self._events.append(MemberEvent(u.node_id, u.generation, u.status, "new"))
            self._enqueue(u)
            return True
        if u.rank() <= m.rank():
            if (
                u.status == Status.SUSPECT
                and u.rank() == m.rank()
                and u.accuser
                and (s := self._suspicions.get(u.node_id)) is not None
                and u.accuser not in s.accusers
            ):
                s.accusers.add(u.accuser)
                self.counters["membership.suspect_confirmations"] += 1
                self._enqueue(u)
            return False
        restarted = u.generation > m.generation
        old_status = m.status
        m.generation, m.incarnation, m.status = u.generation, u.incarnation, u.status
        m.region, m.addr = u.region, u.addr
        if restarted:
            m.last_seen = None
            m.rtt = None
        if old_status != u.status or restarted:
            m.since = now
        if u.status != Status.SUSPECT or restarted:
            self._suspicions.pop(u.node_id, None)
        if u.status == Status.SUSPECT:
            self._start_suspicion(u, now)
        if u.status == Status.ALIVE and old_status != Status.ALIVE:
            self._add_to_probe_order(u.node_id)
        if restarted:
            self.counters["membership.restarts_seen"] += 1
            self._events.append(MemberEvent(u.node_id, u.generation, u.status, "restarted"))
        elif old_status != u.status:
            self.counters[f"membership.became_{u.status.name.lower()}"] += 1
            self._events.append(MemberEvent(u.node_id, u.generation, u.status, "status"))
        self._enqueue(u)
        return True

    def _about_me(self, u: MemberUpdate) -> None:
        if u.generation > self.generation:
            self.counters["membership.identity_conflicts"] += 1
            return
        if u.generation < self.generation or u.status == Status.ALIVE:
            return
        if self.status == Status.LEFT:
            return
        if u.incarnation >= self.incarnation:
            self.incarnation = u.incarnation + 1
            self.counters["membership.refutations"] += 1
            self._awareness(+1)
            self._enqueue(self.self_claim())

    def observe(self, env: Envelope, now: float) -> None:
        """Take in what any verified envelope says about membership."""
        self.apply(env.sender_update(), now)
        m = self.members.get(env.sender.node_id)
        if m is not None and m.generation == env.generation:
            m.last_seen = now
        for u in env.updates:
            self.apply(u, now)

    def merge_table(self, updates: Iterable[MemberUpdate], now: float) -> None:
        for u in updates:
            self.apply(u, now)

    def leave(self) -> None:
        if self.status != Status.LEFT:
            self.status = Status.LEFT
            self.incarnation += 1
            self._enqueue(self.self_claim())

    # ---- dissemination -----------------------------------------------------------------

    def _enqueue(self, u: MemberUpdate) -> None:
        self._queue_seq += 1
        self._queue[u.node_id] = _Queued(u, self._queue_seq)  # newest claim replaces older

    def piggyback(self, peer_id: str = "") -> tuple[MemberUpdate, ...]:
        """Updates to carry on a message to ``peer_id``, least-sent first."""
        out: list[MemberUpdate] = []
        m = self.members.get(peer_id) if peer_id else None
        buddy = m is not None and m.status in (Status.SUSPECT, Status.DEAD)
        if m is not None and buddy:
            out.append(m.claim())  # buddy system: tell the accused first
        if not self._queue:
            return tuple(out)
        limit = self.config.retransmit_limit(self.size())
        want = self.config.max_piggyback + 1
        ranked = heapq.nsmallest(want, self._queue.values(), key=lambda q: (q.transmits, -q.order))
        for q in ranked:
            if len(out) >= self.config.max_piggyback:
                break
            if buddy and q.update.node_id == peer_id:
                continue
            out.append(q.update)
            q.transmits += 1
            if q.transmits >= limit:
                del self._queue[q.update.node_id]
        return tuple(out)

    # ---- probing -----------------------------------------------------------------------

    def _add_to_probe_order(self, node_id: str) -> None:
        if node_id in self._probe_order[self._probe_idx :]:
            return
        pos = self.rng.randint(self._probe_idx, len(self._probe_order))
        self._probe_order.insert(pos, node_id)

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_idx < len(self._probe_order):
                node_id = self._probe_order[self._probe_idx]
                self._probe_idx += 1
                m = self.members.get(node_id)
                if m is not None and m.status in ACTIVE:
                    return m
            order = [i for i, m in self.members.items() if m.status in ACTIVE]
            self.rng.shuffle(order)
            self._probe_order, self._probe_idx = order, 0
            if not order:
                return None
        return None

    def _interval(self) -> float:
        return self.config.probe_interval * (self.awareness + 1)

    def probe_timeout(self, m: Member | None) -> float:
        t = self.config.probe_timeout
        if m is not None and m.rtt is not None:
            t = max(t, self.config.rtt_timeout_mult * m.rtt)
        return min(t, 0.8 * self._interval())

    def _awareness(self, delta: int) -> None:
        self.awareness = min(max(self.awareness + delta, 0), self.config.awareness_max - 1)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def handle(self, env: Envelope, now: float) -> list[Send]:
        """React to a probe-family body (Ping, Ack, PingReq, Nack)."""
        body = env.body
        sender = env.sender
        if isinstance(body, Ping):
            if body.target_id and body.target_id != self.me.node_id:
                self.counters["membership.ping_wrong_target"] += 1
                return []
            return [Send(sender.addr, Ack(body.seq), sender.node_id)]
        if isinstance(body, Ack):
            return self._on_ack(body.seq, sender.node_id, now)
        if isinstance(body, Nack):
            p = self._probe
            if p is not None and p.seq == body.seq:
                p.nacks += 1
            return []
        if isinstance(body, PingReq):
            if len(self._relays) >= MAX_RELAYS:
                self.counters["membership.relays_dropped"] += 1
                return []
            seq = self._next_seq()
            target = self.members.get(body.target_id)
            self._relays[seq] = _Relay(
                sender.node_id,
                sender.addr,
                body.seq,
                nack_at=now + 0.8 * self.probe_timeout(target),
                expire=now + 2 * self._interval(),
            )
            return [Send(body.target_addr, Ping(seq, body.target_id), body.target_id)]
        return []

    def _on_ack(self, seq: int, sender_id: str, now: float) -> list[Send]:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            return [Send(relay.requester_addr, Ack(relay.requester_seq), relay.requester_id)]
        p = self._probe
        if p is None or p.seq != seq:
            return []
        if sender_id == p.target_id:
            m = self.members.get(p.target_id)
            if m is not None:
                sample = now - p.sent
                a = self.config.rtt_alpha
                m.rtt = sample if m.rtt is None else m.rtt + a * (sample - m.rtt)
        else:
            self.counters["membership.indirect_acks"] += 1
        self._awareness(-1)
        self._probe = None
        return []

    def tick(self, now: float) -> list[Send]:
        if self.status == Status.LEFT:
            return []
        out: list[Send] = []
        p = self._probe
        if p is not None:
            if not p.indirect and now >= p.direct_deadline:
                p.indirect = True
                relays = [
                    m
                    for m in self.members.values()
                    if m.status == Status.ALIVE and m.node_id != p.target_id
                ]
                chosen = self.rng.sample(relays, min(self.config.indirect_checks, len(relays)))
                p.expected_nacks = len(chosen)
                req = PingReq(p.seq, p.target_id, p.target_addr)
                out.extend(Send(r.addr, req, r.node_id) for r in chosen)
                self.counters["membership.indirect_probes"] += 1
            if now >= p.end:
                self._probe_failed(p, now)
                self._probe = None
        if self._probe is None and now >= self._next_probe:
            target = self._next_target()
            interval = self._interval()
            self._next_probe = now + interval
            if target is not None:
                seq = self._next_seq()
                self._probe = _Probe(
                    seq,
                    target.node_id,
                    target.addr,
                    sent=now,
                    direct_deadline=now + self.probe_timeout(target),
                    end=now + interval,
                )
                self.counters["membership.probes"] += 1
                out.append(Send(target.addr, Ping(seq, target.node_id), target.node_id))
        for seq, r in list(self._relays.items()):
            if not r.nacked and now >= r.nack_at:
                r.nacked = True
                out.append(Send(r.requester_addr, Nack(r.requester_seq), r.requester_id))
            if now >= r.expire:
                del self._relays[seq]
        for node_id, s in list(self._suspicions.items()):
            if now >= s.deadline():
                m = self.members[node_id]
                self.apply(
                    MemberUpdate(
                        m.node_id, m.region, m.addr, m.generation, m.incarnation, Status.DEAD
                    ),
                    now,
                )
        if now >= self._next_reap:
            self._next_reap = now + 1.0
            self._reap(now)
        return out

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self.counters["membership.probe_failures"] += 1
        self._awareness(p.expected_nacks - p.nacks if p.expected_nacks > 0 else 1)
        m = self.members.get(p.target_id)
        if m is None or m.status not in ACTIVE:
            return
        self.apply(  # a new suspicion, or our own confirmation of someone else's
            MemberUpdate(
                m.node_id,
                m.region,
                m.addr,
                m.generation,
                m.incarnation,
                Status.SUSPECT,
                self.me.node_id,
            ),
            now,
        )

    def _start_suspicion(self, u: MemberUpdate, now: float) -> None:
        n = self.size()
        lo, hi = self.config.suspicion_timeouts(n)
        k = self.config.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        self._suspicions[u.node_id] = _Suspicion(now, lo, hi, k, {u.accuser or "?"})

    def _reap(self, now: float) -> None:
        grace = self.config.dead_grace
        for node_id, m in list(self.members.items()):
            if m.status in (Status.DEAD, Status.LEFT) and now - m.since >= grace:
                del self.members[node_id]
                self._queue.pop(node_id, None)
                self.counters["membership.forgotten"] += 1
                self._events.append(MemberEvent(node_id, m.generation, m.status, "forgotten"))

    def next_wakeup(self) -> float:
        if self.status == Status.LEFT:
            return math.inf
        t = self._next_reap
        p = self._probe
        if p is None:
            t = min(t, self._next_probe)
        else:
            t = min(t, p.end if p.indirect else p.direct_deadline)
        for r in self._relays.values():
            t = min(t, r.expire if r.nacked else r.nack_at)
        for s in self._suspicions.values():
            t = min(t, s.deadline())
        return t
