"""``kvmesh bench paired BASE [NEW]``: two sets of scenario runs compared run by run.

A change to the routing decision or to what the routers see re-routes a whole simulated
run (a few gossip bytes are enough), so one run per seed says little: the p90 of one run
moves several points with the routers' tie-break stream alone. A change is judged instead
on many paths (seeds x ``--tie-stream``), each run of the change against the same seed and
stream of the base. This reads the ``results.json`` files under BASE and NEW, pairs them by
their path below each directory, and prints, per run and over all of them (mean and its
standard error):

- the target's p90 TTFT gap to the reference (the oracle) in each set, and how many runs
  are within the 5% target;
- the gap's paired difference, NEW less BASE, in points;
- the target's and the reference's own p90, NEW against BASE: a gap that narrows because
  the reference got worse is not a better router.

Without NEW, the one set's runs compare two of their variants (``--new-target``, e.g. a
named diagnostic variant, against ``--target``). Nothing is run; the runs are made with
``kvmesh bench <scenario> --seed S --tie-stream T --out DIR/...``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TARGET_GAP = 0.05


@dataclass(frozen=True, slots=True)
class Pair:
    run: str
    """The run's directory below BASE (and NEW)."""
    base: tuple[float, float]
    """(target, reference) of BASE."""
    new: tuple[float, float]

    @property
    def base_gap(self) -> float:
        return self.base[0] / self.base[1] - 1.0

    @property
    def new_gap(self) -> float:
        return self.new[0] / self.new[1] - 1.0


@dataclass(frozen=True, slots=True)
class Summary:
    runs: int
    base_gap: tuple[float, float]
    """(mean, standard error) over the runs."""
    new_gap: tuple[float, float]
    base_within: int
    new_within: int
    paired_gap: tuple[float, float]
    target_change: tuple[float, float]
    """NEW's target p90 over BASE's, less 1."""
    reference_change: tuple[float, float]
    target_lower: int
    target_higher: int


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    m = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
    return m, se


def summarize(pairs: Sequence[Pair]) -> Summary:
    if not pairs:
        raise ValueError("no runs to compare")
    return Summary(
        len(pairs),
        mean_se([p.base_gap for p in pairs]),
        mean_se([p.new_gap for p in pairs]),
        sum(p.base_gap <= TARGET_GAP for p in pairs),
        sum(p.new_gap <= TARGET_GAP for p in pairs),
        mean_se([p.new_gap - p.base_gap for p in pairs]),
        mean_se([p.new[0] / p.base[0] - 1.0 for p in pairs]),
        mean_se([p.new[1] / p.base[1] - 1.0 for p in pairs]),
        sum(p.new[0] < p.base[0] for p in pairs),
        sum(p.new[0] > p.base[0] for p in pairs),
    )


def read_run(path: Path, metric: str) -> dict[str, float]:
    """variant -> ``metric`` of its summary, from one ``results.json``."""
    try:
        doc = json.loads(path.read_text())
        runs = doc["runs"]
        out = {}
        for r in runs:
            value = r["summary"][metric]
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise TypeError(f"{metric} is {value!r}")
            out[str(r["variant"])] = float(value)
        return out
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a scenario result ({exc})") from None


def _results(root: Path) -> Iterator[Path]:
    return iter(sorted(root.rglob("results.json")))


def pairs_of(base: Path, new: Path | None, metric: str, target: str, reference: str,
             new_target: str, new_reference: str) -> tuple[list[Pair], list[str]]:
    """The runs of BASE with a run at the same path under NEW (or the same run without
    NEW), and notes on the runs left out (missing in NEW, or without the variants)."""
    pairs: list[Pair] = []
    notes: list[str] = []
    for path in _results(base):
        run = str(path.parent.relative_to(base))
        other = path if new is None else new / run / "results.json"
        if not other.exists():
            notes.append(f"{run}: no run under NEW")
            continue
        a, b = read_run(path, metric), read_run(other, metric)
        missing = [f"{where} {v}" for where, got, names in
                   (("BASE", a, (target, reference)), ("NEW", b, (new_target, new_reference)))
                   for v in names if v not in got]
        if missing:
            notes.append(f"{run}: no variant {', '.join(missing)}")
            continue
        if min(a[target], a[reference], b[new_target], b[new_reference]) <= 0.0:
            notes.append(f"{run}: a {metric} of 0")
            continue
        pairs.append(Pair(run, (a[target], a[reference]), (b[new_target], b[new_reference])))
    return pairs, notes


def _pct(ms: tuple[float, float]) -> str:
    return f"{ms[0] * 100:+.2f}% ± {ms[1] * 100:.2f}"


def render(pairs: Sequence[Pair], s: Summary, labels: Mapping[str, str]) -> str:
    t, r, nt, nr = labels["target"], labels["reference"], labels["new_target"], \
        labels["new_reference"]
    lines = [f"| run | BASE {t} / {r} | gap | NEW {nt} / {nr} | gap | {nt} vs {t} |",
             "|---|---:|---:|---:|---:|---:|"]
    for p in pairs:
        lines.append(f"| {p.run} | {p.base[0]:.3f} / {p.base[1]:.3f} | {p.base_gap * 100:+.1f}%"
                     f" | {p.new[0]:.3f} / {p.new[1]:.3f} | {p.new_gap * 100:+.1f}% | "
                     f"{(p.new[0] / p.base[0] - 1) * 100:+.1f}% |")
    lines += [
        "",
        f"{s.runs} runs; mean ± its standard error.",
        "",
        "| | BASE | NEW |",
        "|---|---:|---:|",
        f"| gap to the reference | {_pct(s.base_gap)} | {_pct(s.new_gap)} |",
        f"| within {TARGET_GAP:.0%} | {s.base_within} / {s.runs} | {s.new_within} / {s.runs} |",
        f"| gap, paired (NEW - BASE, points) | - | {_pct(s.paired_gap)} |",
        f"| target, paired (NEW / BASE - 1) | - | {_pct(s.target_change)} (lower in "
        f"{s.target_lower}, higher in {s.target_higher}) |",
        f"| reference, paired (NEW / BASE - 1) | - | {_pct(s.reference_change)} |",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench paired", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="directory with the base runs' results.json")
    ap.add_argument("new", type=Path, nargs="?",
                    help="directory with the changed runs, at the same paths (default: BASE)")
    ap.add_argument("--metric", default="ttft_p90", help="summary field (ttft_p90)")
    ap.add_argument("--target", default="kvmesh", help="variant judged (kvmesh)")
    ap.add_argument("--reference", default="oracle", help="variant judged against (oracle)")
    ap.add_argument("--new-target", help="NEW's target variant (default: --target)")
    ap.add_argument("--new-reference", help="NEW's reference variant (default: --reference)")
    args = ap.parse_args(argv)
    new_target = args.new_target or args.target
    new_reference = args.new_reference or args.reference
    if args.new is None and (new_target, new_reference) == (args.target, args.reference):
        ap.error("one set of runs: name another variant with --new-target or --new-reference")
    for d in (args.base, args.new):
        if d is not None and not d.is_dir():
            ap.error(f"{d}: not a directory")
    try:
        pairs, notes = pairs_of(args.base, args.new, args.metric, args.target,
                                args.reference, new_target, new_reference)
        summary = summarize(pairs)
    except ValueError as exc:
        print(f"kvmesh bench paired: {exc}")
        return 1
    print(render(pairs, summary, {"target": args.target, "reference": args.reference,
                                  "new_target": new_target, "new_reference": new_reference}))
    for note in notes:
        print(f"- left out: {note}")
    return 0
