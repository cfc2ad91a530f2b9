"""The sans-I/O mesh peer: CRDT gossip scheduling on top of SWIM membership.

:class:`MeshCore` is everything one router says and hears, with no sockets and no clock
of its own: ``receive(frame, now)`` and ``tick(now)`` return :class:`Outgoing` frames,
``next_wakeup()`` says when ``tick`` next has work. The asyncio shell (``mesh.node``)
and the in-memory network (``mesh.simnet``) drive the very same object.

State exchange, per replicated state (``crdt.base.Replicated``):

* **Eager delta push.** Every ``gossip_interval`` a node picks up to ``gossip_nodes`` ALIVE
  peers that lack something — at least one in another region when one exists and lacks
  something — and sends each ``delta_since(belief)``, cut to the message budget, with its
  own versions of the origins it offers (the ones it believes the peer lacks).
* **Beliefs.** For each peer we keep, per state and origin, the version it last reported.
  A push-ack carries the receiver's versions *after* the merge of every origin the push
  named (and which of them it does not hold at all), so "what I sent" is folded in exactly
  when the push completes instead of guessed while it flies; a lost push or ack simply
  means the same delta goes again (merges are idempotent). Reports are ordered by the
  peer's message counter, so a late message never overwrites a newer one, and a report
  may lower a belief (a CRDT asks for a snapshot that way). Whole digests travel only in
  a *digest probe* (a push with no deltas, to a peer we hold no belief about, so a
  newcomer is not sprayed with snapshots by every neighbour at once) and in syncs; pushes
  and acks carry versions of the named origins only, so their size follows the change,
  not the number of origins. Beliefs are dropped when a peer becomes SUSPECT, DEAD or
  LEFT, or restarts.
* **Offers.** A belief goes stale between two contacts with a peer (others keep feeding
  it), and a push from a stale belief resends what the peer already got elsewhere: the
  waste of plain push gossip grows with the mesh. So a delta bigger than ``eager_bytes`` is
  not sent at once: the push carries only the offered versions, the ack says what the peer
  really lacks, and the delta computed from that fresh report follows immediately. Small
  deltas (the steady trickle of engine events) still go eagerly, at half a round trip.
* **Back-pressure.** At most one push in flight per peer; a busy peer is skipped this
  round. A flight ends with its ack, its ``push_timeout`` or an ``unreachable`` report from
  the transport. A push that used most of its budget is continued as soon as it is acked.
* **Anti-entropy.** Every ``sync_interval`` a push-pull with one random peer: our member
  table and digests go out (Sync), the reply carries the peer's table, digests and what we
  lack (SyncReply), and we push back what it lacks at once (Scuttlebutt's three messages).
  The same Sync joins the mesh through the seeds, and reconnects to DEAD members
  (``reconnect_interval``) so partitions heal.
* **Size.** No frame exceeds ``max_message_bytes``: deltas are cut with the CRDT's own
  ``max_bytes``; the rest follows in the next pushes.

Every frame is authenticated and checked against the replay window (``mesh.auth``);
rejected frames are counted under ``rx.rejected.<reason>`` and never touch any state.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crdt.base import DecodeError, Delta, Replicated, Version
from mesh.auth import Authenticator, Rejected, ReplayGuard
from mesh.membership import Member, MemberEvent, Membership, PeerView, Send, SwimConfig
from mesh.messages import (
    Ack,
    Body,
    Digests,
    Envelope,
    Nack,
    NodeInfo,
    Notice,
    Ping,
    PingReq,
    Push,
    PushAck,
    Status,
    Sync,
    SyncReply,
    decode_envelope,
    encode_envelope,
    kind_name,
    packed_size,
    update_wire,
)

PIGGYBACK_RESERVE = 4096
"""Bytes kept free in a push for the envelope and piggybacked member updates."""


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """State-exchange timings and limits. Defaults suit routers in one region (LAN)."""

    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    push_timeout: float = 2.0
    sync_interval: float = 5.0
    reconnect_interval: float = 10.0
    seed_interval: float = 30.0
    """Contact a seed we are not connected to, so split meshes find each other again."""
    join_retry: float = 1.0
    """While we know no live peer, contact every seed this often."""
    max_message_bytes: int = 1 << 20
    eager_bytes: int = 4096
    """Deltas of about half this size or less are pushed at once; bigger ones are offered
    first (see above)."""
    replay_window: int = 1024
    max_clock_skew: float = 120.0
    max_replay_senders: int = 4096

    @classmethod
    def lan(cls) -> GossipConfig:
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        return cls(gossip_nodes=4, push_timeout=5.0, sync_interval=10.0, reconnect_interval=30.0)

    @classmethod
    def local(cls) -> GossipConfig:
        return cls(push_timeout=1.0, sync_interval=2.0, reconnect_interval=3.0, seed_interval=10.0)

    @classmethod
    def profile(cls, name: str) -> GossipConfig:
        try:
            return {"lan": cls.lan, "wan": cls.wan, "local": cls.local}[name]()
        except KeyError:
            raise ValueError(f"unknown gossip profile {name!r} (lan, wan, local)") from None


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A sealed frame for ``addr``.

    ``reply`` marks frames addressed to the sender of the frame being received: the HTTP
    shell returns them in the response body, so a ping's ack measures one real HTTP round
    trip and a peer reachable only one way still gets answers.
    """

    addr: str
    data: bytes
    reply: bool = False
    kind: str = ""


