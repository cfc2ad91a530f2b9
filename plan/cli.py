"""``kvmesh plan``: demand history + a spec file -> plan.json, report.md and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from plan.spec import PlanInputError


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("demand", help="demand history: .csv, a trace .jsonl, or a .prom dump")
    parser.add_argument("--spec", required=True, help="GPU types, regions, prices (YAML/JSON)")
    parser.add_argument("--format", choices=("csv", "trace", "prom"), help="default: by suffix")
    parser.add_argument("--step", type=float, default=60.0, help="CSV row step, s (default 60)")
    parser.add_argument("--day", type=float, default=86400.0, help="length of a day, s")
    parser.add_argument("--regions", default="", help="trace input: comma-separated regions")
    parser.add_argument("--model", default="", help="trace input: the model it was served by")
    parser.add_argument("--method", default="holt-winters",
                        choices=("holt-winters", "seasonal-arima", "last-day"))
    parser.add_argument("--slots", type=int, default=24, help="planning slots per day")
    parser.add_argument("--held-back", type=int, default=1, help="days held back for MAPE")
    parser.add_argument("--margin", type=float, default=0.0, help="extra share of demand")
    parser.add_argument("--out", default="results/plan", help="output folder")
    parser.add_argument("--no-plots", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from plan.inputs import read_samples, read_spec
        from plan.planner import PlanOptions, make_plan
        from plan.report import write_plan
        from plan.series import DemandHistory
    except ImportError as exc:
        print(
            f"kvmesh plan: {exc.name or exc} is missing; install the planning extra: "
            "pip install 'kvmesh[plan]'",
            file=sys.stderr,
        )
        return 2

    try:
        spec = read_spec(args.spec)
        samples = read_samples(
            args.demand,
            args.format,
            step_s=args.step,
            regions=[r for r in args.regions.split(",") if r],
            model=args.model,
        )
        step = args.day / 1440.0 if args.format == "trace" or args.demand.endswith(".jsonl") \
            else args.step
        history = DemandHistory.from_samples(samples, step_s=step, day_s=args.day)
        plan = make_plan(
            spec,
            history,
            PlanOptions(
                slots=args.slots,
                method=args.method,
                held_back_days=args.held_back,
                margin=args.margin,
            ),
        )
    except (PlanInputError, OSError) as exc:
        print(f"kvmesh plan: {exc}", file=sys.stderr)
        return 2
    md = write_plan(plan, Path(args.out), plots=not args.no_plots)
    res = plan["reservation"]
    assert isinstance(res, dict)
    print(md.read_text().split("## Reserved instances")[0].rstrip())
    print(f"\nwrote {md} and {Path(args.out) / 'plan.json'}")
    return 0
