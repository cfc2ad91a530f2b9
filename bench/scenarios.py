"""``kvmesh bench <scenario>``: run one evaluation scenario in the discrete-event simulator.

Every scenario runs each of its variants (policies, router layouts) on the same seeded
workload and writes ``results/<scenario>/{results.json,results.md,ttft_cdf.png,
throughput.png}``. The scenarios and their mapping to the papers are in ``sim/scenarios.py``
and ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from sim.report import ScenarioReport, markdown_table, write_report
from sim.scenarios import SCENARIOS, Progress, RunOptions, results_dir, run_scenario


def _parser(name: str) -> argparse.ArgumentParser:
    sc = SCENARIOS[name]
    p = argparse.ArgumentParser(prog=f"kvmesh bench {name}", description=sc.title)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--tie-stream", type=int, default=0, metavar="N",
        help="draw the routers' near-tie choices from another random stream (0: the default); "
             "the workload and network stay those of --seed",
    )
    p.add_argument(
        "--probe-interval", type=float, metavar="S",
        help="seconds between the routers' engine scrapes (and the probe plane's heartbeats; "
             f"default {sc.probe_interval_s:g})",
    )
    p.add_argument(
        "--regret", action="store_true",
        help="price every kvmesh decision again on the engines' live state (simulator-only "
             "analysis): what stale load records cost the decisions, in the cost model's "
             "seconds",
    )
    p.add_argument(
        "--horizon", type=float, help=f"virtual seconds of load (default {sc.horizon_s:g})"
    )
    p.add_argument("--warmup", type=float, help=f"seconds not measured (default {sc.warmup_s:g})")
    p.add_argument(
        "--drain", type=float, help=f"seconds to let requests finish (default {sc.drain_s:g})"
    )
    p.add_argument("--variants", default="", help="comma-separated variant labels to run")
    p.add_argument("--extra", action="store_true", help="also run the analysis variants")
    p.add_argument("--quick", action="store_true", help="a fifth of the horizon (smoke test)")
    p.add_argument("--out", help=f"output folder (default results/{name})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(name: str, argv: list[str]) -> int:
    args = _parser(name).parse_args(argv)
    opts = RunOptions(
        seed=args.seed,
        horizon_s=args.horizon,
        warmup_s=args.warmup,
        drain_s=args.drain,
        only=tuple(v for v in args.variants.split(",") if v),
        extra=args.extra,
        quick=args.quick,
        tie_stream=args.tie_stream,
        probe_interval_s=args.probe_interval,
        regret=args.regret,
    )
    command = shlex.join(["kvmesh", "bench", name, *argv])
    try:
        if args.no_progress or not sys.stdout.isatty():
            report = run_scenario(name, opts, command, _print_progress())
        else:
            report = _with_bars(name, opts, command)
    except ValueError as exc:
        print(f"kvmesh bench {name}: {exc}", file=sys.stderr)
        return 2
    out = results_dir(name, args.out)
    md = write_report(report, out, plots=not args.no_plots)
    print(markdown_table(report.runs))
    for line in report.notes:
        print(line)
    print(f"\nwrote {md} and {out / 'results.json'}")
    return 0


def _print_progress() -> Progress:
    last: dict[str, int] = {}

    def progress(variant: str, now: float, end: float) -> None:
        step = int(10 * now / end)
        if last.get(variant) != step:
            last[variant] = step
            print(f"  {variant}: {now:7.1f} / {end:.0f} virtual s", flush=True)

    return progress


def _with_bars(name: str, opts: RunOptions, command: str) -> ScenarioReport:
    from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    columns = (
        TextColumn("{task.description:24s}"),
        BarColumn(),
        TextColumn("{task.completed:7.1f}/{task.total:.0f} virtual s"),
        TimeElapsedColumn(),
    )
    with Bars(*columns) as bars:
        tasks: dict[str, TaskID] = {}

        def progress(variant: str, now: float, end: float) -> None:
            if variant not in tasks:
                tasks[variant] = bars.add_task(variant, total=end)
            bars.update(tasks[variant], completed=min(now, end))

        return run_scenario(name, opts, command, progress)


def skylb_arena_332(argv: list[str]) -> int:
    return run("skylb-arena-332", argv)


def skylb_arena_444(argv: list[str]) -> int:
    return run("skylb-arena-444", argv)


def skylb_wildchat_332(argv: list[str]) -> int:
    return run("skylb-wildchat-332", argv)


def skylb_wildchat_444(argv: list[str]) -> int:
    return run("skylb-wildchat-444", argv)


def skylb_tot(argv: list[str]) -> int:
    return run("skylb-tot", argv)


def skylb_mixed_tree(argv: list[str]) -> int:
    return run("skylb-mixed-tree", argv)


def gorgo(argv: list[str]) -> int:
    return run("gorgo", argv)


def intelligent_router(argv: list[str]) -> int:
    return run("intelligent-router", argv)


def intelligent_router_overload(argv: list[str]) -> int:
    return run("intelligent-router-overload", argv)


def diurnal_skew(argv: list[str]) -> int:
    return run("diurnal-skew", argv)


def diurnal_cycle(argv: list[str]) -> int:
    return run("diurnal-cycle", argv)


def scale(argv: list[str]) -> int:
    return run("scale", argv)


def sageserve_tiers(argv: list[str]) -> int:
    """``kvmesh bench sageserve-tiers``: the size sweeps of sim/tier_scenario.py."""
    from sim import tier_scenario as ts

    p = argparse.ArgumentParser(prog="kvmesh bench sageserve-tiers", description=ts.TITLE)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--horizon", type=float,
                   help=f"virtual seconds of load (default {ts.SETUP.horizon_s:g})")
    p.add_argument("--quick", action="store_true", help="a fifth of the horizon (smoke test)")
    p.add_argument("--variants", default="",
                   help="comma-separated: siloed, shared-fcfs, kvmesh-tiers (default all)")
    p.add_argument("--shared-sizes", default="",
                   help="replicas in all for the shared pools, e.g. 9,10,11")
    p.add_argument("--silo-interactive-sizes", default="", help="e.g. 7,8,9")
    p.add_argument("--silo-batch-sizes", default="", help="e.g. 2,3")
    p.add_argument("--out", help="output folder (default results/sageserve-tiers)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)

    def sizes(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    try:
        opts = ts.Options(seed=args.seed, quick=args.quick, horizon_s=args.horizon,
                          shared_sizes=sizes(args.shared_sizes),
                          silo_interactive_sizes=sizes(args.silo_interactive_sizes),
                          silo_batch_sizes=sizes(args.silo_batch_sizes),
                          only=tuple(v for v in args.variants.split(",") if v))
        unknown = set(opts.only) - {"siloed", "shared-fcfs", "kvmesh-tiers"}
        if unknown:
            raise ValueError(f"unknown variant {sorted(unknown)[0]!r}")
        command = shlex.join(["kvmesh", "bench", ts.NAME, *argv])
        report = ts.run(opts, command, progress=_print_progress())
    except ValueError as exc:
        print(f"kvmesh bench sageserve-tiers: {exc}", file=sys.stderr)
        return 2
    out = results_dir(ts.NAME, args.out)
    md = write_report(report, out, plots=not args.no_plots)
    tiers = ts.table(report.runs)
    md.write_text(md.read_text() + "\n## Service tiers\n\n" + tiers)
    print(tiers)
    for line in report.notes:
        print(line)
    print(f"\nwrote {md} and {out / 'results.json'}")
    return 0
