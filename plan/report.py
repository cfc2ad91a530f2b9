"""The plan as files: ``plan.json``, a readable ``report.md`` and two plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _capacity(plan: Mapping[str, Any], alloc: Mapping[str, Any], region: str) -> list[float]:
    """Tokens/s the allocation can serve in ``region`` per slot (every model)."""
    slots = int(plan["slots"])
    gpus = plan["spec"]["gpus"]
    u = float(plan["spec"]["max_utilization"])
    out = [0.0] * slots
    for m, by_gpu in alloc["reserved"].get(region, {}).items():
        for g, n in by_gpu.items():
            for t in range(slots):
                out[t] += n * gpus[g]["throughput"][m] * u
    for table in ("on_demand", "spot"):
        for m, by_gpu in alloc[table].get(region, {}).items():
            for g, ns in by_gpu.items():
                for t in range(slots):
                    out[t] += ns[t] * gpus[g]["throughput"][m] * u
    return out


def _demand(plan: Mapping[str, Any], kind: str, region: str) -> list[float]:
    slots = int(plan["slots"])
    out = [0.0] * slots
    for key, v in plan["forecast"][kind].items():
        if key.split("/", 1)[0] == region:
            out = [a + b for a, b in zip(out, v, strict=True)]
    return out


def plot(plan: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = sorted(plan["spec"]["regions"])
    slots = int(plan["slots"])
    hours = [24.0 * t / slots for t in range(slots)]
    n = len(regions)
    shown = regions[:6]
    fig, axes = plt.subplots(len(shown), 1, figsize=(7, 1.9 * len(shown) + 0.6), sharex=True)
    if len(shown) == 1:
        axes = [axes]
    for ax, r in zip(axes, shown, strict=True):
        ax.step(
            hours, _demand(plan, "slot_peak", r), where="post", label="forecast demand (slot peak)"
        )
        ax.step(
            hours, _capacity(plan, plan["stage2"], r), where="post", label="hourly plan capacity"
        )
        ax.step(
            hours, _capacity(plan, plan["reservation"]["global"], r), where="post",
            linestyle="--", label="global reservation",
        )
        ax.step(
            hours, _capacity(plan, plan["reservation"]["region_local"], r), where="post",
            linestyle=":", label="region-local reservation",
        )
        ax.set_ylabel(f"{r}\ntokens/s")
    axes[0].legend(fontsize=7, loc="upper left")
    more = f"; first {len(shown)} of {n} regions" if n > len(shown) else ""
    axes[-1].set_xlabel("hour of the planned day (UTC)" + more)
    fig.tight_layout()
    p1 = out / "demand_capacity.png"
    fig.savefig(p1, dpi=80)
    plt.close(fig)

    cases = [
        ("region-local\nreserved", plan["reservation"]["region_local"]),
        ("global\nreserved", plan["reservation"]["global"]),
        ("reserved +\nhourly", plan["stage2"]),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bottom = [0.0] * len(cases)
    for part in ("reserved", "on_demand", "spot", "startup"):
        vals = [float(c["cost"].get(part, 0.0)) for _, c in cases]
        ax.bar([c for c, _ in cases], vals, bottom=bottom, label=part)
        bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
    ax.set_ylabel("$ per planned day")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p2 = out / "cost.png"
    fig.savefig(p2, dpi=80)
    plt.close(fig)
    return [p1, p2]


def markdown(plan: Mapping[str, Any]) -> str:
    res = plan["reservation"]
    g, loc, s2 = res["global"], res["region_local"], plan["stage2"]
    lines = [
        "# Capacity plan",
        "",
        f"History: {plan['history']['days']} days of {', '.join(plan['history']['series'])}; "
        f"forecast: {plan['forecast']['method']} at {plan['forecast']['step_s']:g} s steps; "
        f"{plan['slots']} slots of {plan['slot_s']:g} s.",
        "",
        "| plan | instance-hours | cost $ | reserved | on-demand | spot | start-up | solve s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in (("region-local reservation", loc), ("global reservation", g),
                    ("reserved + hourly (stage 2)", s2)):
        c = a["cost"]
        lines.append(
            f"| {name} | {a['total_instance_hours']:.1f} | {a['total_cost']:.2f} | "
            f"{c['reserved']:.2f} | {c['on_demand']:.2f} | {c['spot']:.2f} | {c['startup']:.2f} | "
            f"{a['solve_s']:.3f} |"
        )
    lines += [
        "",
        f"Global reservation vs region-local: {res['instance_hours_saving_pct']:.1f}% fewer "
        f"reserved instance-hours, {res['cost_saving_pct']:.1f}% lower cost.",
        "",
        "## Reserved instances",
        "",
        "| region | model | region-local | global | stage 1 (with on-demand) |",
        "|---|---|---:|---:|---:|",
    ]

    def count(a: Mapping[str, Any], r: str, m: str) -> int:
        return int(sum(a["reserved"].get(r, {}).get(m, {}).values()))

    for key in plan["history"]["series"]:
        r, m = key.split("/", 1)
        lines.append(
            f"| {r} | {m} | {count(loc, r, m)} | {count(g, r, m)} | {count(plan['stage1'], r, m)} |"
        )
    lines += ["", "## Forecast error on held-back days (MAPE %)", ""]
    mean = plan["forecast"]["mape_mean"]
    if mean:
        lines.append("| series | " + " | ".join(sorted(mean)) + " |")
        lines.append("|---|" + "---:|" * len(mean))
        for key, by in sorted(plan["forecast"]["mape"].items()):
            cells = []
            for m in sorted(mean):
                vals = [v for v in by.get(m, []) if not math.isnan(v)]
                cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(f"{mean[m]:.2f}" for m in sorted(mean)) + " |")
    else:
        lines.append("Not enough days to hold one back (needs 4: three to forecast from).")
    lines += ["", "## Hourly targets (replicas per slot)", ""]
    for r, by_model in sorted(plan["targets"].items()):
        for m, v in sorted(by_model.items()):
            lines.append(f"- {r}/{m}: {' '.join(str(x) for x in v)}")
    lines += ["", f"Total solve time: {plan['solve_s']:.3f} s.", ""]
    return "\n".join(lines)


def write_plan(plan: Mapping[str, Any], out: Path, plots: bool = True) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1, default=float) + "\n")
    md = markdown(plan)
    if plots:
        pics = plot(plan, out)
        md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pics) + "\n"
    path = out / "report.md"
    path.write_text(md)
    return path
