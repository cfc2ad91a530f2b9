"""``kvmesh bench plan-diurnal``: a capacity plan replayed in the discrete-event simulator.

1. *History.* The diurnal-cycle workload (three regions peaking at 14:00 local time, 8x
   peak/trough, a day compressed to 600 virtual s) runs for ``--history-days`` days on ample
   region-local capacity; every request's prompt + output tokens at its send time is the
   demand history (a seed of its own, never one of the validation seeds).
2. *Throughput per instance.* The scenario ``diurnal-cycle`` shows 4 L4 replicas per region
   holding the SLO at a region's peak (``region-local-12``: p99 TTFT 0.64 s) and 3 not, so an
   instance's throughput at the SLO is taken as the largest regional slot peak / 4.
3. *Plan.* ``plan.planner.make_plan`` on that history (Holt-Winters, 24 slots a day).
4. *Replay,* on each seed, of the same day with the kvmesh router (mesh plane):
   ``region-local`` (the region-local peak reservation, routers use their own region only),
   ``global-reserved`` (the plan's global reservation, served across regions),
   ``plan+hourly`` (stage one's reservation plus stage two's hourly on-demand additions, started
   ahead by the start-up time, with the LT-UA override), ``forecast-scaling`` (the hourly program
   with no reservation: every engine scaled by the forecast), and ``reactive`` (no plan:
   0.7/0.3 utilisation thresholds).

Time is compressed 144x (86,400 s -> 600 s), so the 155 s start-up becomes 1.08 virtual s and
a plan slot (one hour) 25 virtual s; instance-hours are reported in uncompressed hours.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from plan.milp import solve, solve_hourly
from plan.planner import PlanOptions, allocation_dict, make_plan
from plan.report import write_plan
from plan.series import DemandHistory, Sample
from plan.spec import GpuType, PlanSpec, Prices, RegionSpec
from sim.fleet import Fleet, FleetSpec, RouterLayout
from sim.metrics import percentile
from sim.profiles import L4_LLAMA_3_1_8B
from sim.scaling import Autoscaler, Bill, Controller, Reactive, ScheduledTargets
from sim.scenarios import DIURNAL_SHAPE, REGIONS, SKYLB_TOPOLOGY
from sim.workloads import ARENA, Workload, diurnal_workload

MODEL = "llama-3.1-8b"
GPU = "L4"
REFERENCE_REPLICAS = 4
"""Replicas per region that hold the SLO at a region's peak in ``diurnal-cycle``."""
RESERVED_PRICE = 37.56 / 8
ON_DEMAND_PRICE = 98.32 / 8
"""SkyWalker's p5.48xlarge prices (3-year reserved / on-demand) per GPU, $ per hour."""
REAL_DAY_S = 86400.0
VARIANTS = ("region-local", "global-reserved", "plan+hourly", "forecast-scaling", "reactive")


def workload(seed: int, horizon: float) -> Workload:
    return diurnal_workload(
        replace(ARENA, think_time_s=3.0),
        dict.fromkeys(REGIONS, 2.5),
        seed=seed,
        horizon_s=horizon,
        shape=DIURNAL_SHAPE,
        users_per_region=400,
    )


def fleet_spec(replicas: Mapping[str, int], seed: int, label: str, local: bool) -> FleetSpec:
    return FleetSpec(
        topology=SKYLB_TOPOLOGY,
        replicas=dict(replicas),
        profile=L4_LLAMA_3_1_8B,
        policy="kvmesh",
        layout=RouterLayout(per_region=1),
        plane="mesh",
        prefix="events",
        seed=seed,
        label=label,
        region_local=local,
    )


def history_samples(days: int, seed: int) -> list[Sample]:
    """Demand from ``days`` simulated days on ample region-local capacity (fast probe plane)."""
    spec = FleetSpec(
        topology=SKYLB_TOPOLOGY,
        replicas=dict.fromkeys(REGIONS, 6),
        profile=L4_LLAMA_3_1_8B,
        policy="least_load",
        layout=RouterLayout(per_region=1),
        plane="probe",
        prefix="none",
        seed=seed,
        region_local=True,
    )
    result = Fleet(spec).run(workload(seed, days * DIURNAL_SHAPE.day_s), drain_s=30.0)
    return [
        Sample(r.sent, r.region, MODEL, float(r.prompt_tokens + r.output_tokens), 0.0)
        for r in result.records
    ]


def write_history_csv(history: DemandHistory, path: Path) -> None:
    lines = ["timestamp,region,model,tokens_per_s"]
    for (region, model), arr in sorted(history.series.items()):
        for i, v in enumerate(arr):
            lines.append(f"{history.start + i * history.step_s:.4f},{region},{model},{v:.3f}")
    path.write_text("\n".join(lines) + "\n")


