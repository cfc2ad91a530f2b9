"""``kvmesh version``."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        print(version("kvmesh"))
    except PackageNotFoundError:
        print("unknown (not installed)")
    return 0
