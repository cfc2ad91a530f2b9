"""The capacity program on instances small enough to solve by hand, and inputs it refuses."""

from __future__ import annotations

import pytest

from plan.milp import PlanInfeasible, solve, solve_hourly
from plan.spec import GpuType, PlanInputError, PlanSpec, Prices, RegionSpec, spec_from_dict


def two_regions(rtt: float = 100.0, on_demand: float = 3.0, **kw: object) -> PlanSpec:
    return PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0})},
        regions={
            "a": RegionSpec("a", {"A": Prices(1.0, on_demand)}),
            "b": RegionSpec("b", {"A": Prices(1.0, on_demand)}),
        },
        rtt_ms={("a", "b"): rtt},
        startup_s=0.0,
        **kw,  # type: ignore[arg-type]
    )


OPPOSITE = {("a", "m"): [300.0, 0.0], ("b", "m"): [0.0, 300.0]}


def test_global_reservation_covers_the_global_peak_not_the_sum_of_regional_peaks() -> None:
    # Each region peaks at 300 tokens/s (3 instances) in a different slot: region-local needs
    # 3 + 3, shared across regions 3 cover both peaks. Cost = instances x 1 $/h x 2 h.
    glob = solve(two_regions(), OPPOSITE, reserve_only=True, cross_region=True)
    local = solve(two_regions(), OPPOSITE, reserve_only=True, cross_region=False)
    assert sum(glob.reserved.values()) == 3
    assert glob.total_cost == pytest.approx(6.0)
    assert local.reserved == {("a", "m", "A"): 3, ("b", "m", "A"): 3}
    assert local.total_cost == pytest.approx(12.0)
    assert glob.total_instance_hours == pytest.approx(6.0)
    # The flows serve every slot's demand exactly.
    for t in range(2):
        served = sum(v[t] for (_, _, _), v in glob.flows.items())
        assert served == pytest.approx(300.0)


def test_regions_beyond_the_rtt_bound_cannot_share() -> None:
    spec = two_regions(rtt=300.0, max_rtt_ms=200.0)
    glob = solve(spec, OPPOSITE, reserve_only=True, cross_region=True)
    assert sum(glob.reserved.values()) == 6


def test_on_demand_takes_a_short_peak_when_cheaper_than_reserving_all_day() -> None:
    # One region, 300 tokens/s in slot 0 of 2: reserving 3 costs 3 x 1 x 2 = 6; on demand
    # at 1.5 $/h costs 3 x 1.5 = 4.5 (start-up free here). At 3.5 $/h reserving wins (6 < 10.5).
    demand = {("a", "m"): [300.0, 0.0]}
    cheap = solve(two_regions(on_demand=1.5), demand)
    assert sum(cheap.reserved.values()) == 0
    assert cheap.on_demand[("a", "m", "A")] == [3, 0]
    assert cheap.total_cost == pytest.approx(4.5)
    dear = solve(two_regions(on_demand=3.5), demand)
    assert sum(dear.reserved.values()) == 3
    assert dear.total_cost == pytest.approx(6.0)


def test_start_up_is_billed_per_instance_started() -> None:
    # 3 on-demand instances started once a day; 1 h of start-up each at 2 $/h = 6 $ extra.
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0})},
        regions={"a": RegionSpec("a", {"A": Prices(10.0, 2.0)})},
        rtt_ms={},
        startup_s=3600.0,
    )
    a = solve(spec, {("a", "m"): [300.0, 0.0, 0.0, 0.0]})
    assert a.on_demand[("a", "m", "A")] == [3, 0, 0, 0]
    assert a.cost["startup"] == pytest.approx(6.0)
    assert a.total_cost == pytest.approx(12.0)


def test_the_cheaper_mix_of_gpu_types_is_chosen() -> None:
    # 500 tokens/s: 5 x A (100, 1 $) = 5 $, 2 x B (250, 2 $) = 4 $, 1 B + 3 A = 5 $.
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0}), "B": GpuType("B", {"m": 250.0})},
        regions={"a": RegionSpec("a", {"A": Prices(1.0, 9.0), "B": Prices(2.0, 9.0)})},
        rtt_ms={},
    )
    a = solve(spec, {("a", "m"): [500.0]}, reserve_only=True)
    assert a.reserved == {("a", "m", "A"): 0, ("a", "m", "B"): 2}
    assert a.total_cost == pytest.approx(4.0)


def test_spot_is_used_up_to_its_share() -> None:
    # 400 tokens/s for one slot; spot 0.5 $/h at most half the capacity, on-demand 2 $/h:
    # 2 spot + 2 on-demand = 5 $.
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0})},
        regions={"a": RegionSpec("a", {"A": Prices(10.0, 2.0, 0.5)})},
        rtt_ms={},
        startup_s=0.0,
        spot_max_share=0.5,
    )
    a = solve(spec, {("a", "m"): [400.0]})
    assert a.spot[("a", "m", "A")] == [2]
    assert a.on_demand[("a", "m", "A")] == [2]
    assert a.total_cost == pytest.approx(5.0)