# ---- the CRDT half ---------------------------------------------------------------------


@dataclass(slots=True)
class _Flight:
    seq: int
    deadline: float
    full: bool
    """The push used most of its budget: continue as soon as it is acked."""
    probe: bool = False
    """A digest probe: its ack reports every origin we hold."""
    offer: bool = False
    """An offer: once acked, the data follows whatever its size."""


@dataclass(slots=True)
class _Peer:
    digests: dict[str, dict[str, Version]] | None = None
    counter: int = -1
    clean_epoch: int = -1
    """Our digest epoch at which we found nothing to send this peer."""


def _ahead(mine: Mapping[str, Version], theirs: Mapping[str, Version]) -> bool:
    for origin, v in mine.items():
        t = theirs.get(origin)
        if t is None or v > t:
            return True
    return False


class StateSync:
    """What each peer is believed to hold of each state, and what to send it."""

    def __init__(self, states: Mapping[str, Replicated[Any]], counters: Counter[str]) -> None:
        self.states = states
        self.counters = counters
        self.digests: dict[str, dict[str, Version]] = {name: {} for name in states}
        self.advanced_at: dict[str, dict[str, float]] = {name: {} for name in states}
        self.epoch = 0
        self.peers: dict[str, _Peer] = {}
        self.flights: dict[str, _Flight] = {}
        """Pushes in flight, by peer: at most one each."""

    def refresh(self, now: float) -> None:
        """Re-read our digests; note when each origin last advanced."""
        changed = False
        for name, st in self.states.items():
            d = st.digest()
            prev = self.digests[name]
            if d == prev:
                continue
            changed = True
            adv = self.advanced_at[name]
            for origin, v in d.items():
                if prev.get(origin) != v:
                    adv[origin] = now
            for origin in [o for o in adv if o not in d]:
                del adv[origin]
            self.digests[name] = dict(d)
        if changed:
            self.epoch += 1

    def peer(self, peer_id: str) -> _Peer:
        p = self.peers.get(peer_id)
        if p is None:
            p = self.peers[peer_id] = _Peer()
        return p

    def reset(self, peer_id: str) -> None:
        self.peers.pop(peer_id, None)
        self.flights.pop(peer_id, None)

    def note_digests(
        self,
        peer_id: str,
        counter: int,
        digests: Digests,
        *,
        complete: bool,
        absent: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """Take in a peer's report unless a newer report from it already arrived.

        A ``complete`` report (whole digests) replaces what we believed; a partial one only
        updates the origins it names, and is ignored while we believe nothing yet.
        """
        p = self.peer(peer_id)
        if counter <= p.counter:
            return
        if p.digests is None and not complete:
            return
        p.counter = counter
        known = p.digests if p.digests is not None else {}
        for name, dg in digests.items():
            if name not in self.states:
                continue
            if complete:
                known[name] = dict(dg)
            else:
                known.setdefault(name, {}).update(dg)
        for name, origins in (absent or {}).items():
            held = known.get(name)
            if held is not None:
                for o in origins:
                    held.pop(o, None)
        p.digests = known
        p.clean_epoch = -1

    def offer(self, theirs: Mapping[str, Mapping[str, Version]]) -> dict[str, dict[str, Version]]:
        """Our versions of every origin where we are ahead of ``theirs``."""
        out: dict[str, dict[str, Version]] = {}
        for name, mine in self.digests.items():
            peer = theirs.get(name, {})
            ahead = {o: v for o, v in mine.items() if (t := peer.get(o)) is None or v > t}
            if ahead:
                out[name] = ahead
        return out

    def report(
        self, named: Digests
    ) -> tuple[dict[str, dict[str, Version]], dict[str, tuple[str, ...]]]:
        """Our current versions of the origins a peer named, and the named ones we lack."""
        versions: dict[str, dict[str, Version]] = {}
        absent: dict[str, tuple[str, ...]] = {}
        for name, origins in named.items():
            st = self.states.get(name)
            if st is None:
                continue
            mine = st.digest()
            versions[name] = {o: mine[o] for o in origins if o in mine}
            missing = tuple(o for o in origins if o not in mine)
            if missing:
                absent[name] = missing
        return versions, absent

    def busy(self, peer_id: str) -> bool:
        return peer_id in self.flights

    def wants(self, peer_id: str) -> bool:
        """True when the peer may lack something (or we have never heard its digests)."""
        p = self.peers.get(peer_id)
        if p is None or p.digests is None:
            return True
        if p.clean_epoch == self.epoch:
            return False
        for name, mine in self.digests.items():
            if _ahead(mine, p.digests.get(name, {})):
                return True
        p.clean_epoch = self.epoch
        return False

    def deltas_for(
        self, theirs: Mapping[str, Mapping[str, Version]], now: float, budget: int
    ) -> tuple[dict[str, object], int]:
        """Wire deltas of every state for a peer holding ``theirs``, within ``budget`` bytes.

        A state whose delta overshoots what is left (a CRDT that cannot cut finer) is asked
        again with half the room, twice; if it still does not fit it is left out of this
        message and counted under ``delta.oversize.<state>``.
        """
        out: dict[str, object] = {}
        used = 0
        for name, st in self.states.items():
            left = budget - used
            if left < 256:
                break
            room = left
            for _ in range(3):
                delta = st.delta_since(theirs.get(name, {}), now, room)
                if delta.is_empty():
                    break
                wire = delta.to_wire()
                size = packed_size(wire) + len(name) + 2
                if size <= left:
                    out[name] = wire
                    used += size
                    break
                room //= 2
            else:
                self.counters[f"delta.oversize.{name}"] += 1
        return out, used

    def decode(self, wire: Mapping[str, object]) -> list[tuple[Replicated[Any], Delta]]:
        """Decode every delta first, so a bad one rejects the message before any merge."""
        out: list[tuple[Replicated[Any], Delta]] = []
        for name, obj in wire.items():
            st = self.states.get(name)
            if st is None:
                self.counters["rx.unknown_state"] += 1
                continue
            out.append((st, st.delta_from_wire(obj)))
        return out

    def merge(self, decoded: Iterable[tuple[Replicated[Any], Delta]], now: float) -> None:
        for st, delta in decoded:
            if st.merge(delta, now):
                self.counters["merge.changed"] += 1
            else:
                self.counters["merge.unchanged"] += 1

    def current_digests(self) -> dict[str, dict[str, Version]]:
        return {name: st.digest() for name, st in self.states.items()}


# ---- the peer --------------------------------------------------------------------------


class MeshCore:
    """One mesh peer as a state machine: frames and ``now`` in, frames out."""

    def __init__(
        self,
        me: NodeInfo,
        generation: int,
        states: Mapping[str, Replicated[Any]],
        *,
        keys: Sequence[bytes],
        rng: random.Random,
        now: float,
        wall: Callable[[], float],
        swim: SwimConfig | None = None,
        gossip: GossipConfig | None = None,
        seeds: Iterable[str] = (),
    ) -> None:
        self.me = me
        self.generation = generation
        self.swim = swim or SwimConfig.lan()
        self.config = gossip or GossipConfig.lan()
        self.rng = rng
        self.wall = wall
        self.counters: Counter[str] = Counter()
        self.auth = Authenticator(keys)
        self.replay = ReplayGuard(
            self.config.replay_window, self.config.max_clock_skew, self.config.max_replay_senders
        )
        self.membership = Membership(me, generation, self.swim, rng, now, self.counters)
        self.sync = StateSync(states, self.counters)
        self.seeds: tuple[str, ...] = ()
        self.set_seeds(seeds)
        self.on_event: Callable[[MemberEvent], None] | None = None
        """Called for every membership change (shells log them)."""
        self.last_rejection: tuple[str, str] | None = None
        """``(reason, detail)`` of the frame the last ``receive`` refused, else None."""
        self._counter = 0
        self._seq = 0
        cfg = self.config
        self._next_push = now + rng.uniform(0.0, cfg.gossip_interval)
        self._next_sync = now + rng.uniform(0.5, 1.0) * cfg.sync_interval
        self._next_reconnect = now + rng.uniform(0.5, 1.0) * cfg.reconnect_interval
        self._next_seed = now
        self.sync.refresh(now)

    # ---- integrator API ----------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.me.node_id

    @property
    def addr(self) -> str:
        return self.me.addr

    @property
    def region(self) -> str:
        return self.me.region

    def set_seeds(self, addrs: Iterable[str]) -> None:
        """Seed addresses (already resolved by the shell); our own address is ignored."""
        self.seeds = tuple(dict.fromkeys(a for a in addrs if a and a != self.me.addr))

    def peers(self) -> list[PeerView]:
        return self.membership.views()

    def origin_advanced_at(self, state: str) -> dict[str, float]:
        """Origin -> last ``now`` its version advanced here (drives expiry of silent origins)."""
        return dict(self.sync.advanced_at.get(state, {}))

    def unreachable(self, addr: str, now: float) -> None:
        """The transport could not deliver to ``addr``: end pushes in flight there."""
        for m in self.membership.members.values():
            if m.addr == addr and self.sync.flights.pop(m.node_id, None) is not None:
                self.counters["push.unreachable"] += 1

    def leave(self, now: float) -> list[Outgoing]:
        """Announce a voluntary departure to a few peers; afterwards the core stays silent."""
        self.membership.leave()
        alive = self.membership.alive()
        self.rng.shuffle(alive)
        targets = alive[: max(3, self.config.gossip_nodes)]
        return self._emit([Send(m.addr, Notice(), m.node_id) for m in targets], now, None)

    # ---- receive -----------------------------------------------------------------------

    def _reject(self, reason: str, detail: str = "") -> list[Outgoing]:
        self.counters[f"rx.rejected.{reason}"] += 1
        self.last_rejection = (reason, detail)
        return []

    def receive(self, data: bytes, now: float) -> list[Outgoing]:
        """Verify, decode and act on one frame; never raises on bad input."""
        self.last_rejection = None
        self.counters["rx.frames"] += 1
        self.counters["rx.bytes"] += len(data)
        if len(data) > self.config.max_message_bytes:
            return self._reject("oversize", f"{len(data)} bytes")
        try:
            env = decode_envelope(self.auth.open(data))
        except Rejected as r:
            return self._reject(r.reason, r.detail)
        except DecodeError as exc:
            return self._reject("undecodable", str(exc))
        if env.sender.node_id == self.me.node_id:
            return self._reject("from_self")
        if env.recipient != self.me.node_id and (env.recipient or not isinstance(env.body, Sync)):
            # A frame sent to another router (replayed here), or unaddressed but not a join.
            return self._reject("wrong_recipient", env.recipient)
        try:
            self.replay.admit(
                env.sender.node_id, env.generation, env.counter, env.sent_at, self.wall()
            )
        except Rejected as r:
            return self._reject(r.reason, r.detail)
        body = env.body
        decoded: list[tuple[Replicated[Any], Delta]] = []
        if isinstance(body, Push | SyncReply):
            try:
                decoded = self.sync.decode(body.deltas)
            except DecodeError as exc:
                return self._reject("bad_delta", str(exc))
        if self.membership.status == Status.LEFT:
            self.counters["rx.after_leave"] += 1
            return []
        self.counters[f"rx.{kind_name(body)}"] += 1
        self.membership.observe(env, now)
        self._member_events()
        sends = self._dispatch(env, decoded, now)
        return self._emit(sends, now, env.sender.addr)

    def _dispatch(
        self, env: Envelope, decoded: list[tuple[Replicated[Any], Delta]], now: float
    ) -> list[Send]:
        body = env.body
        sender = env.sender
        peer_id = sender.node_id
        if isinstance(body, Ping | Ack | PingReq | Nack):
            return self.membership.handle(env, now)
        if isinstance(body, Push):
            self.sync.merge(decoded, now)
            self.sync.note_digests(peer_id, env.counter, body.digests, complete=body.full)
            versions, absent = self.sync.report(body.digests)
            return [Send(sender.addr, PushAck(body.seq, versions, absent), peer_id)]
        if isinstance(body, PushAck):
            return self._on_push_ack(peer_id, env.counter, body, now)
        if isinstance(body, Sync):
            self.membership.merge_table(body.members, now)
            self._member_events()
            self.sync.note_digests(peer_id, env.counter, body.digests, complete=True)
            table = self.membership.table()
            mine = self.sync.current_digests()
            overhead = (
                packed_size([update_wire(u) for u in table]) + packed_size(mine) + PIGGYBACK_RESERVE
            )
            budget = self.config.max_message_bytes - overhead
            deltas, _ = self.sync.deltas_for(body.digests, now, budget) if budget > 0 else ({}, 0)
            return [Send(sender.addr, SyncReply(table, mine, deltas), peer_id)]
        if isinstance(body, SyncReply):
            self.membership.merge_table(body.members, now)
            self._member_events()
            self.sync.merge(decoded, now)
            self.sync.note_digests(peer_id, env.counter, body.digests, complete=True)
            return self._push_now(peer_id, now)
        return []  # Notice: its updates were the message

    def _on_push_ack(self, peer_id: str, counter: int, ack: PushAck, now: float) -> list[Send]:
        flight = self.sync.flights.get(peer_id)
        ours = flight is not None and flight.seq == ack.seq
        probe = flight is not None and ours and flight.probe
        self.sync.note_digests(peer_id, counter, ack.digests, complete=probe, absent=ack.absent)
        if flight is None or not ours:
            self.counters["push.late_acks"] += 1
            return []
        del self.sync.flights[peer_id]
        full, offer = flight.full, flight.offer
        self.counters["push.acked"] += 1
        return self._push_now(peer_id, now, eager=offer) if full or offer else []

    def _push_now(self, peer_id: str, now: float, eager: bool = False) -> list[Send]:
        m = self.membership.members.get(peer_id)
        if m is None or m.status != Status.ALIVE or self.sync.busy(peer_id):
            return []
        self.sync.refresh(now)
        if not self.sync.wants(peer_id):
            return []
        s = self._push_to(m, now, eager)
        return [s] if s is not None else []

    def _member_events(self) -> None:
        for ev in self.membership.drain_events():
            if ev.kind in ("restarted", "forgotten") or ev.status != Status.ALIVE:
                self.sync.reset(ev.node_id)
            if self.on_event is not None:
                self.on_event(ev)

    # ---- tick --------------------------------------------------------------------------

    def tick(self, now: float) -> list[Outgoing]:
        if self.membership.status == Status.LEFT:
            return []
        sends = self.membership.tick(now)
        self._member_events()
        cfg = self.config
        for peer_id, flight in list(self.sync.flights.items()):
            if now >= flight.deadline:
                del self.sync.flights[peer_id]
                self.counters["push.timeouts"] += 1
        if now >= self._next_push:
            self._next_push += cfg.gossip_interval
            if self._next_push <= now:
                self._next_push = now + cfg.gossip_interval
            sends.extend(self._push_round(now))
        if now >= self._next_sync:
            self._next_sync = now + cfg.sync_interval
            alive = self.membership.alive()
            if alive:
                m = self.rng.choice(alive)
                sends.append(self._sync_to(m.addr, m))
        if now >= self._next_reconnect:
            self._next_reconnect = now + cfg.reconnect_interval
            dead = self.membership.with_status(Status.DEAD)
            if dead:
                m = self.rng.choice(dead)
                sends.append(self._sync_to(m.addr, m))
                self.counters["sync.reconnects"] += 1
        if now >= self._next_seed:
            sends.extend(self._seed_round(now))
        return self._emit(sends, now, None)

    def _seed_round(self, now: float) -> list[Send]:
        alive = self.membership.alive()
        if not alive:
            self._next_seed = now + self.config.join_retry
            return [self._sync_to(a, None) for a in self.seeds]
        self._next_seed = now + self.config.seed_interval
        connected = {m.addr for m in alive}
        unknown = [a for a in self.seeds if a not in connected]
        return [self._sync_to(self.rng.choice(unknown), None)] if unknown else []

    def _sync_to(self, addr: str, m: Member | None) -> Send:
        self.counters["sync.sent"] += 1
        body = Sync(self.membership.table(), self.sync.current_digests())
        return Send(addr, body, m.node_id if m is not None else "")

    def _push_round(self, now: float) -> list[Send]:
        self.sync.refresh(now)
        cfg = self.config
        candidates: list[Member] = []
        for m in self.membership.alive():
            if self.sync.busy(m.node_id):
                self.counters["push.skipped_busy"] += 1
            else:
                candidates.append(m)
        self.rng.shuffle(candidates)
        chosen: list[Member] = []
        remote_regions = sorted({m.region for m in candidates if m.region != self.me.region})
        self.rng.shuffle(remote_regions)
        for region in remote_regions:
            pick = next(
                (c for c in candidates if c.region == region and self.sync.wants(c.node_id)),
                None,
            )
            if pick is not None:
                chosen.append(pick)
                break
        for c in candidates:
            if len(chosen) >= cfg.gossip_nodes:
                break
            if c not in chosen and self.sync.wants(c.node_id):
                chosen.append(c)
        sends = []
        for m in chosen:
            s = self._push_to(m, now)
            if s is not None:
                sends.append(s)
        return sends

    def _push_to(self, m: Member, now: float, eager: bool = False) -> Send | None:
        p = self.sync.peer(m.node_id)
        flights = self.sync.flights
        deadline = now + self.config.push_timeout
        self._seq += 1
        if p.digests is None:
            body = Push(self._seq, {}, self.sync.digests, full=True)
            flights[m.node_id] = _Flight(self._seq, deadline, False, probe=True)
            self.counters["push.digest_probes"] += 1
            return Send(m.addr, body, m.node_id)
        offered = self.sync.offer(p.digests)
        budget = self.config.max_message_bytes - packed_size(offered) - PIGGYBACK_RESERVE
        if not eager:
            # Ask the CRDT for an eager-sized cut only: nearly full means there is more.
            budget = min(budget, self.config.eager_bytes)
        deltas, used = self.sync.deltas_for(p.digests, now, budget)
        if not deltas:
            self.counters["push.nothing_to_send"] += 1
            p.clean_epoch = self.sync.epoch
            return None
        if not eager and used > budget // 2:
            flights[m.node_id] = _Flight(self._seq, deadline, False, offer=True)
            self.counters["push.offers"] += 1
            return Send(m.addr, Push(self._seq, {}, offered), m.node_id)
        flights[m.node_id] = _Flight(self._seq, deadline, used > budget // 2)
        self.counters["push.sent"] += 1
        return Send(m.addr, Push(self._seq, deltas, offered), m.node_id)

    # ---- sending -----------------------------------------------------------------------

    def _emit(self, sends: list[Send], now: float, reply_to: str | None) -> list[Outgoing]:
        out: list[Outgoing] = []
        for s in sends:
            frame = self._seal(s.body, s.peer_id)
            if frame is None:
                continue
            kind = kind_name(s.body)
            self.counters[f"tx.{kind}"] += 1
            self.counters[f"tx.bytes.{kind}"] += len(frame)
            self.counters["tx.frames"] += 1
            self.counters["tx.bytes"] += len(frame)
            out.append(Outgoing(s.addr, frame, s.addr == reply_to, kind))
        return out

    def _seal(self, body: Body, peer_id: str) -> bytes | None:
        updates = self.membership.piggyback(peer_id)
        for attempt in (updates, ()):
            self._counter += 1
            env = Envelope(
                self.me,
                self.generation,
                self.membership.incarnation,
                self._counter,
                int(self.wall()),
                body,
                attempt,
                peer_id,
            )
            frame = self.auth.seal(encode_envelope(env))
            if len(frame) <= self.config.max_message_bytes:
                return frame
        self.counters[f"tx.oversize.{kind_name(body)}"] += 1
        return None

    def next_wakeup(self) -> float:
        if self.membership.status == Status.LEFT:
            return math.inf
        t = min(
            self.membership.next_wakeup(),
            self._next_push,
            self._next_sync,
            self._next_reconnect,
            self._next_seed,
        )
        for flight in self.sync.flights.values():
            t = min(t, flight.deadline)
        return t


__all__ = ["GossipConfig", "MeshCore", "Outgoing", "StateSync"]
