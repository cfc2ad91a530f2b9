"""``kvmesh bench plan-solver``: how long the capacity program takes as regions grow.

A synthetic instance shaped like the papers' settings: ``--models`` models, ``--gpus`` GPU
types (every region offers all of them, each serving every model at a different
throughput and price), regions spread around the globe (RTT grows with the time-zone
distance, 25-300 ms; 200 ms bound), a daily demand cycle per region peaking at 14:00 local
time, 24 hourly slots, reserved / on-demand / spot prices, the 155 s start-up. Each size is
solved as the planner does: the global reservation (reservations only), the region-local
one, stage one (the reservation, with fluid on-demand and spot for the peaks) and stage two
(24 hourly integer programs on top of stage one's reservation). Times are wall and CPU seconds
of building and solving each program on this machine (CPU time counts every solver thread,
and does not grow when other work shares the cores).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from plan.milp import solve, solve_hourly
from plan.spec import GpuType, PlanSpec, Prices, RegionSpec

BASE_TPS = (2000.0, 6000.0, 14000.0)
BASE_PRICE = (1.0, 3.2, 7.0)


Demand = dict[tuple[str, str], list[float]]


def instance(regions: int, models: int, gpus: int, seed: int = 1) -> tuple[PlanSpec, Demand]:
    rng = random.Random(seed)
    names = [f"r{i:02d}" for i in range(regions)]
    offsets = {r: -12.0 + 24.0 * i / regions for i, r in enumerate(names)}
    gpu_names = [f"g{k}" for k in range(gpus)]
    model_names = [f"m{j}" for j in range(models)]
    gtypes = {
        g: GpuType(
            g, {m: BASE_TPS[k % 3] * (1 + k // 3) / (1 + j) for j, m in enumerate(model_names)}
        )
        for k, g in enumerate(gpu_names)
    }
    rspecs = {}
    for r in names:
        f = rng.uniform(0.9, 1.2)
        rspecs[r] = RegionSpec(
            r,
            {
                g: Prices(BASE_PRICE[k % 3] * f, BASE_PRICE[k % 3] * f * 2.6, BASE_PRICE[k % 3] * f)
                for k, g in enumerate(gpu_names)
            },
        )
    rtt = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            dh = abs(offsets[a] - offsets[b])
            dh = min(dh, 24 - dh)
            rtt[(a, b)] = 25.0 + 275.0 * dh / 12.0
    spec = PlanSpec(
        gpus=gtypes, regions=rspecs, rtt_ms=rtt, max_rtt_ms=200.0, startup_s=155.0,
        spot_max_share=0.2,
    )
    demand: Demand = {}
    for r in names:
        for j, m in enumerate(model_names):
            peak = rng.uniform(20_000, 80_000) / (1 + j)
            demand[(r, m)] = [
                peak * (0.15 + 0.85 * (1 + math.cos(2 * math.pi * ((t + offsets[r]) % 24 - 14) / 24)) / 2)  # noqa: E501
                for t in range(24)
            ]
    return spec, demand


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmesh bench plan-solver", description=__doc__)
    p.add_argument("--regions", default="3,10,30")
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--gpus", type=int, default=3)
    p.add_argument("--gap", type=float, default=1e-2, help="relative MIP gap accepted")
    p.add_argument("--time-limit", type=float, default=120.0)
    p.add_argument("--out", default="results/plan-solver")
    args = p.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.regions.split(",") if x):
        spec, demand = instance(n, args.models, args.gpus)
        reserved: dict[tuple[str, str, str], int] = {}
        for label, kw in (
            ("global reservation", {"reserve_only": True}),
            ("region-local reservation", {"reserve_only": True, "cross_region": False}),
            ("stage 1: reservation + fluid hourly", {"fluid_hourly": True}),
            ("stage 2: 24 hourly programs", {"hourly": True}),
        ):
            t0 = time.perf_counter()
            c0 = time.process_time()
            opts = {"mip_rel_gap": args.gap, "time_limit_s": args.time_limit}
            if kw.pop("hourly", False):
                a = solve_hourly(spec, demand, reserved, **opts)
            else:
                a = solve(spec, demand, **kw, **opts)  # type: ignore[arg-type]
            if kw.get("fluid_hourly"):
                reserved = a.reserved
            wall = time.perf_counter() - t0
            cpu = time.process_time() - c0
            row = {
                "regions": n, "models": args.models, "gpus": args.gpus, "slots": 24,
                "program": label, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                "solve_s": round(a.solve_s, 3),
                "status": a.status, "mip_gap": round(a.mip_gap, 5), "columns": a.columns,
                "integer": a.integer_columns, "rows": a.rows, "cost": round(a.total_cost, 2),
            }
            rows.append(row)
            print(
                f"{n:3d} regions x {args.models} models x {args.gpus} GPU types x 24 h  "
                f"{label:36s} {wall:7.2f} s wall {cpu:7.2f} s CPU  "
                f"({a.status}, gap {a.mip_gap:.4f}, "
                f"{a.columns} columns, {a.integer_columns} integer, {a.rows} rows)",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"command": "kvmesh bench plan-solver " + " ".join(argv), "rows": rows}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0
