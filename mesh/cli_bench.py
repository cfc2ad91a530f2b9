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
    module, _ = BENCHES[args.name]
    bench_main: Callable[[list[str]], int] = importlib.import_module(module).main
    return bench_main(list(args.args))
