"""Per-scenario records of a chaos run, and the reliability page written from them.

Each scenario fills one :class:`ScenarioRecord` (faults, requests, losses, convergence and
its bound, health figures); the session-finish hook in ``conftest.py`` renders the records
of the session, with the command that produced them, into ``results/chaos/reliability.md``
(ignored by git: a test run never rewrites a tracked file). ``python
tests/chaos/chaos_record.py publish`` copies the latest one to ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

RECORDS: list[ScenarioRecord] = []
"""Records of this session, in the order the scenarios ran."""

KEEP_MARKER = "<!-- written by hand below this line; the chaos suite keeps it -->"
DOC_ENV = "KVMESH_RELIABILITY_DOC"
"""Where a run's page goes (default ``results/chaos/reliability.md``)."""
RESULT = Path("results") / "chaos" / "reliability.md"
PAGE = Path("docs") / "reliability.md"
ROOT = Path(__file__).resolve().parents[2]


@dataclass(slots=True)
class ScenarioRecord:
    scenario: str
    faults: str = ""
    sent: int = 0
    lost: int = 0
    retried: int = 0
    convergence_s: float | None = None
    bound_s: float | None = None
    peak_mib: float | None = None
    """The highest container memory high-water mark (cgroup ``max_usage``) in the scenario."""
    crash_restarts: int = 0
    result: str = "not finished"
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        self.notes.append(text)


def _fmt_s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def render(
    records: list[ScenarioRecord], command: str, wall_s: float, root: Path, setup: str
) -> str:
    rev = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Reliability: chaos scenarios and their latest results",
        "",
        "Written by the chaos suite (`tests/chaos/`) into `results/chaos/reliability.md` at the",
        "end of every run that includes it, and copied here by",
        "`python tests/chaos/chaos_record.py publish`; do not edit by hand above the marker line.",
        "`bash deploy/test.sh` runs the suite together with every other test; abuse and fuzzing",
        "results follow the chaos table.",
        "",
        *textwrap.wrap(setup, 92, break_on_hyphens=False, break_long_words=False),
        "",
        "**Checks in every scenario.** Requests lost where a healthy path existed: 0;",
        "convergence (failure declared, or every router's view equal to the engines' own",
        "caches) within the scenario's bound; no crash loops (every container meant to run is",
        "running, restart count 0); memory bounded (every container's resident memory under its",
        "role's bound, 100-200 MiB, and its cgroup high-water mark under 256 MiB; the table shows",
        "the highest mark).",
        "",
        f"**Latest run:** {now}, commit `{rev}`, {wall_s:.0f} s wall time for the chaos suite.",
        "",
        "```",
        command,
        "```",
        "",
        "| scenario | faults injected | requests sent | lost | retried | convergence | bound"
        " | peak memory | crash restarts | result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        rss = "—" if r.peak_mib is None else f"{r.peak_mib:.0f} MiB"
        lines.append(
            f"| {r.scenario} | {r.faults} | {r.sent} | {r.lost} | {r.retried} "
            f"| {_fmt_s(r.convergence_s)} | {_fmt_s(r.bound_s)} | {rss} "
            f"| {r.crash_restarts} | {r.result} |"
        )
    notes = [(r.scenario, n) for r in records for n in r.notes]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- **{scenario}**: {text}" for scenario, text in notes]
    return "\n".join(lines) + "\n"


def write(
    records: list[ScenarioRecord], command: str, wall_s: float, root: Path, setup: str
) -> Path:
    target = Path(os.environ.get(DOC_ENV) or root / RESULT)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(records, command, wall_s, root, setup))
    return target


def publish(root: Path = ROOT) -> Path:
    """Copy the latest run's page (``results/chaos/reliability.md``) to ``docs/``."""
    src = root / RESULT
    if not src.is_file():
        raise SystemExit(f"no chaos results at {src}: run the chaos suite first")
    page = root / PAGE
    kept = ""
    if page.exists():  # the hand-written part below the marker survives every publish
        old = page.read_text()
        if KEEP_MARKER in old:
            kept = "\n" + KEEP_MARKER + old.split(KEEP_MARKER, 1)[1]
    page.write_text(src.read_text() + kept)
    return page


if __name__ == "__main__":
    if sys.argv[1:] != ["publish"]:
        raise SystemExit("usage: python tests/chaos/chaos_record.py publish")
    print(f"updated {publish()}")
