"""The capacity integer program, solved with HiGHS.

Indices: region r, model m, GPU type g, slot t (an hour of the planned day, cyclic).

Variables: ``R[r,m,g]`` reserved instances (all day), ``OD[r,m,g,t]`` on-demand and
``S[r,m,g,t]`` spot instances in slot t (integers); ``U[r,m,g,t] >= 0`` instances started at
slot t (billed ``startup_s`` before they serve); ``F[a,b,m,t] >= 0`` tokens/s of model m
arising in region a served in region b, allowed when ``rtt(a, b) <= max_rtt`` (a == b always).

Constraints: every slot's demand is served, ``sum_b F[a,b,m,t] = D[a,m,t]``; what a region
serves fits its capacity, ``sum_a F[a,b,m,t] <= u * sum_g TPS[m,g] * (R + OD + S)[b,m,g,t]``;
region caps ``sum_m (R + OD + S)[r,m,g,t] <= cap[r,g]``; spot share
``S <= s * (R + OD + S)``; starts ``U_t >= (OD + S)_t - (OD + S)_{t-1}`` (slot -1 is the
last slot: the plan repeats daily).

Objective: reserved price x 24 h x R + on-demand and spot prices x slot hours + start-up
(on-demand price x startup_s) x U, plus a tie-break of 1e-9 per token/s x ms of RTT so that
equal-cost plans serve locally. ``reserve_only`` drops OD and S (SkyWalker's setting:
capacity is reserved for the peak); ``fixed_reserved`` pins R (stage two: the hourly
additions on top of a reservation); ``cross_region=False`` is the region-local baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import highspy
import numpy as np

from plan.spec import PlanInputError, PlanSpec

Key = tuple[str, str, str]
"""(region, model, GPU type)."""

RTT_TIE_BREAK = 1e-9


class PlanInfeasible(PlanInputError):
    """No capacity the spec allows can serve the demand; the message names where."""


@dataclass(slots=True)
class Allocation:
    """A solved plan: counts per (region, model, GPU type), flows, cost and how it was solved."""

    slots: int
    slot_hours: float
    reserved: dict[Key, int]
    on_demand: dict[Key, list[float]]
    spot: dict[Key, list[float]]
    """Instances per slot (whole numbers, except in stage one's fluid hourly part)."""
    flows: dict[tuple[str, str, str], list[float]]
    """(from region, to region, model) -> tokens/s per slot (only non-zero flows kept)."""
    cost: dict[str, float]
    instance_hours: dict[str, float]
    solve_s: float
    status: str
    mip_gap: float
    columns: int
    integer_columns: int
    rows: int
    options: dict[str, object] = field(default_factory=dict)

    def replicas(self, region: str, model: str, t: int) -> int:
        """Instances serving ``model`` in ``region`` during slot ``t`` (every GPU type;
        a fluid count is rounded up)."""
        n = 0.0
        for (r, m, _), v in self.reserved.items():
            if r == region and m == model:
                n += v
        for table in (self.on_demand, self.spot):
            for (r, m, _), vs in table.items():
                if r == region and m == model:
                    n += vs[t]
        return math.ceil(n - 1e-6)

    def targets(self) -> dict[tuple[str, str], list[int]]:
        keys = {(r, m) for r, m, _ in self.reserved} | {(r, m) for r, m, _ in self.on_demand}
        return {k: [self.replicas(k[0], k[1], t) for t in range(self.slots)] for k in sorted(keys)}

    @property
    def total_cost(self) -> float:
        return sum(self.cost.values())

    @property
    def total_instance_hours(self) -> float:
        return sum(self.instance_hours.values())


class _Model:
    """Columns and CSR rows, collected before one hand-over to HiGHS."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.cost: list[float] = []
        self.integer: list[int] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []
        self.starts: list[int] = []
        self.index: list[int] = []
        self.value: list[float] = []

    def col(self, cost: float, lb: float = 0.0, ub: float = math.inf, integer: bool = False) -> int:
        j = len(self.lb)
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        if integer:
            self.integer.append(j)
        return j

    def row(self, terms: Sequence[tuple[int, float]], lo: float, hi: float) -> None:
        self.starts.append(len(self.index))
        for j, v in terms:
            self.index.append(j)
            self.value.append(v)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def solve(
        self,
        time_limit_s: float,
        mip_rel_gap: float,
        warm: Callable[[list[float]], list[float] | None] | None = None,
    ) -> tuple[highspy.Highs, float]:
        """Solve; with ``warm``, first the LP relaxation, whose solution ``warm`` rounds into
        a feasible integer start (HiGHS then only has to improve on it and close the gap)."""
        started = time.perf_counter()
        if warm is not None and self.integer:
            relaxed = self._highs(time_limit_s, mip_rel_gap, integer=False)
            relaxed.run()
            if relaxed.getModelStatus() == highspy.HighsModelStatus.kOptimal:
                start = warm(list(relaxed.getSolution().col_value))
            else:
                start = None
            h = self._highs(time_limit_s, mip_rel_gap, integer=True)
            if start is not None:
                sol = highspy.HighsSolution()
                sol.col_value = start
                sol.value_valid = True
                h.setSolution(sol)
        else:
            h = self._highs(time_limit_s, mip_rel_gap, integer=True)
        h.run()
        return h, time.perf_counter() - started

    def _highs(self, time_limit_s: float, mip_rel_gap: float, integer: bool) -> highspy.Highs:
        h = highspy.Highs()  # type: ignore[no-untyped-call]
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", float(time_limit_s))
        h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
        inf = highspy.kHighsInf
        n = len(self.lb)
        h.addVars(
            n,
            np.array(self.lb, dtype=np.float64),
            np.array([inf if math.isinf(u) else u for u in self.ub], dtype=np.float64),
        )
        h.changeColsCost(n, np.arange(n, dtype=np.int32), np.array(self.cost, dtype=np.float64))
        if self.integer and integer:
            ints = np.array(self.integer, dtype=np.int32)
            h.changeColsIntegrality(
                len(ints), ints, np.array([highspy.HighsVarType.kInteger] * len(ints))
            )
        if self.row_lo:
            h.addRows(
                len(self.row_lo),
                np.array([-inf if math.isinf(x) else x for x in self.row_lo], dtype=np.float64),
                np.array([inf if math.isinf(x) else x for x in self.row_hi], dtype=np.float64),
                len(self.index),
                np.array(self.starts, dtype=np.int32),
                np.array(self.index, dtype=np.int32),
                np.array(self.value, dtype=np.float64),
            )
        return h


def check_servable(
    spec: PlanSpec, demand: Mapping[tuple[str, str], Sequence[float]], cross_region: bool
) -> None:
    """Name the first demand no allowed capacity can meet (before asking the solver)."""
    for (region, model), series in sorted(demand.items()):
        if region not in spec.regions:
            raise PlanInputError(f"demand for unknown region {region!r}")
        for t, d in enumerate(series):
            if not math.isfinite(d) or d < 0:
                raise PlanInputError(
                    f"demand of model {model!r} in region {region!r} at slot {t} must be a "
                    f"finite number >= 0, got {d}"
                )
        peak = max(series, default=0.0)
        if peak <= 0:
            continue
        bound = 0.0
        servers = []
        for b, rs in spec.regions.items():
            if not spec.reachable(region, b, cross_region):
                continue
            for gpu in rs.prices:
                tps = spec.gpus[gpu].throughput.get(model)
                if not tps:
                    continue
                servers.append(f"{gpu}@{b}")
                cap = rs.max_instances.get(gpu)
                bound += math.inf if cap is None else cap * tps * spec.max_utilization
        if not servers:
            where = f"within {spec.max_rtt_ms:g} ms of" if cross_region else "in"
            raise PlanInfeasible(
                f"demand no capacity can meet: no GPU type {where} region {region!r} serves "
                f"model {model!r}"
            )
        if peak > bound:
            t = list(series).index(peak)
            raise PlanInfeasible(
                f"demand no capacity can meet: model {model!r} in region {region!r} needs "
                f"{peak:.6g} tokens/s at slot {t}, but every instance allowed within reach "
                f"({', '.join(servers)}) serves at most {bound:.6g}"
            )


def solve(
    spec: PlanSpec,
    demand: Mapping[tuple[str, str], Sequence[float]],
    *,
    slot_hours: float = 1.0,
    cross_region: bool = True,
    reserve_only: bool = False,
    fixed_reserved: Mapping[Key, int] | None = None,
    fluid_hourly: bool = False,
    previous: Mapping[Key, int] | None = None,
    time_limit_s: float = 60.0,
    mip_rel_gap: float = 1e-4,
) -> Allocation:
    """Solve the program for ``demand[(region, model)]`` = tokens/s per slot.

    ``fluid_hourly``: on-demand and spot counts are continuous (stage one: only the
    reservation needs to be whole; stage two re-solves each hour in integers).
    ``previous``: with one slot, the on-demand + spot instances running in the slot before
    (instances beyond them are started, and pay the start-up)."""
    spec.validate()
    if not demand:
        raise PlanInputError("no demand given")
    lengths = {len(v) for v in demand.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise PlanInputError(f"every demand series needs the same, non-zero length: {lengths}")
    slots = lengths.pop()
    check_servable(spec, demand, cross_region)
    models = sorted({m for _, m in demand})
    regions = sorted(spec.regions)
    u = spec.max_utilization
    day_hours = slots * slot_hours
    lp = _Model()
    keys: list[Key] = [
        (r, m, g)
        for r in regions
        for m in models
        for g in sorted(spec.regions[r].prices)
        if g in spec.gpus and spec.gpus[g].throughput.get(m)
    ]
    if fixed_reserved is not None:
        for k, v in fixed_reserved.items():
            if v and k not in keys:
                raise PlanInputError(f"fixed reservation {k} names no servable GPU type")
    R: dict[Key, int] = {}
    OD: dict[Key, list[int]] = {}
    S: dict[Key, list[int]] = {}
    U: dict[Key, list[int]] = {}
    for k in keys:
        r, _, g = k
        p = spec.regions[r].prices[g]
        cap = spec.regions[r].max_instances.get(g)
        ub = math.inf if cap is None else float(cap)
        if fixed_reserved is not None:
            n = float(fixed_reserved.get(k, 0))
            R[k] = lp.col(p.reserved * day_hours, n, n, integer=True)
        else:
            R[k] = lp.col(p.reserved * day_hours, 0.0, ub, integer=True)
        if reserve_only:
            continue
        whole = not fluid_hourly
        OD[k] = [lp.col(p.on_demand * slot_hours, 0.0, ub, integer=whole) for _ in range(slots)]
        if p.spot is not None and spec.spot_max_share > 0:
            S[k] = [lp.col(p.spot * slot_hours, 0.0, ub, integer=whole) for _ in range(slots)]
        start_cost = p.on_demand * spec.startup_s / 3600.0
        U[k] = [lp.col(start_cost) for _ in range(slots)]
    F: dict[tuple[str, str, str], list[int]] = {}
    for a in regions:
        for b in regions:
            if not spec.reachable(a, b, cross_region):
                continue
            for m in models:
                if (a, m) not in demand:
                    continue
                if not any(k[0] == b and k[1] == m for k in keys):
                    continue
                tie = RTT_TIE_BREAK * spec.rtt(a, b)
                F[(a, b, m)] = [lp.col(tie) for _ in range(slots)]
    for (a, m), series in demand.items():
        for t in range(slots):
            row = [(F[(a, b, mm)][t], 1.0) for (aa, b, mm) in F if aa == a and mm == m]
            lp.row(row, series[t], series[t])
    for b in regions:
        for m in models:
            ks = [k for k in keys if k[0] == b and k[1] == m]
            if not ks:
                continue
            inflow = [f for (_, bb, mm), f in F.items() if bb == b and mm == m]
            for t in range(slots):
                terms: list[tuple[int, float]] = [(f[t], 1.0) for f in inflow]
                for k in ks:
                    c = -u * spec.gpus[k[2]].throughput[m]
                    terms.append((R[k], c))
                    if k in OD:
                        terms.append((OD[k][t], c))
                    if k in S:
                        terms.append((S[k][t], c))
                lp.row(terms, -math.inf, 0.0)
    for r in regions:
        for g, cap in spec.regions[r].max_instances.items():
            ks = [k for k in keys if k[0] == r and k[2] == g]
            if not ks:
                continue
            for t in range(1 if reserve_only else slots):
                terms = []
                for k in ks:
                    terms.append((R[k], 1.0))
                    if k in OD:
                        terms.append((OD[k][t], 1.0))
                    if k in S:
                        terms.append((S[k][t], 1.0))
                lp.row(terms, -math.inf, float(cap))
    for k in S:
        s = spec.spot_max_share
        for t in range(slots):
            lp.row([(S[k][t], 1.0 - s), (R[k], -s), (OD[k][t], -s)], -math.inf, 0.0)
    for k in U:
        for t in range(slots):
            prev = (t - 1) % slots
            terms = [(U[k][t], 1.0), (OD[k][t], -1.0), (OD[k][prev], 1.0)]
            if k in S:
                terms += [(S[k][t], -1.0), (S[k][prev], 1.0)]
            lo = 0.0
            if prev == t:
                terms = [(U[k][t], 1.0), (OD[k][t], -1.0)] + ([(S[k][t], -1.0)] if k in S else [])
                lo = -float(previous.get(k, 0)) if previous is not None else -math.inf
            lp.row(terms, lo, math.inf)
    def warm(x: list[float]) -> list[float] | None:
        """A feasible integer start from the relaxation: floor every count, then cover each
        (region, model, slot)'s lost capacity with the cheapest on-demand type per token/s
        (flows stay feasible: no region serves less than in the relaxation); spot over its
        share moves to on-demand; starts follow the counts. None if a region cap breaks."""
        if reserve_only:
            return None
        y = list(x)
        for j in lp.integer:
            y[j] = float(math.floor(x[j] + 1e-6))
        for b in regions:
            for m in models:
                ks = [k for k in keys if k[0] == b and k[1] == m]
                if not ks:
                    continue
                for t in range(slots):
                    lost = 0.0
                    for k in ks:
                        tps = u * spec.gpus[k[2]].throughput[m]
                        cols = [R[k], OD[k][t]] + ([S[k][t]] if k in S else [])
                        lost += tps * sum(x[j] - y[j] for j in cols)
                    if lost <= 1e-9:
                        continue

                    def extra(k: Key, lost: float = lost, m: str = m) -> tuple[float, int]:
                        n = math.ceil(lost / (u * spec.gpus[k[2]].throughput[m]) - 1e-9)
                        return n * spec.regions[k[0]].prices[k[2]].on_demand, n

                    best = min(ks, key=extra)
                    y[OD[best][t]] += float(extra(best)[1])
        s_share = spec.spot_max_share
        for k, cols in S.items():
            for t, j in enumerate(cols):
                if y[j] > s_share * (y[R[k]] + y[OD[k][t]] + y[j]) + 1e-9:
                    need = ((1 - s_share) * y[j] - s_share * y[R[k]]) / max(s_share, 1e-9)
                    y[OD[k][t]] = max(y[OD[k][t]], float(math.ceil(need - 1e-9)))
        for k, cols in U.items():
            added = [y[OD[k][t]] + (y[S[k][t]] if k in S else 0.0) for t in range(slots)]
            for t, j in enumerate(cols):
                y[j] = max(0.0, added[t] - added[t - 1]) if slots > 1 else 0.0
        for r in regions:
            for g, cap in spec.regions[r].max_instances.items():
                for t in range(slots):
                    used = sum(
                        y[R[k]] + y[OD[k][t]] + (y[S[k][t]] if k in S else 0.0)
                        for k in keys
                        if k[0] == r and k[2] == g
                    )
                    if used > cap + 1e-9:
                        return None
        return y

    h, solve_s = lp.solve(time_limit_s, mip_rel_gap, None if fluid_hourly else warm)
    status = h.getModelStatus()
    name = h.modelStatusToString(status)
    if status == highspy.HighsModelStatus.kInfeasible:
        raise PlanInfeasible(
            "demand no capacity can meet: the instance caps (max_instances) cannot cover the "
            "demand of every model at once in some slot"
            + (" with reservations only" if reserve_only else "")
        )
    has_solution = h.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
    if status != highspy.HighsModelStatus.kOptimal and not has_solution:
        raise PlanInputError(f"the solver stopped without a plan: {name}")
    x = list(h.getSolution().col_value)

    def iv(j: int) -> int:
        return round(x[j])

    def fv(j: int) -> float:
        return round(x[j], 4) if fluid_hourly else float(round(x[j]))

    reserved = {k: iv(j) for k, j in R.items()}
    on_demand = {k: [fv(j) for j in js] for k, js in OD.items()}
    spot = {k: [fv(j) for j in js] for k, js in S.items()}
    flows = {
        key: [max(0.0, x[j]) for j in js]
        for key, js in F.items()
        if any(x[j] > 1e-9 for j in js)
    }
    cost = {"reserved": 0.0, "on_demand": 0.0, "spot": 0.0, "startup": 0.0}
    hours = {"reserved": 0.0, "on_demand": 0.0, "spot": 0.0}
    for k in keys:
        p = spec.regions[k[0]].prices[k[2]]
        cost["reserved"] += reserved[k] * p.reserved * day_hours
        hours["reserved"] += reserved[k] * day_hours
        if k in on_demand:
            n = sum(on_demand[k])
            cost["on_demand"] += n * p.on_demand * slot_hours
            hours["on_demand"] += n * slot_hours
            added = [a + b for a, b in zip(on_demand[k], spot.get(k, [0.0] * slots), strict=True)]
            if slots > 1:
                starts = sum(max(0.0, added[t] - added[t - 1]) for t in range(slots))
            else:
                starts = max(0.0, added[0] - previous.get(k, 0)) if previous is not None else 0.0
            cost["startup"] += starts * p.on_demand * spec.startup_s / 3600.0
        if k in spot and p.spot is not None:
            n = sum(spot[k])
            cost["spot"] += n * p.spot * slot_hours
            hours["spot"] += n * slot_hours
    info = h.getInfo()
    return Allocation(
        slots=slots,
        slot_hours=slot_hours,
        reserved=reserved,
        on_demand=on_demand,
        spot=spot,
        flows=flows,
        cost=cost,
        instance_hours=hours,
        solve_s=solve_s,
        status=name,
        mip_gap=float(info.mip_gap) if lp.integer else 0.0,
        columns=len(lp.lb),
        integer_columns=len(lp.integer),
        rows=len(lp.row_lo),
        options={
            "cross_region": cross_region,
            "reserve_only": reserve_only,
            "fixed_reserved": fixed_reserved is not None,
            "mip_rel_gap": mip_rel_gap,
        },
    )


def solve_hourly(
    spec: PlanSpec,
    demand: Mapping[tuple[str, str], Sequence[float]],
    fixed_reserved: Mapping[Key, int],
    *,
    slot_hours: float = 1.0,
    cross_region: bool = True,
    time_limit_s: float = 60.0,
    mip_rel_gap: float = 1e-4,
) -> Allocation:
    """Stage two as SageServe runs it: one integer program per slot, in order, each knowing
    the instances the previous slot left running (the first slot starts from none)."""
    slots = len(next(iter(demand.values()))) if demand else 0
    parts: list[Allocation] = []
    running: dict[Key, int] = {}
    for t in range(slots):
        a = solve(
            spec,
            {k: [v[t]] for k, v in demand.items()},
            slot_hours=slot_hours,
            cross_region=cross_region,
            fixed_reserved=fixed_reserved,
            previous=running,
            time_limit_s=time_limit_s,
            mip_rel_gap=mip_rel_gap,
        )
        parts.append(a)
        running = {
            k: round(a.on_demand[k][0] + (a.spot[k][0] if k in a.spot else 0.0))
            for k in a.on_demand
        }
    if not parts:
        raise PlanInputError("no demand given")
    first = parts[0]
    flows: dict[tuple[str, str, str], list[float]] = {}
    for t, a in enumerate(parts):
        for key, v in a.flows.items():
            flows.setdefault(key, [0.0] * slots)[t] = v[0]
    return Allocation(
        slots=slots,
        slot_hours=slot_hours,
        reserved=dict(first.reserved),
        on_demand={k: [a.on_demand[k][0] for a in parts] for k in first.on_demand},
        spot={k: [a.spot[k][0] for a in parts] for k in first.spot},
        flows=flows,
        cost={c: sum(a.cost[c] for a in parts) for c in first.cost},
        instance_hours={c: sum(a.instance_hours[c] for a in parts) for c in first.instance_hours},
        solve_s=sum(a.solve_s for a in parts),
        status="Optimal" if all(a.status == "Optimal" for a in parts) else "; ".join(
            sorted({a.status for a in parts})
        ),
        mip_gap=max(a.mip_gap for a in parts),
        columns=sum(a.columns for a in parts),
        integer_columns=sum(a.integer_columns for a in parts),
        rows=sum(a.rows for a in parts),
        options={**first.options, "hourly": True},
    )
