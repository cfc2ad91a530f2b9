"""Engines joining and leaving a fleet: the schedule, start-up and draining, and the bill."""

from __future__ import annotations

import math

import pytest

from sim.fleet import Fleet, FleetSpec
from sim.profiles import L4_LLAMA_3_1_8B
from sim.scaling import Autoscaler, Bill, Reactive, RegionState, ScheduledTargets
from sim.topology import Topology
from sim.workloads.base import Workload

ONE_REGION = Topology.build(["us"], {}, intra_ms=2.0)


def test_scheduled_targets_start_ahead_drain_and_bill_by_hand() -> None:
    # Slots of 10 s: 1 engine, then 3. Start-up 1 s, decided every 1 s, looking 2 s ahead:
    # at t=8 two engines start (billed from 8, serving from 9); at t=20 the target falls to 1,
    # both drain and, idle, stop at the next tick (t=21). Bill over [0, 24):
    # 24 s + 2 x 13 s = 50 s.
    fleet = Fleet(FleetSpec(ONE_REGION, {"us": 4}, L4_LLAMA_3_1_8B, "round_robin",
                            plane="probe", prefix="none"))
    bill = Bill(0.0, 24.0)
    ctl = ScheduledTargets({"us": [1, 3]}, slot_s=10.0, lead_s=2.0)
    scaler = Autoscaler(fleet, ctl, initial={"us": 1}, tokens_per_s=1000.0, startup_s=1.0,
                        bill=bill)
    scaler.install()
    seen: dict[float, frozenset[str]] = {}
    for t in (8.5, 9.5, 20.5, 21.5):
        fleet.loop.at(t, lambda t=t: seen.__setitem__(t, frozenset(fleet.offline)))
    fleet.run(Workload("idle", [], horizon_s=24.0), drain_s=0.0)
    scaler.finish(24.0)
    assert seen[8.5] == {"us-e1", "us-e2", "us-e3"}  # starting engines take no requests
    assert seen[9.5] == {"us-e3"}
    assert seen[20.5] == {"us-e1", "us-e2", "us-e3"}  # draining
    assert seen[21.5] == {"us-e1", "us-e2", "us-e3"}
    assert bill.total_s == pytest.approx(50.0)
    assert bill.starts == 2
    assert scaler.state["us-e1"] == "off"


def test_too_many_initial_engines_is_an_error() -> None:
    fleet = Fleet(FleetSpec(ONE_REGION, {"us": 1}, L4_LLAMA_3_1_8B, "round_robin",
                            plane="probe", prefix="none"))
    with pytest.raises(ValueError, match="2 initial engines"):
        Autoscaler(fleet, Reactive(), initial={"us": 2}, tokens_per_s=1.0, startup_s=0.0,
                   bill=Bill(0.0, 1.0))


def test_reactive_thresholds() -> None:
    r = Reactive(up=0.7, down=0.3, target=0.5, minimum=1)
    assert r.desired(RegionState("us", 4, 0, 0.9), 0.0) == math.ceil(4 * 0.9 / 0.5)
    assert r.desired(RegionState("us", 4, 1, 0.9), 0.0) == 5  # wait for the one starting
    assert r.desired(RegionState("us", 4, 0, 0.5), 0.0) == 4
    assert r.desired(RegionState("us", 4, 0, 0.1), 0.0) == 1
    assert r.desired(RegionState("us", 0, 0, math.inf), 0.0) == 1


def test_scheduled_override_adds_one_engine_until_the_next_slot() -> None:
    ctl = ScheduledTargets({"us": [2, 2]}, slot_s=10.0, lead_s=0.0, override=0.9)
    assert ctl.desired(RegionState("us", 2, 0, 0.95), 1.0) == 3
    assert ctl.desired(RegionState("us", 2, 1, 0.95), 2.0) == 3
    assert ctl.desired(RegionState("us", 3, 0, 0.5), 5.0) == 3
    assert ctl.desired(RegionState("us", 3, 0, 0.5), 11.0) == 2
