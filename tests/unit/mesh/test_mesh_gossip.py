"""The gossip scheduler: beliefs, digest probes, resets, and the real PrefixIndex on the simnet."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from crdt.prefix_index import PrefixIndex
from mesh.auth import HEADER_LEN
from mesh.gossip import GossipConfig, MeshCore, StateSync
from mesh.membership import SwimConfig
from mesh.messages import MemberUpdate, NodeInfo, Push, Status, decode_envelope
from mesh.simnet import SimNet, region_latency

# ---- StateSync on its own ----------------------------------------------------------------


def index_with(replica: str, seq: int) -> PrefixIndex:
    ix = PrefixIndex()
    ix.reset(replica, 1)
    for s in range(1, seq + 1):
        ix.store(replica, (1, s), [s * 10 + i for i in range(3)])
    return ix


def test_unknown_peer_wants_a_digest_probe_and_known_peer_only_what_it_lacks() -> None:
    ix = index_with("r1", 3)
    sync = StateSync({"prefix": ix}, Counter())
    sync.refresh(0.0)
    assert sync.wants("p")  # never heard its digests
    sync.note_digests("p", 1, {"prefix": ix.digest()}, complete=True)
    assert not sync.wants("p")  # it has everything we have
    ix.store("r1", (1, 4), [99])
    sync.refresh(1.0)
    assert sync.wants("p")
    deltas, used = sync.deltas_for({"prefix": {"r1": (1, 3 * 4 + 1)}}, 1.0, 1 << 20)
    assert set(deltas) == {"prefix"} and used > 0


def test_beliefs_follow_the_peers_newest_report_even_when_it_goes_down() -> None:
    ix = index_with("r1", 3)
    ix.reset("r2", 1)
    ix.store("r2", (1, 1), [7])
    sync = StateSync({"prefix": ix}, Counter())
    sync.refresh(0.0)
    sync.note_digests("p", 2, {"prefix": {"r1": (1, 0)}}, complete=False)
    assert sync.peers["p"].digests is None  # partial news about a peer we know nothing of
    sync.note_digests("p", 5, {"prefix": ix.digest()}, complete=True)
    assert not sync.wants("p")
    sync.note_digests("p", 4, {"prefix": {}}, complete=True)  # older, arriving late: ignored
    assert not sync.wants("p")
    sync.note_digests("p", 6, {"prefix": {"r1": (1, 0)}}, complete=False)  # asks for a reset
    assert sync.wants("p")
    assert sync.offer(sync.peers["p"].digests or {}) == {"prefix": {"r1": ix.digest()["r1"]}}
    sync.note_digests("p", 7, {"prefix": {"r1": ix.digest()["r1"]}}, complete=False)
    assert not sync.wants("p")
    sync.note_digests("p", 8, {}, complete=False, absent={"prefix": ["r2"]})  # lost r2
    assert sync.offer(sync.peers["p"].digests or {}) == {"prefix": {"r2": ix.digest()["r2"]}}
    sync.reset("p")
    assert sync.peers.get("p") is None


def test_report_names_versions_and_absent_origins() -> None:
    ix = index_with("r1", 2)
    sync = StateSync({"prefix": ix}, Counter())
    versions, absent = sync.report({"prefix": {"r1": (9, 9), "r9": (1, 1)}, "other": {"x": (1, 1)}})
    assert versions == {"prefix": {"r1": ix.digest()["r1"]}}
    assert absent == {"prefix": ("r9",)}


def test_origin_advance_times() -> None:
    ix = index_with("r1", 1)
    sync = StateSync({"prefix": ix}, Counter())
    sync.refresh(5.0)
    assert sync.advanced_at["prefix"] == {"r1": 5.0}
    sync.refresh(6.0)
    assert sync.advanced_at["prefix"] == {"r1": 5.0}
    ix.store("r1", (1, 2), [1])
    sync.refresh(7.0)
    assert sync.advanced_at["prefix"] == {"r1": 7.0}
    ix.drop("r1", now=8.0)
    sync.refresh(8.0)
    assert sync.advanced_at["prefix"] == {"r1": 8.0}  # a drop is an advance too


def test_suspicion_resets_what_we_believe_about_a_peer() -> None:
    ix = index_with("r1", 2)
    core = MeshCore(
        _info("me"),
        1,
        {"prefix": ix},
        keys=[b"k" * 32],
        rng=random.Random(1),
        now=0.0,
        wall=lambda: 0.0,
    )
    core.membership.apply(MemberUpdate("p", "us", "sim://p", 1, 0, Status.ALIVE), 0.0)
    core.sync.note_digests("p", 1, {"prefix": ix.digest()}, complete=True)
    assert not core.sync.wants("p")
    core.membership.apply(MemberUpdate("p", "us", "sim://p", 1, 0, Status.SUSPECT, "x"), 1.0)
    core._member_events()
    assert core.sync.wants("p")  # belief gone: next contact starts with a digest probe


def _info(name: str) -> NodeInfo:
    return NodeInfo(name, "us", f"sim://{name}")


def test_first_push_to_a_peer_is_a_digest_probe() -> None:
    net = SimNet(seed=3)
    a_ix = index_with("r1", 5)
    a = net.spawn("a", "us", {"prefix": a_ix})
    b = net.spawn("b", "us", {"prefix": PrefixIndex()})
    a.membership.apply(MemberUpdate("b", "us", "sim://b", 1, 0, Status.ALIVE), 0.0)
    pushes: list[Push] = []

    def tap(_t: float, src: str, _dst: str, frame: bytes) -> None:
        body = decode_envelope(frame[HEADER_LEN:]).body
        if src == a.addr and isinstance(body, Push):
            pushes.append(body)

    net.tap = tap
    assert net.run_until_true(lambda: b.sync.states["prefix"].digest() == a_ix.digest(), timeout=10)
    probe, real = pushes[0], pushes[1]
    assert probe.full and probe.deltas == {} and probe.digests == {"prefix": a_ix.digest()}
    assert not real.full and real.deltas  # once b's versions came back in the ack
    assert real.digests == {"prefix": a_ix.digest()}  # it offers r1, which b lacks
    assert a.counters["push.digest_probes"] == 1


# ---- the real PrefixIndex over a lossy, partitioned mesh -------------------------------


@dataclass
class Router:
    core: MeshCore
    index: PrefixIndex


@dataclass
class Engine:
    """One replica's event stream, fed to every router that ingests it (same order)."""

    name: str
    epoch: int = 1
    seq: int = 0
    held: set[int] = field(default_factory=set)

    def step(self, rng: random.Random, routers: list[Router]) -> None:
        self.seq += 1
        v = (self.epoch, self.seq)
        if self.held and rng.random() < 0.3:
            gone = rng.sample(sorted(self.held), min(len(self.held), rng.randint(1, 20)))
            self.held -= set(gone)
            for r in routers:
                r.index.remove(self.name, v, gone)
        else:
            new = [rng.getrandbits(63) for _ in range(rng.randint(1, 40))]
            self.held |= set(new)
            for r in routers:
                r.index.store(self.name, v, new)


