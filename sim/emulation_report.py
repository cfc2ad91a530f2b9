"""How far an emulated run is from its simulation, and the files that say so.

Three measures per variant (``VariantComparison``):

- the figures (``differences``): relative differences of TTFT and end-to-end percentiles and
  throughput, percentage points of prefix hit rate and cross-region share;
- where time goes (``decomposition``): mean TTFT at the client, inside the engines (their own
  model clocks) and outside them (routers, network, proxies, the processes themselves), so a
  gap can be placed in the engines' queues or around them;
- request by request (``paired``): workloads are seeded per client, so request ``rid`` is the
  same turn of the same conversation (or the same trace line) on both sides; the ratio of its
  two TTFTs and whether both sides sent it to the same replica.

``EmulationReport.agreement`` adds whether both sides order the variants the same.
``write_emulation_report`` writes ``results.json``, ``results.md``, one
``requests-<variant>.jsonl`` per variant (every emulated request) and the TTFT plots.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sim.metrics import RequestRecord, Summary, percentile
from sim.report import RunResult, ScenarioReport, markdown_table, to_json, write_plots

if TYPE_CHECKING:
    from sim.emulation import EmulatedRun, EmulatedVariant, Scaled, SimulatedRun

RELATIVE = (
    "ttft_p50",
    "ttft_p90",
    "ttft_p99",
    "ttft_mean",
    "e2e_p50",
    "e2e_p90",
    "throughput_rps",
    "output_tok_s",
)
ABSOLUTE = ("hit_rate", "cross_region_share")


def _rel(a: float, b: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return round(a / b - 1.0, 4)


def _round(x: float, digits: int = 4) -> float | None:
    return round(x, digits) if math.isfinite(x) else None


def differences(emu: Summary, sim: Summary) -> dict[str, float | None]:
    """Emulation against simulation: relative for times and rates (+0.10 = emulation 10%
    higher), absolute for shares (+0.02 = two points higher)."""
    out: dict[str, float | None] = {}
    for k in RELATIVE:
        out[k] = _rel(getattr(emu, k), getattr(sim, k))
    for k in ABSOLUTE:
        a, b = getattr(emu, k), getattr(sim, k)
        out[k] = _round(a - b)
    fe = emu.router_forwards / emu.sent if emu.sent else math.nan
    fs = sim.router_forwards / sim.sent if sim.sent else math.nan
    out["forwarded_share"] = _round(fe - fs)
    return out


def paired(
    emu: Sequence[RequestRecord], sim: Sequence[RequestRecord], warmup: float, horizon: float
) -> dict[str, float | int | None]:
    """The same requests on both sides (by ``rid``, sent in the window on the emulated side,
    answered on both): TTFT ratio percentiles and how often both picked the same replica."""
    by_rid = {r.rid: r for r in sim}
    ratios: list[float] = []
    same_replica = same_region = 0
    for e in emu:
        s = by_rid.get(e.rid)
        if s is None or not warmup <= e.sent < horizon:
            continue
        if not (math.isfinite(e.ttft) and math.isfinite(s.ttft)) or s.ttft <= 0:
            continue
        ratios.append(e.ttft / s.ttft)
        same_replica += e.replica == s.replica
        same_region += e.replica_region == s.replica_region
    n = len(ratios)
    return {
        "requests": n,
        "ttft_ratio_p10": _round(percentile(ratios, 10)),
        "ttft_ratio_p50": _round(percentile(ratios, 50)),
        "ttft_ratio_p90": _round(percentile(ratios, 90)),
        "same_replica": _round(same_replica / n) if n else None,
        "same_region": _round(same_region / n) if n else None,
    }


def mean_ttft(records: Sequence[RequestRecord]) -> float:
    """Mean TTFT of every answered request (the whole run, as the engines' means are)."""
    xs = [r.ttft for r in records if math.isfinite(r.ttft)]
    return statistics.fmean(xs) if xs else math.nan


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Rank agreement of two orderings of the same variants (1: same order, -1: reversed)."""
    num = pairs = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            s = (a[i] - a[j]) * (b[i] - b[j])
            pairs += 1
            num += 1 if s > 0 else -1 if s < 0 else 0
    return num / pairs if pairs else math.nan


@dataclass(slots=True)
class VariantComparison:
    variant: EmulatedVariant
    emulated: EmulatedRun
    simulated: SimulatedRun
    reference: SimulatedRun | None
    """The scenario's own variant on the same scaled fleet (when it differs)."""
    warmup_s: float
    horizon_s: float

    @property
    def diff(self) -> dict[str, float | None]:
        return differences(self.emulated.run.summary, self.simulated.run.summary)

    def paired(self) -> dict[str, float | int | None]:
        emu = [o.record for o in self.emulated.observations]
        return paired(emu, self.simulated.records, self.warmup_s, self.horizon_s)

    def decomposition(self) -> dict[str, float | None]:
        """Mean TTFT at the client, inside the engines and the rest, both sides (seconds)."""
        emu_client = mean_ttft([o.record for o in self.emulated.observations])
        sim_client = mean_ttft(self.simulated.records)
        emu_engine = self.emulated.engine_ttft_mean
        sim_engine = self.simulated.engine_ttft_mean
        return {
            "emulated_client": _round(emu_client),
            "simulated_client": _round(sim_client),
            "emulated_engine": _round(emu_engine),
            "simulated_engine": _round(sim_engine),
            "emulated_outside": _round(emu_client - emu_engine),
            "simulated_outside": _round(sim_client - sim_engine),
        }


def _key(x: float) -> float:
    return x if math.isfinite(x) else 1e18


@dataclass(slots=True)
class EmulationReport:
    scaled: Scaled
    command: str
    rows: list[VariantComparison]
    wall_s: float
    load_average: tuple[float, float, float]

    def agreement(self) -> Agreement:
        rows = self.rows
        d50 = sorted(abs(d) for r in rows if (d := r.diff["ttft_p50"]) is not None)
        d90 = sorted(abs(d) for r in rows if (d := r.diff["ttft_p90"]) is not None)
        e = [_key(r.emulated.run.summary.ttft_p90) for r in rows]
        s = [_key(r.simulated.run.summary.ttft_p90) for r in rows]
        labels = [r.variant.label for r in rows]
        return Agreement(
            median_abs_ttft_p50=round(statistics.median(d50), 4) if d50 else None,
            median_abs_ttft_p90=round(statistics.median(d90), 4) if d90 else None,
            max_abs_ttft_p90=round(d90[-1], 4) if d90 else None,
            kendall_tau_ttft_p90=_round(kendall_tau(e, s), 3),
            order_emulated=[x for _, x in sorted(zip(e, labels, strict=True))],
            order_simulated=[x for _, x in sorted(zip(s, labels, strict=True))],
        )


@dataclass(frozen=True, slots=True)
class Agreement:
    """Over the variants: typical and worst |difference|, and whether both sides rank the
    variants alike by TTFT p90 (Kendall tau; None with fewer than two variants)."""

    median_abs_ttft_p50: float | None
    median_abs_ttft_p90: float | None
    max_abs_ttft_p90: float | None
    kendall_tau_ttft_p90: float | None
    order_emulated: list[str]
    order_simulated: list[str]


# -- markdown ----------------------------------------------------------------------------------


def _s(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.3f}"


def _d(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f}%"


def _pp(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f} pp"


def _abs_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def side_by_side(rows: Sequence[VariantComparison]) -> str:
    """The figures, emulated / simulated (difference)."""
    head = (
        "| variant | layout | requests emu / sim | TTFT p50 (s) emu / sim | TTFT p90 (s) | "
        "TTFT p99 (s) | E2E p50 (s) | req/s | prefix hit | forwarded | failed |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        e, s, d = r.emulated.run.summary, r.simulated.run.summary, r.diff
        fe = e.router_forwards / e.sent if e.sent else math.nan
        fs = s.router_forwards / s.sent if s.sent else math.nan
        lines.append(
            f"| {r.variant.label} | {r.variant.layout} | {e.sent} / {s.sent} | "
            f"{_s(e.ttft_p50)} / {_s(s.ttft_p50)} ({_d(d['ttft_p50'])}) | "
            f"{_s(e.ttft_p90)} / {_s(s.ttft_p90)} ({_d(d['ttft_p90'])}) | "
            f"{_s(e.ttft_p99)} / {_s(s.ttft_p99)} ({_d(d['ttft_p99'])}) | "
            f"{_s(e.e2e_p50)} / {_s(s.e2e_p50)} ({_d(d['e2e_p50'])}) | "
            f"{e.throughput_rps:.2f} / {s.throughput_rps:.2f} ({_d(d['throughput_rps'])}) | "
            f"{_pct(e.hit_rate)} / {_pct(s.hit_rate)} ({_pp(d['hit_rate'])}) | "
            f"{_pct(fe)} / {_pct(fs)} | {r.emulated.failed} |"
        )
    return head + "\n".join(lines) + "\n"


def where_time_goes(rows: Sequence[VariantComparison]) -> str:
    """Mean TTFT split at the engines, and the request-by-request comparison."""
    head = (
        "| variant | mean TTFT at client (s) emu / sim | inside engines | outside engines | "
        "paired requests | TTFT ratio emu/sim p10 / p50 / p90 | same replica | same region |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        t, p = r.decomposition(), r.paired()
        ratio = " / ".join(_s(p[k]) for k in ("ttft_ratio_p10", "ttft_ratio_p50", "ttft_ratio_p90"))
        lines.append(
            f"| {r.variant.label} | {_s(t['emulated_client'])} / {_s(t['simulated_client'])} | "
            f"{_s(t['emulated_engine'])} / {_s(t['simulated_engine'])} | "
            f"{_s(t['emulated_outside'])} / {_s(t['simulated_outside'])} | {p['requests']} | "
            f"{ratio} | {_pct(p['same_replica'])} | {_pct(p['same_region'])} |"
        )
    return head + "\n".join(lines) + "\n"


def to_markdown(report: EmulationReport, plots: Sequence[str]) -> str:
    sc = report.scaled.scenario
    agree = report.agreement()
    refs = [r.reference.run for r in report.rows if r.reference is not None]
    cores = "; ".join(
        f"{r.variant.label}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.emulated.cpu_cores.items())
        for r in report.rows
    )
    order = (
        f" Variants by TTFT p90, emulated: {', '.join(agree.order_emulated)}; simulated: "
        f"{', '.join(agree.order_simulated)} (Kendall tau {agree.kendall_tau_ttft_p90})."
        if agree.kendall_tau_ttft_p90 is not None
        else ""
    )
    lines = [
        f"# Emulation vs simulation: {sc.title}",
        "",
        sc.source,
        "",
        f"Command: `{report.command}`",
        "",
        f"Scaling: {report.scaled.plan.scaling()}",
        "",
        "Emulated: real `kvmesh sim-engine`, `kvmesh router` and `kvmesh netdelay` processes on "
        "127.0.0.1, every request measured at the client. Simulated: the discrete-event "
        "simulator on the same scaled fleet, workload, seed and windows, its routers on the "
        "mesh plane as the processes' are. Real seconds; in brackets the emulation's "
        "difference from the simulation (relative; percentage points for shares).",
        "",
        side_by_side(report.rows),
        f"Median |difference| over the variants: TTFT p50 "
        f"{_abs_pct(agree.median_abs_ttft_p50)}, TTFT p90 "
        f"{_abs_pct(agree.median_abs_ttft_p90)}.{order}",
        "",
        "Where the time goes (means over every answered request; inside engines: by the "
        "engines' own model clocks) and the same requests compared one by one:",
        "",
        where_time_goes(report.rows),
        f"CPU cores used by the emulation's processes ({os.cpu_count()} on this machine, load "
        f"average {report.load_average[0]:.1f} at the end, other work included): {cores}. "
        "Load generator p99 send lag: "
        + ", ".join(f"{r.variant.label} {1000 * r.emulated.lag_p99:.1f} ms" for r in report.rows)
        + ".",
        "",
        "## Emulated (measured at the client)",
        "",
        markdown_table([r.emulated.run for r in report.rows]),
        "## Simulated (same scaled scenario)",
        "",
        markdown_table([r.simulated.run for r in report.rows] + refs),
    ]
    if refs:
        lines += [
            "`[scenario]`: the scenario's own variant (probe plane, one router managing every "
            "engine, SkyLB's request-derived prefix tree) on the same scaled fleet; processes "
            "cannot run it, so it is shown for reference only.",
            "",
        ]
    lines += [f"Total wall time {report.wall_s:.0f} s.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# -- JSON and files ----------------------------------------------------------------------------


def _run_json(run: RunResult) -> dict[str, object]:
    runs = to_json(ScenarioReport("", "", "", "", [run]))["runs"]
    assert isinstance(runs, list)
    out: dict[str, object] = runs[0]
    return out


def report_json(report: EmulationReport) -> dict[str, object]:
    sc = report.scaled
    p = sc.plan
    topo = sc.topology
    return {
        "scenario": p.scenario,
        "title": sc.scenario.title,
        "command": report.command,
        "scaling": p.scaling(),
        "params": {
            "speedup": p.speedup,
            "network_scale": p.network_scale,
            "horizon_s": p.horizon_s,
            "warmup_s": p.warmup_s,
            "drain_s": p.drain_s,
            "load": p.load,
            "load_unit": p.load_unit,
            "seed": sc.seed,
            "replicas": sc.replicas,
            "profile": sc.scenario.profile.name,
            "rtt_ms": {
                f"{a}-{b}": [topo.rtt(a, b).lo_ms, topo.rtt(a, b).hi_ms]
                for i, a in enumerate(topo.regions)
                for b in topo.regions[i:]
            },
        },
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": report.load_average,
        },
        "wall_s": round(report.wall_s, 1),
        "agreement": asdict(report.agreement()),
        "variants": [
            {
                "label": r.variant.label,
                "policy": r.variant.policy,
                "layout": r.variant.layout,
                "note": r.variant.note,
                "difference": r.diff,
                "decomposition": r.decomposition(),
                "paired": r.paired(),
                "emulated": _run_json(r.emulated.run),
                "simulated": _run_json(r.simulated.run),
                "scenario_variant": _run_json(r.reference.run) if r.reference else None,
            }
            for r in report.rows
        ],
    }


def write_emulation_report(report: EmulationReport, out: Path, *, plots: bool = True) -> Path:
    """Everything under ``out`` (created); returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report_json(report), indent=2) + "\n")
    for r in report.rows:
        with open(out / f"requests-{r.variant.label}.jsonl", "w", encoding="utf-8") as fh:
            for obs in r.emulated.observations:
                fh.write(json.dumps(obs.to_dict(), separators=(",", ":")) + "\n")
    names: list[str] = []
    if plots:
        both = [
            replace(run, variant=f"{run.variant} ({side})")
            for r in report.rows
            for run, side in ((r.emulated.run, "emu"), (r.simulated.run, "sim"))
        ]
        name = f"emulate-{report.scaled.plan.scenario}"
        names = write_plots(ScenarioReport(name, "", "", "", both), out)
    md = out / "results.md"
    md.write_text(to_markdown(report, names))
    return md


__all__ = [
    "Agreement",
    "EmulationReport",
    "VariantComparison",
    "differences",
    "kendall_tau",
    "paired",
    "side_by_side",
    "where_time_goes",
    "write_emulation_report",
]
