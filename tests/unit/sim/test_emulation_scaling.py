"""The emulation's pure parts: scaling a scenario and comparing two runs of it."""

from __future__ import annotations

import math

import pytest

from sim.emulation import PLANS, pace_of, scaled_profile, scaled_topology
from sim.emulation_report import kendall_tau, paired
from sim.metrics import RequestRecord
from sim.profiles import H100_LLAMA_3_1_8B, L4_LLAMA_3_1_8B, BatchShape, Profile
from sim.scenarios import GORGO_TOPOLOGY


@pytest.mark.parametrize("profile", [L4_LLAMA_3_1_8B, H100_LLAMA_3_1_8B])
@pytest.mark.parametrize("speedup", [1.0, 2.0, 7.5])
def test_scaled_profile_divides_every_step_by_the_speedup(profile: Profile, speedup: float) -> None:
    fast = scaled_profile(profile, speedup)
    shapes = [
        BatchShape.of([(0, 512)], []),  # compute bound
        BatchShape.of([], [100] * 4),  # memory bound
        BatchShape.of([(2048, 256)], [4000] * 32),
    ]
    for shape in shapes:
        assert math.isclose(fast.step_time(shape), profile.step_time(shape) / speedup)
    assert fast.num_gpu_blocks == profile.num_gpu_blocks
    assert fast.max_model_len == profile.max_model_len


def test_scaled_topology_keeps_the_chosen_regions_and_scales_every_link() -> None:
    topo = scaled_topology(GORGO_TOPOLOGY, 0.5, ("us", "eu"))
    assert topo.regions == ("us", "eu")
    assert (topo.rtt("us", "eu").lo_ms, topo.rtt("us", "eu").hi_ms) == (45, 65)
    assert (topo.intra.lo_ms, topo.intra.hi_ms) == (13, 20)


def test_workloads_are_the_same_on_every_call() -> None:
    plan = PLANS["gorgo"]
    a = plan.workload(5, 10.0, 2.0, 6.0, ("us", "eu", "asia"))
    b = plan.workload(5, 10.0, 2.0, 6.0, ("us", "eu", "asia"))
    firsts = [[(r.rid, r.prompt, r.sent_at) for r in c.start(0.5)] for c in a.clients]
    again = [[(r.rid, r.prompt, r.sent_at) for r in c.start(0.5)] for c in b.clients]
    assert firsts == again


def _rec(rid: int, sent: float, ttft: float | None, replica: str) -> RequestRecord:
    r = RequestRecord(rid, "c", "us", "u", "k", sent, 10, 5, replica=replica,
                      replica_region=replica.split("-")[0])  # fmt: skip
    r.first_token = None if ttft is None else sent + ttft
    return r


def test_paired_compares_the_same_requests_inside_the_window() -> None:
    emu = [
        _rec(1, 1.0, 0.2, "us-e0"),
        _rec(2, 2.0, 0.3, "eu-e0"),
        _rec(3, 3.0, None, "us-e0"),  # never answered: left out
        _rec(4, 0.1, 0.5, "us-e0"),  # before the window: left out
        _rec(5, 4.0, 0.4, "us-e1"),  # not on the other side: left out
    ]
    sim = [_rec(1, 1.1, 0.1, "us-e0"), _rec(2, 2.0, 0.3, "us-e0"), _rec(3, 3.0, 0.1, "us-e0"),
           _rec(4, 0.1, 0.5, "us-e0")]  # fmt: skip
    p = paired(emu, sim, warmup=0.5, horizon=10.0)
    assert p["requests"] == 2
    assert p["ttft_ratio_p10"] == pytest.approx(1.1)
    assert p["ttft_ratio_p90"] == pytest.approx(1.9)
    assert p["same_replica"] == 0.5 and p["same_region"] == 0.5


def test_kendall_tau_reads_orderings() -> None:
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3], [10, 30, 20]) == pytest.approx(1 / 3)
    assert math.isnan(kendall_tau([1], [1]))


def test_the_engines_pace_over_a_run_is_the_difference_of_two_readings() -> None:
    before = {"steps": 100.0, "late_steps": 10.0, "late_s": 0.02, "absorbed_s": 0.5,
              "busy_s": 3.0}
    after = {"steps": 300.0, "late_steps": 60.0, "late_s": 0.12, "absorbed_s": 0.75,
             "busy_s": 9.5, "idle_wake_s": 0.01}
    assert pace_of(before, after) == {"steps": 200, "late_share": 0.25, "late_ms_mean": 2.0,
                                      "absorbed_s": 0.25, "busy_s": 6.5}
    assert pace_of({}, {}) == {"steps": 0, "late_share": 0.0, "late_ms_mean": 0.0,
                               "absorbed_s": 0.0, "busy_s": 0.0}
