"""The SWIM/Lifeguard state machine on its own: claims, probes, suspicion, refutation."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.membership import Membership, SwimConfig
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

ME = NodeInfo("me", "us", "sim://me")


def peer(name: str, region: str = "us") -> NodeInfo:
    return NodeInfo(name, region, f"sim://{name}")


def claim(
    name: str, status: Status = Status.ALIVE, gen: int = 1, inc: int = 0, accuser: str = ""
) -> MemberUpdate:
    return MemberUpdate(name, "us", f"sim://{name}", gen, inc, status, accuser)


def env(sender: str, body: Body, gen: int = 1, inc: int = 0) -> Envelope:
    return Envelope(peer(sender), gen, inc, 1, 0, body)


def make(*names: str, config: SwimConfig | None = None) -> Membership:
    m = Membership(ME, 1, config or SwimConfig.lan(), random.Random(0), 0.0)
    for n in names:
        m.apply(claim(n), 0.0)
    return m


def run_until_probe(m: Membership, t: float = 0.0) -> tuple[float, Ping, str]:
    """Tick until a ping goes out; returns (time, ping, target id)."""
    while t < 10:
        for s in m.tick(t):
            if isinstance(s.body, Ping):
                return t, s.body, s.peer_id
        t += 0.01
    raise AssertionError("no probe within 10 s")


# ---- claims ----------------------------------------------------------------------------


statuses = st.sampled_from(Status)
claims = st.builds(
    lambda s, g, i, a: claim("x", s, g, i, a),
    statuses,
    st.integers(1, 3),
    st.integers(0, 3),
    st.sampled_from(["", "p", "q"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(claims, max_size=12))
def test_view_is_the_highest_claim_seen(seq: list[MemberUpdate]) -> None:
    """Model: keep the highest (generation, incarnation, status); ignore doubts about strangers."""
    m = make()
    held: MemberUpdate | None = None
    for i, u in enumerate(seq):
        m.apply(u, float(i))
        if held is None:
            if u.status != Status.SUSPECT:
                held = u
        elif u.rank() > held.rank():
            held = u
        got = m.members.get("x")
        if held is None:
            assert got is None
            continue
        assert got is not None and got.rank() == held.rank()
        assert (got.status == Status.SUSPECT) == ("x" in m._suspicions)


def test_restart_supersedes_and_is_reported() -> None:
    m = make("a")
    m.apply(claim("a", Status.DEAD, gen=1, inc=4), 1.0)
    m.apply(claim("a", Status.ALIVE, gen=2, inc=0), 2.0)
    assert m.members["a"].status == Status.ALIVE and m.members["a"].generation == 2
    kinds = [e.kind for e in m.drain_events()]
    assert kinds[-1] == "restarted"
    m.apply(claim("a", Status.DEAD, gen=1, inc=9), 3.0)  # about the previous life: ignored
    assert m.members["a"].status == Status.ALIVE


def test_suspicion_about_me_is_refuted_with_a_higher_incarnation() -> None:
    m = make("a")
    m.apply(MemberUpdate("me", "us", "sim://me", 1, 0, Status.SUSPECT, "a"), 1.0)
    assert m.incarnation == 1
    assert m.awareness == 1
    assert MemberUpdate("me", "us", "sim://me", 1, 1, Status.ALIVE) in m.piggyback("a")
    m.apply(MemberUpdate("me", "us", "sim://me", 1, 0, Status.DEAD), 1.5)  # stale: no-op
    assert m.incarnation == 1
    m.apply(MemberUpdate("me", "us", "sim://me", 0, 7, Status.DEAD), 2.0)  # older life
    assert m.incarnation == 1
    m.apply(MemberUpdate("me", "us", "sim://me", 5, 0, Status.ALIVE), 2.0)  # a newer "me"?
    assert m.counters["membership.identity_conflicts"] == 1


def test_envelope_sender_counts_as_alive_and_updates_last_seen() -> None:
    m = make()
    m.observe(env("a", Ping(1, "me")), 3.0)
    assert m.members["a"].status == Status.ALIVE
    assert m.members["a"].last_seen == 3.0


# ---- probes ----------------------------------------------------------------------------


def test_direct_probe_ack_measures_rtt() -> None:
    m = make("a")
    t, ping, target = run_until_probe(m)
    assert target == "a" and ping.target_id == "a"
    m.handle(env("a", Ack(ping.seq)), t + 0.030)
    assert m.rtt("a") == pytest.approx(0.030)
    t2, ping2, _ = run_until_probe(m, t + 0.031)
    m.handle(env("a", Ack(ping2.seq)), t2 + 0.010)
    assert m.rtt("a") == pytest.approx(0.030 + 0.2 * (0.010 - 0.030))
    assert m.region_rtt() == {"us": pytest.approx(m.rtt("a"))}


def test_failed_probe_goes_indirect_then_suspect_then_dead() -> None:
    cfg = SwimConfig.lan()
    m = make("a", "b", "c", "d", config=cfg)
    t, ping, target = run_until_probe(m)
    others = {"a", "b", "c", "d"} - {target}
    reqs = m.tick(t + cfg.probe_timeout)
    assert {s.peer_id for s in reqs} <= others and len(reqs) == cfg.indirect_checks
    assert all(isinstance(s.body, PingReq) and s.body.target_id == target for s in reqs)
    for s in reqs:  # every relay answers: it could not reach the target either
        m.handle(env(s.peer_id, Nack(ping.seq)), t + 0.9)
    m.tick(t + cfg.probe_interval)
    assert m.members[target].status == Status.SUSPECT
    assert m.awareness == 0  # all nacks came back: our own health is fine
    lo, hi = cfg.suspicion_timeouts(m.size())
    t_s = t + cfg.probe_interval
    m.tick(t_s + hi - 0.01)
    assert m.members[target].status == Status.SUSPECT
    m.tick(t_s + hi + 0.01)
    assert m.members[target].status == Status.DEAD
    assert lo < hi


def test_missing_nacks_raise_local_awareness_and_stretch_the_interval() -> None:
    cfg = SwimConfig.lan()
    m = make("a", "b", "c", "d", config=cfg)
    t, _, _ = run_until_probe(m)
    m.tick(t + cfg.probe_timeout)
    out = m.tick(t + cfg.probe_interval)  # no nack from any of the 3 relays
    assert m.awareness == 3
    assert any(isinstance(s.body, Ping) for s in out)  # the next probe starts on time
    t2, _, _ = run_until_probe(m, t + cfg.probe_interval + 0.01)  # ...the one after, 4x later
    assert t2 - (t + cfg.probe_interval) == pytest.approx(4 * cfg.probe_interval, abs=0.02)


def test_confirmations_shorten_suspicion() -> None:
    cfg = SwimConfig.lan()
    names = [f"p{i}" for i in range(10)]
    m = make(*names, config=cfg)
    m.apply(claim("p0", Status.SUSPECT, accuser="p1"), 0.0)
    s = m._suspicions["p0"]
    lo, hi = cfg.suspicion_timeouts(m.size())
    assert s.deadline() == pytest.approx(hi)
    m.apply(claim("p0", Status.SUSPECT, accuser="p2"), 0.1)
    one = s.deadline()
    m.apply(claim("p0", Status.SUSPECT, accuser="p3"), 0.2)
    two = s.deadline()
    m.apply(claim("p0", Status.SUSPECT, accuser="p3"), 0.3)  # the same accuser twice
    assert s.deadline() == two
    assert lo <= two < one < hi
    assert m.counters["membership.suspect_confirmations"] == 2


def test_relay_forwards_acks_and_nacks_when_silent() -> None:
    cfg = SwimConfig.lan()
    m = make("a", "b", config=cfg)
    out = m.handle(env("a", PingReq(77, "b", "sim://b")), 1.0)
    assert len(out) == 1 and out[0].addr == "sim://b" and isinstance(out[0].body, Ping)
    relay_seq = out[0].body.seq
    back = m.handle(env("b", Ack(relay_seq)), 1.1)
    assert [(s.addr, s.body) for s in back] == [("sim://a", Ack(77))]
    out = m.handle(env("a", PingReq(78, "b", "sim://b")), 2.0)
    nacks = [s for s in m.tick(2.0 + 0.8 * cfg.probe_timeout + 0.001) if isinstance(s.body, Nack)]
    assert [(s.addr, s.body) for s in nacks] == [("sim://a", Nack(78))]


def test_ping_for_someone_else_is_not_acked() -> None:
    m = make("a")
    assert m.handle(env("a", Ping(1, "not-me")), 0.0) == []
    assert [s.body for s in m.handle(env("a", Ping(2, "me")), 0.0)] == [Ack(2)]
    assert [s.body for s in m.handle(env("a", Ping(3, "")), 0.0)] == [Ack(3)]


# ---- dissemination ---------------------------------------------------------------------


def test_accused_peer_hears_its_accusation_first() -> None:
    m = make("a", "b")
    m.apply(claim("a", Status.SUSPECT, accuser="b"), 0.0)
    for _ in range(20):  # long after the queue has drained
        m.piggyback("b")
    assert m.piggyback("a")[0] == claim("a", Status.SUSPECT, accuser="")


def test_updates_are_retransmitted_a_bounded_number_of_times() -> None:
    cfg = SwimConfig.lan()
    m = make("a", "b", "c", config=cfg)
    m.piggyback()  # drain the joins
    for _ in range(50):
        m.piggyback()
    m.apply(claim("a", Status.ALIVE, inc=3), 0.0)
    limit = cfg.retransmit_limit(m.size())
    carried = sum(claim("a", inc=3) in m.piggyback() for _ in range(50))
    assert carried == limit


def test_dead_members_are_forgotten_after_the_grace_period() -> None:
    cfg = SwimConfig(dead_grace=10.0)
    m = make("a", config=cfg)
    m.apply(claim("a", Status.DEAD), 5.0)
    m.tick(14.0)
    assert "a" in m.members
    m.tick(16.0)
    assert "a" not in m.members
    assert [e.kind for e in m.drain_events()][-1] == "forgotten"


def test_leave_announces_left_and_goes_quiet() -> None:
    m = make("a")
    m.leave()
    assert m.self_claim().status == Status.LEFT and m.incarnation == 1
    assert m.tick(100.0) == []
    m.apply(MemberUpdate("me", "us", "sim://me", 1, 5, Status.DEAD), 101.0)
    assert m.incarnation == 1  # no refutation while leaving


# ---- profile numbers ---------------------------------------------------------------------


def test_profile_numbers_match_memberlist() -> None:
    lan, wan = SwimConfig.lan(), SwimConfig.wan()
    lo, hi = lan.suspicion_timeouts(16)
    assert lo == pytest.approx(4.8, abs=0.05) and hi == pytest.approx(28.9, abs=0.1)
    lo, hi = wan.suspicion_timeouts(16)
    assert lo == pytest.approx(36.1, abs=0.1) and hi == pytest.approx(216.7, abs=0.3)
    assert lan.retransmit_limit(16) == 8
    assert SwimConfig.profile("local").probe_timeout == 0.2
    with pytest.raises(ValueError):
        SwimConfig.profile("moon")


def test_our_own_failed_probe_confirms_someone_elses_suspicion() -> None:
    cfg = SwimConfig.lan()
    names = [f"p{i}" for i in range(10)]
    m = make(*names, config=cfg)
    t, _, target = run_until_probe(m)
    m.apply(claim(target, Status.SUSPECT, accuser="p9" if target != "p9" else "p8"), t)
    before = m._suspicions[target].deadline()
    m.tick(t + cfg.probe_timeout)
    m.tick(t + cfg.probe_interval)  # our probe failed too: a second, independent accuser
    assert m._suspicions[target].accusers == {"me", "p9" if target != "p9" else "p8"}
    assert m._suspicions[target].deadline() < before
