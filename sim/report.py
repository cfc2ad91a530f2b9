"""Write a scenario's results: JSON (everything), a markdown table, and plots.

``results/<scenario>/`` gets ``results.json``, ``results.md``, ``ttft_cdf.png`` and
``throughput.png``. Plots need matplotlib (the ``plots`` extra); without it the JSON and
markdown are still written and the markdown says the plots were skipped.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sim.metrics import Summary, cdf_points


@dataclass(slots=True)
class RunResult:
    """One variant (policy, layout) of a scenario, run once."""

    variant: str
    summary: Summary
    ttfts: list[float]
    wall_s: float
    events: int
    config: dict[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class ScenarioReport:
    scenario: str
    title: str
    command: str
    description: str
    runs: list[RunResult]
    params: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _fmt_s(x: float) -> str:
    if math.isnan(x):
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.3f}"


def _fmt_pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def markdown_table(runs: Sequence[RunResult]) -> str:
    head = (
        "| variant | req/s | out tok/s | TTFT p50 (s) | TTFT p90 (s) | TTFT p99 (s) | "
        "E2E p50 (s) | E2E p90 (s) | prefix hit | cross-region | fwd | gossip KB/s | "
        "stale p90 (s) | unfinished | TTFT pred. error local / fwd |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for run in runs:
        s = run.summary
        rows.append(
            f"| {run.variant} | {s.throughput_rps:.2f} | {s.output_tok_s:.0f} | "
            f"{_fmt_s(s.ttft_p50)} | {_fmt_s(s.ttft_p90)} | {_fmt_s(s.ttft_p99)} | "
            f"{_fmt_s(s.e2e_p50)} | {_fmt_s(s.e2e_p90)} | {_fmt_pct(s.hit_rate)} | "
            f"{_fmt_pct(s.cross_region_share)} | {s.router_forwards} | "
            f"{s.gossip_bytes_per_s / 1024:.1f} | {_fmt_s(s.staleness_p90)} | {s.unfinished} | "
            f"{_fmt_pct(s.ttft_error_local)} / {_fmt_pct(s.ttft_error_forwarded)} |"
        )
    return head + "\n".join(rows) + "\n"


def to_markdown(report: ScenarioReport, plots: Sequence[str]) -> str:
    lines = [
        f"# {report.title}",
        "",
        report.description,
        "",
        f"Command: `{report.command}`",
        "",
        markdown_table(report.runs),
    ]
    if report.notes:
        lines += [*report.notes, ""]
    lines.append(
        "Wall time per run (s): "
        + ", ".join(f"{r.variant} {r.wall_s:.1f} ({r.events:,} events)" for r in report.runs)
    )
    lines.append("")
    for p in plots:
        lines.append(f"![{p}]({p})")
    if not plots:
        lines.append("(plots skipped: matplotlib is not installed)")
    return "\n".join(lines) + "\n"


def to_json(report: ScenarioReport) -> dict[str, object]:
    return {
        "scenario": report.scenario,
        "title": report.title,
        "command": report.command,
        "description": report.description,
        "params": report.params,
        "notes": report.notes,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "runs": [
            {
                "variant": r.variant,
                "wall_s": round(r.wall_s, 3),
                "events": r.events,
                "config": r.config,
                "summary": r.summary.to_dict(),
            }
            for r in report.runs
        ],
    }


def write_plots(report: ScenarioReport, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in report.runs:
        xs, ys = cdf_points(run.ttfts)
        if xs:
            ax.step(xs, ys, where="post", label=run.variant)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{report.scenario}: TTFT CDF")
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)
    plt.close(fig)
    names.append("ttft_cdf.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    labels = [r.variant for r in report.runs]
    ax1.bar(labels, [r.summary.throughput_rps for r in report.runs], color="tab:blue")
    ax1.set_ylabel("requests/s")
    ax1.set_title("throughput")
    p90 = [r.summary.ttft_p90 for r in report.runs]
    finite = [x for x in p90 if math.isfinite(x)]
    cap = max(finite) * 1.2 if finite else 1.0
    ax2.bar(labels, [x if math.isfinite(x) else cap for x in p90], color="tab:orange")
    ax2.set_ylabel("seconds")
    ax2.set_title("TTFT p90")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)
    names.append("throughput.png")
    return names


def write_report(report: ScenarioReport, out: Path, *, plots: bool = True) -> Path:
    """Write everything under ``out`` (created); returns the markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(to_json(report), indent=2) + "\n")
    names = write_plots(report, out) if plots else []
    md = out / "results.md"
    md.write_text(to_markdown(report, names))
    return md