def test_fixed_reservation_only_adds_on_top() -> None:
    a = solve(two_regions(), OPPOSITE, fixed_reserved={("a", "m", "A"): 2, ("b", "m", "A"): 0})
    assert a.reserved[("a", "m", "A")] == 2
    # The reserved 2 serve 200 of b's peak from a; 1 more on-demand instance covers the rest.
    assert a.replicas("a", "m", 0) + a.replicas("b", "m", 0) == 3
    assert a.replicas("a", "m", 1) + a.replicas("b", "m", 1) == 3


def test_demand_no_capacity_can_meet_names_the_region_and_model() -> None:
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0})},
        regions={"a": RegionSpec("a", {"A": Prices(1.0, 2.0)}, {"A": 2})},
        rtt_ms={},
    )
    with pytest.raises(PlanInfeasible, match=r"model 'm' in region 'a' needs 300 tokens/s"):
        solve(spec, {("a", "m"): [300.0]})
    with pytest.raises(PlanInfeasible, match=r"no GPU type .* serves model 'x'"):
        solve(spec, {("a", "x"): [1.0]})


def test_caps_shared_between_models_make_the_solver_report_infeasible() -> None:
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0, "n": 100.0})},
        regions={"a": RegionSpec("a", {"A": Prices(1.0, 2.0)}, {"A": 3})},
        rtt_ms={},
    )
    with pytest.raises(PlanInfeasible, match="caps"):
        solve(spec, {("a", "m"): [200.0], ("a", "n"): [200.0]})


def test_negative_price_is_refused_with_its_place() -> None:
    spec = two_regions(on_demand=-1.0)
    with pytest.raises(PlanInputError, match=r"negative .* on_demand price of 'A' in region 'a'"):
        solve(spec, OPPOSITE)


def test_region_without_gpu_type_is_refused() -> None:
    doc = {
        "gpus": {"A": {"throughput": {"m": 100}}},
        "regions": {"a": {"prices": {"A": {"reserved": 1, "on_demand": 2}}}, "b": {}},
    }
    with pytest.raises(PlanInputError, match="region 'b' has no GPU type"):
        spec_from_dict(doc)


def test_bad_demand_values_are_refused() -> None:
    with pytest.raises(PlanInputError, match="finite number >= 0"):
        solve(two_regions(), {("a", "m"): [-5.0, 0.0]})
    with pytest.raises(PlanInputError, match="unknown region 'z'"):
        solve(two_regions(), {("z", "m"): [1.0]})
    with pytest.raises(PlanInputError, match="same, non-zero length"):
        solve(two_regions(), {("a", "m"): [1.0], ("b", "m"): [1.0, 2.0]})


def test_hourly_programs_run_in_order_and_pay_start_up_beyond_what_runs() -> None:
    # Each hour is solved knowing only the previous one, as SageServe's hourly arbiter:
    # slot 0 starts 3 (3 x 2 $ + 3 x 2 $ start-up), slot 1 keeps 1 (2 $), slot 2 starts 2
    # more (3 x 2 $ + 2 x 2 $). Total 12 + 2 + 10 = 24 $.
    spec = PlanSpec(
        gpus={"A": GpuType("A", {"m": 100.0})},
        regions={"a": RegionSpec("a", {"A": Prices(10.0, 2.0)})},
        rtt_ms={},
        startup_s=3600.0,
    )
    a = solve_hourly(spec, {("a", "m"): [300.0, 100.0, 300.0]}, {("a", "m", "A"): 0})
    assert a.on_demand[("a", "m", "A")] == [3, 1, 3]
    assert a.cost["startup"] == pytest.approx(10.0)
    assert a.total_cost == pytest.approx(24.0)
    assert a.targets() == {("a", "m"): [3, 1, 3]}


def test_fluid_stage_one_keeps_the_reservation_whole() -> None:
    # 250 tokens/s in 3 slots of 4 and 350 in one, reserved 1 $/h, on demand 4 $/h:
    # R = 2 costs 8 + (0.5 x 3 + 1.5) x 4 = 20, R = 3 costs 12 + 0.5 x 4 = 14, R = 4 costs 16.
    spec = two_regions(on_demand=4.0)
    a = solve(spec, {("a", "m"): [250.0, 250.0, 250.0, 350.0]}, fluid_hourly=True,
              cross_region=False)
    assert a.reserved[("a", "m", "A")] == 3
    assert a.on_demand[("a", "m", "A")] == pytest.approx([0.0, 0.0, 0.0, 0.5])
    assert a.total_cost == pytest.approx(14.0)
    assert a.integer_columns == 2  # only the reservations are whole