def make_spec(tokens_per_s: float) -> PlanSpec:
    regions = {
        r: RegionSpec(r, {GPU: Prices(RESERVED_PRICE, ON_DEMAND_PRICE)}) for r in REGIONS
    }
    rtt = {}
    for i, a in enumerate(REGIONS):
        for b in REGIONS[i + 1 :]:
            rtt[(a, b)] = SKYLB_TOPOLOGY.rtt(a, b).mean_ms
    return PlanSpec(
        gpus={GPU: GpuType(GPU, {MODEL: tokens_per_s})},
        regions=regions,
        rtt_ms=rtt,
        max_rtt_ms=200.0,
        startup_s=155.0,
        max_utilization=1.0,
        slo_ttft_s=1.0,
    )


def _counts(alloc: Mapping[str, Any]) -> dict[str, int]:
    return {
        r: int(sum(alloc["reserved"].get(r, {}).get(MODEL, {}).values())) for r in REGIONS
    }


def run_variant(
    name: str,
    seed: int,
    plan: Mapping[str, Any],
    forecast_only: Mapping[str, Any],
    extra: Mapping[str, Mapping[str, Any]],
    tps: float,
    startup_s: float,
    warmup: float,
    horizon: float,
    drain: float,
    slo: float,
) -> dict[str, Any]:
    day = DIURNAL_SHAPE.day_s
    hours_per_s = REAL_DAY_S / day / 3600.0
    bill = Bill(warmup, horizon)
    reserved_n = 0
    scaler: Autoscaler | None = None
    if name in ("region-local", "global-reserved") or name in extra:
        if name in extra:
            alloc = extra[name]
        else:
            alloc = plan["reservation"]["region_local" if name == "region-local" else "global"]
        counts = _counts(alloc)
        fleet = Fleet(fleet_spec(counts, seed, name, name == "region-local"))
        reserved_n = sum(counts.values())
        for r, n in counts.items():
            bill.seconds[r] = n * (horizon - warmup)
    else:
        controller: Controller
        if name == "reactive":
            peak = _counts(plan["reservation"]["region_local"])
            top = {r: 2 * max(1, n) for r, n in peak.items()}
            initial = {r: max(1, n // 2) for r, n in peak.items()}
            controller = Reactive()
        else:
            src = plan if name == "plan+hourly" else forecast_only
            targets = {
                r: [int(x) for x in src["targets"].get(r, {}).get(MODEL, [0] * 24)]
                for r in REGIONS
            }
            top = {r: max(v) + 3 for r, v in targets.items()}
            initial = {r: v[0] for r, v in targets.items()}
            controller = ScheduledTargets(
                targets, float(plan["slot_s"]), lead_s=startup_s + 1.0
            )
            if name == "plan+hourly":
                reserved_n = sum(_counts(plan["stage1"]).values())
        fleet = Fleet(fleet_spec(top, seed, name, False))
        scaler = Autoscaler(
            fleet, controller, initial=initial, tokens_per_s=tps, startup_s=startup_s, bill=bill
        )
        scaler.install()
    started = time.perf_counter()
    result = fleet.run(workload(seed, horizon), drain_s=drain)
    if scaler is not None:
        scaler.finish(horizon)
    measured = [r for r in result.records if warmup <= r.sent < horizon]
    ttfts = [r.ttft for r in measured]
    ok = sum(1 for t in ttfts if t <= slo)
    inst_h = bill.total_s * hours_per_s
    reserved_h = reserved_n * (horizon - warmup) * hours_per_s
    cost = reserved_h * RESERVED_PRICE + max(0.0, inst_h - reserved_h) * ON_DEMAND_PRICE
    return {
        "variant": name,
        "seed": seed,
        "instance_hours": round(inst_h, 2),
        "reserved_instance_hours": round(reserved_h, 2),
        "cost": round(cost, 2),
        "slo_attainment": ok / len(ttfts) if ttfts else math.nan,
        "requests": len(measured),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99),
        "rejected": result.counters.rejected,
        "cross_region": (
            sum(1 for r in measured if r.replica_region and r.replica_region != r.region)
            / max(1, len(measured))
        ),
        "starts": bill.starts,
        "timeline": bill.timeline,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def _mean(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if isinstance(r[key], int | float)]
    return statistics.fmean(vals) if vals else math.nan


def _sd(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows]
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for v in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == v]
        if not rows:
            continue
        out[v] = {
            "instance_hours": _mean(rows, "instance_hours"),
            "instance_hours_sd": _sd(rows, "instance_hours"),
            "cost": _mean(rows, "cost"),
            "slo_attainment": _mean(rows, "slo_attainment"),
            "slo_attainment_min": min(float(r["slo_attainment"]) for r in rows),
            "ttft_p90": _mean(rows, "ttft_p90"),
            "ttft_p99": _mean(rows, "ttft_p99"),
            "cross_region": _mean(rows, "cross_region"),
            "starts": _mean(rows, "starts"),
            "seeds": len(rows),
        }
    return out


def _less(a: float, b: float) -> float:
    return (1.0 - a / b) * 100.0 if b else math.nan


def markdown(doc: Mapping[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        "# plan-diurnal: a capacity plan replayed in the simulator",
        "",
        f"`{doc['command']}`",
        "",
        f"Seeds {doc['seeds']}; SLO: TTFT <= {doc['slo_ttft_s']} s; instance throughput "
        f"{doc['tokens_per_s']:.0f} tokens/s; start-up {doc['startup_virtual_s']:.2f} virtual s "
        f"(155 s at 144x compression); history {doc['history_days']} days.",
        "",
        "| variant | instance-hours (mean +- sd) | cost $ | SLO attainment (mean / min) |"
        " p90 TTFT s | p99 TTFT s | cross-region | starts |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, x in s.items():
        lines.append(
            f"| {v} | {x['instance_hours']:.1f} +- {x['instance_hours_sd']:.1f} | "
            f"{x['cost']:.0f} | {100 * x['slo_attainment']:.2f}% / "
            f"{100 * x['slo_attainment_min']:.2f}% | {x['ttft_p90']:.3f} | {x['ttft_p99']:.3f} | "
            f"{100 * x['cross_region']:.1f}% | {x['starts']:.0f} |"
        )
    lines += ["", *[f"- {c}" for c in doc["claims"]], ""]
    return "\n".join(lines)


def plot_timeline(runs: Sequence[Mapping[str, Any]], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = min(r["seed"] for r in runs)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for r in runs:
        if r["seed"] != first:
            continue
        if not r["timeline"]:
            n = r["instance_hours"] / 24.0
            ax.hlines(n, 0, 24, linestyles="--", label=f"{r['variant']} (static)")
            continue
        per_region: dict[str, int] = {}
        xs: list[float] = []
        ys: list[int] = []
        for t, region, _on, billed in r["timeline"]:
            if t > DIURNAL_SHAPE.day_s + 60.0:
                break
            per_region[region] = billed
            xs.append(t / DIURNAL_SHAPE.day_s * 24.0)
            ys.append(sum(per_region.values()))
        ax.step(xs, ys, where="post", label=r["variant"])
    ax.set_xlabel("hour of the (compressed) day, UTC")
    ax.set_ylabel("billed engines, all regions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "replicas.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="kvmesh bench plan-diurnal", description=__doc__)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--history-days", type=int, default=4)
    p.add_argument("--history-seed", type=int, default=1000)
    p.add_argument("--history", help="reuse a history CSV written by an earlier run")
    p.add_argument(
        "--variants", help=f"comma-separated (default: {','.join(VARIANTS)} and global-reserved@U)"
    )
    p.add_argument(
        "--global-utilization",
        default="0.9",
        help="also reserve globally at these max utilisations (variants global-reserved@U)",
    )
    p.add_argument("--slo", type=float, default=1.0, help="TTFT SLO, s")
    p.add_argument("--startup", type=float, default=155.0, help="start-up, uncompressed s")
    p.add_argument("--out", default="results/plan-diurnal")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--merge", nargs="+", help="only combine the results of these folders")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args.merge, out, "kvmesh bench plan-diurnal " + " ".join(argv),
                     not args.no_plots)
    day = DIURNAL_SHAPE.day_s
    step = day / 1440.0
    t0 = time.perf_counter()
    if args.history:
        from plan.inputs import read_csv

        samples = list(read_csv(args.history, step))
    else:
        samples = history_samples(args.history_days, args.history_seed)
    history = DemandHistory.from_samples(samples, step_s=step, day_s=day).whole_days()
    write_history_csv(history, out / "history.csv")
    print(f"history: {history.full_days} days in {time.perf_counter() - t0:.0f} s", flush=True)
    coarse = history.resample(day / 96)
    peak = max(float(v.max()) for v in coarse.series.values())
    tps = peak / REFERENCE_REPLICAS
    spec = make_spec(tps)
    plan = make_plan(spec, history, PlanOptions())
    hourly = {
        (r, m): v for key, v in plan["forecast"]["slot_peak"].items()  # type: ignore[index]
        for r, m in [key.split("/", 1)]
    }
    zero = {(r, MODEL, GPU): 0 for r in REGIONS}
    fo = solve_hourly(spec, hourly, zero)
    forecast_only = {
        "targets": {r: {m: v} for (r, m), v in fo.targets().items()},
        "stage": allocation_dict(fo),
    }
    design = {
        (r, m): v for key, v in plan["forecast"]["design_peak"].items()  # type: ignore[index]
        for r, m in [key.split("/", 1)]
    }
    extra: dict[str, dict[str, Any]] = {}
    for u in (float(x) for x in args.global_utilization.split(",") if x):
        alloc = solve(replace(spec, max_utilization=u), design, reserve_only=True)
        extra[f"global-reserved@{u:g}"] = allocation_dict(alloc)
    write_plan(plan, out / "plan", plots=not args.no_plots)
    startup_v = args.startup * day / REAL_DAY_S
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.variants:
        variants = [v for v in args.variants.split(",") if v]
        unknown = [v for v in variants if v not in VARIANTS and v not in extra]
        if unknown:
            p.error(f"unknown variant {unknown[0]!r}")
    else:
        variants = list(VARIANTS)
        variants[2:2] = list(extra)
    warmup, horizon, drain = 60.0, 60.0 + day, 120.0
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for v in variants:
            row = run_variant(
                v, seed, plan, forecast_only, extra, tps, startup_v, warmup, horizon, drain,
                args.slo,
            )
            runs.append(row)
            print(
                f"seed {seed} {v:17s} instance-h {row['instance_hours']:7.1f}  SLO "
                f"{100 * row['slo_attainment']:6.2f}%  p90 {row['ttft_p90']:.3f} s  "
                f"({row['wall_s']:.0f} s)",
                flush=True,
            )
    mm = plan["forecast"]["mape_mean"]  # type: ignore[index]
    meta = {
        "command": "kvmesh bench plan-diurnal " + " ".join(argv),
        "slo_ttft_s": args.slo,
        "tokens_per_s": tps,
        "startup_virtual_s": startup_v,
        "history_days": history.full_days,
        "mape_mean": mm,
        "plan_reservation": plan["reservation"],
        "plan_targets": plan["targets"],
        "forecast_only_targets": forecast_only["targets"],
        "extra_reservations": {k: _counts(v) for k, v in extra.items()},
    }
    finish(out, meta, runs, plots=not args.no_plots)
    return 0


def merge(dirs: Sequence[str], out: Path, command: str, plots: bool) -> int:
    """Combine the runs of several output folders (e.g. one seed each, run side by side)."""
    docs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    runs = [r for d in docs for r in d["runs"]]
    meta = {k: v for k, v in docs[0].items() if k not in ("summary", "claims", "runs", "seeds")}
    meta["command"] = command + "  # merging: " + "; ".join(d["command"] for d in docs)
    finish(out, meta, runs, plots)
    return 0


def finish(out: Path, meta: Mapping[str, Any], runs: list[dict[str, Any]], plots: bool) -> None:
    summary = summarize(runs)
    claims = []
    if "region-local" in summary and "global-reserved" in summary:
        a, b = summary["global-reserved"], summary["region-local"]
        claims.append(
            f"global reservation: {_less(a['instance_hours'], b['instance_hours']):.1f}% fewer "
            f"reserved instance-hours than region-local peak reservations (target >= 20%); SLO "
            f"attainment {100 * a['slo_attainment']:.2f}% vs {100 * b['slo_attainment']:.2f}%."
        )
    if "region-local" in summary:
        ref = summary["region-local"]
        equal = [
            (x["instance_hours"], v)
            for v, x in summary.items()
            if v.startswith("global-reserved")
            and x["slo_attainment"] >= ref["slo_attainment"] - 0.005
        ]
        if equal:
            h, v = min(equal)
            claims.append(
                f"smallest global reservation within 0.5 points of region-local's SLO attainment: "
                f"{v}, {_less(h, ref['instance_hours']):.1f}% fewer reserved instance-hours "
                f"(SLO {100 * summary[v]['slo_attainment']:.2f}% vs "
                f"{100 * ref['slo_attainment']:.2f}%)."
            )
        else:
            claims.append("no global reservation tried reached region-local's SLO attainment.")
    for v in ("plan+hourly", "forecast-scaling"):
        if v in summary and "reactive" in summary:
            a, b = summary[v], summary["reactive"]
            claims.append(
                f"{v}: {_less(a['instance_hours'], b['instance_hours']):.1f}% fewer instance-hours "
                f"than reactive-only (target >= 15%); cost {_less(a['cost'], b['cost']):.1f}% "
                f"lower; SLO attainment {100 * a['slo_attainment']:.2f}% vs "
                f"{100 * b['slo_attainment']:.2f}%."
            )
    mm = meta["mape_mean"]
    claims.append(
        "forecast MAPE on the held-back day: "
        + ", ".join(f"{k} {v:.2f}%" for k, v in sorted(mm.items()))
    )
    doc = {
        **meta,
        "seeds": sorted({int(r["seed"]) for r in runs}),
        "summary": summary,
        "claims": claims,
        "runs": runs,
    }
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=float) + "\n")
    md = markdown(doc)
    if plots:
        pic = plot_timeline(runs, out)
        if pic is not None:
            md += f"\n![billed engines]({pic.name})\n"
    (out / "results.md").write_text(md)
    print(md)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")
