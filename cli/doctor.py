"""``kvmesh doctor --config FILE``: a router configuration checked against the live engines
(``mesh.doctor``); prints every finding, each problem with its fix; exit 1 on a problem."""

from __future__ import annotations

import argparse
import asyncio
import sys

from mesh.config import ConfigError, load
from mesh.doctor import PROBLEM, WARN, run


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="router configuration (YAML)")
    parser.add_argument("--no-probe", action="store_true",
                        help="do not send the small probe completion to each engine")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        config = load(args.config)
    except (ConfigError, OSError) as exc:
        print(f"kvmesh doctor: {exc}", file=sys.stderr)
        return 2
    findings = asyncio.run(run(config, probe=not args.no_probe))
    problems = sum(1 for f in findings if f.level == PROBLEM)
    warnings = sum(1 for f in findings if f.level == WARN)
    print(f"kvmesh doctor: {args.config} ({len(config.engines)} engines)")
    for f in findings:
        print(f.render())
    print(f"{problems} problems, {warnings} warnings")
    return 1 if problems else 0