def truth(engines: Mapping[str, Engine]) -> dict[str, frozenset[int]]:
    return {name: frozenset(e.held) for name, e in engines.items()}


def views(routers: Mapping[str, Router]) -> list[dict[str, frozenset[int]]]:
    return [
        {r: frozenset(rt.index.keys(r)) for r in rt.index.replicas()} for rt in routers.values()
    ]


def test_prefix_index_converges_through_loss_cuts_a_router_crash_and_its_restart() -> None:
    rng = random.Random(7)
    net = SimNet(seed=7, latency=region_latency(0.001, 0.05), jitter=0.003, loss=0.1)
    swim, gossip = SwimConfig.local(), GossipConfig(max_message_bytes=24 * 1024)
    regions = ("us", "eu", "ap")
    routers: dict[str, Router] = {}
    for i in range(6):
        ix = PrefixIndex()
        core = net.spawn(
            f"n{i}",
            regions[i % 3],
            {"prefix": ix},
            seeds=["sim://n0", "sim://n1"],
            swim=swim,
            gossip=gossip,
        )
        routers[core.node_id] = Router(core, ix)
    # two routers per region ingest that region's two engines
    engines = {f"{reg}-{k}": Engine(f"{reg}-{k}") for reg in regions for k in range(2)}
    ingest = {
        name: [rt for rt in routers.values() if rt.core.region == name.split("-")[0]]
        for name in engines
    }
    for name, e in engines.items():
        for rt in ingest[name]:
            rt.index.reset(name, e.epoch)

    def run_stream(steps: int) -> None:
        for _ in range(steps):
            for name, e in engines.items():
                e.step(rng, ingest[name])
            net.run_for(0.05)

    run_stream(100)  # ~12k keys in all: far more than one 24 KiB message
    want = truth(engines)
    assert net.run_until_true(lambda: all(v == want for v in views(routers)), timeout=60)

    # a router of "us" dies; its replicas keep flowing through the other "us" router
    dead = routers.pop("n0")
    net.crash(dead.core.addr)
    for name in ingest:
        ingest[name] = [rt for rt in ingest[name] if rt is not dead]
    run_stream(40)
    want = truth(engines)
    assert net.run_until_true(lambda: all(v == want for v in views(routers)), timeout=60)

    # it comes back as a new generation with an empty index and catches up from its peers
    ix = PrefixIndex()
    core = net.spawn(
        "n0", "us", {"prefix": ix}, generation=2, seeds=["sim://n1"], swim=swim, gossip=gossip
    )
    routers["n0"] = Router(core, ix)
    run_stream(20)
    want = truth(engines)
    assert net.run_until_true(lambda: all(v == want for v in views(routers)), timeout=60)
    for rt in routers.values():
        rt.index.check_invariants()
        assert rt.core.counters["rx.rejected.bad_delta"] == 0
    assert sum(rt.core.counters["delta.oversize.prefix"] for rt in routers.values()) == 0


def test_a_frame_is_accepted_only_by_the_router_it_was_sent_to() -> None:
    """A frame captured on the way from a to b and replayed at c is refused by c."""

    def core(name: str) -> MeshCore:
        return MeshCore(_info(name), 1, {"prefix": PrefixIndex()}, keys=[b"k" * 32],
                        rng=random.Random(1), now=0.0, wall=lambda: 0.0)

    a, b, c = core("a"), core("b"), core("c")
    for x in (a, b, c):
        for y in (a, b, c):
            if x is not y:
                x.membership.apply(MemberUpdate(y.node_id, "us", y.addr, 1, 0, Status.ALIVE), 0.0)
    frames = [o for o in a.tick(5.0) if o.addr == b.addr]
    assert frames, "a sends nothing to b"
    for o in frames:
        assert decode_envelope(o.data[HEADER_LEN:]).recipient == "b"
        c.receive(o.data, 5.0)
        assert c.last_rejection is not None and c.last_rejection[0] == "wrong_recipient"
        b.receive(o.data, 5.0)
        assert b.last_rejection is None
    assert c.counters["rx.rejected.wrong_recipient"] == len(frames)
