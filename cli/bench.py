"""``kvmesh bench NAME [ARGS...]`` and ``kvmesh bench --list``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from bench.registry import BENCHES


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the benchmarks and scenarios")
    parser.add_argument("name", nargs="?", help="benchmark or scenario name (see --list)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name, (_, help_text) in sorted(BENCHES.items()):
            print(f"{name:28s} {help_text}")
        return 0
    if args.name not in BENCHES:
        print(f"kvmesh bench: unknown benchmark {args.name!r}; see 'kvmesh bench --list'")
        return 2
    # "package.module" runs its main(argv); "package.module:func" runs func(argv), so one
    # module can hold several entry points (the evaluation scenarios).
    module, _ = BENCHES[args.name]
    module, _, func = module.partition(":")
    loaded = importlib.import_module(module)
    bench_main: Callable[[list[str]], int] = getattr(loaded, func or "main")
    return bench_main(list(args.args))
