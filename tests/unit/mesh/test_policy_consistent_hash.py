"""SkyWalker-CH: sessions stick to a ring position and walk past busy replicas."""

from __future__ import annotations

import random
from collections import Counter

from mesh.policies import ReplicaView, Request, View, make_policy


def rep(name: str, **kw: object) -> ReplicaView:
    return ReplicaView(replica=f"http://{name}", region="us", **kw)  # type: ignore[arg-type]


def req(session: str | None) -> Request:
    return Request("r", token_ids=[1, 2, 3], keys=[], session=session)


NAMES = ["a", "b", "c", "d", "e", "f"]


def test_same_session_same_replica_and_sessions_spread() -> None:
    policy = make_policy("consistent_hash")
    v = View(region="us", replicas=tuple(rep(n) for n in NAMES))
    rng = random.Random(0)
    homes = {f"user-{i}": policy.decide(req(f"user-{i}"), v, 0.0, rng).replica for i in range(300)}
    again = {s: policy.decide(req(s), v, 0.0, rng).replica for s in homes}
    assert again == homes
    counts = Counter(homes.values())
    assert set(counts) == {f"http://{n}" for n in NAMES}
    assert max(counts.values()) < 300 / len(NAMES) * 2


def test_losing_a_replica_moves_only_its_sessions() -> None:
    policy = make_policy("consistent_hash")
    full = View(region="us", replicas=tuple(rep(n) for n in NAMES))
    down = View(
        region="us", replicas=tuple(rep(n, healthy=(n != "c")) for n in NAMES)
    )
    rng = random.Random(0)
    before = {f"s{i}": policy.decide(req(f"s{i}"), full, 0.0, rng).replica for i in range(300)}
    after = {s: policy.decide(req(s), down, 0.0, rng).replica for s in before}
    moved = {s for s in before if before[s] != after[s]}
    assert moved == {s for s in before if before[s] == "http://c"}
    assert all(after[s] != "http://c" for s in after)


def test_busy_replica_is_skipped_for_the_next_on_the_ring() -> None:
    policy = make_policy("consistent_hash")
    idle = View(region="us", replicas=tuple(rep(n) for n in NAMES))
    home = policy.decide(req("alice"), idle, 0.0, random.Random(0)).replica
    assert home is not None
    busy = View(
        region="us",
        replicas=tuple(rep(n, waiting=3.0 if f"http://{n}" == home else 0.0) for n in NAMES),
    )
    d = policy.decide(req("alice"), busy, 0.0, random.Random(0))
    assert d.replica != home and "hop=" in d.reason
    # Everyone busy: the session keeps its home rather than wander.
    all_busy = View(region="us", replicas=tuple(rep(n, waiting=3.0) for n in NAMES))
    assert policy.decide(req("alice"), all_busy, 0.0, random.Random(0)).replica == home


def test_no_session_key_falls_back_to_least_load() -> None:
    policy = make_policy("consistent_hash")
    v = View(region="us", replicas=(rep("a", waiting=4), rep("b", running=1), rep("c", waiting=2)))
    d = policy.decide(req(None), v, 0.0, random.Random(0))
    assert d.replica == "http://b" and "least_load" in d.reason
