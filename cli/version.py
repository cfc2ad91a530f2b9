"""``kvmesh version``."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from mesh import build


def register(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        v = version("kvmesh")
    except PackageNotFoundError:
        v = "unknown (not installed)"
    try:
        b = build.check().describe()
    except build.StaleBuild as exc:
        print(f"{v}, request path: {exc}")
        return 1
    print(f"{v}, request path: {b}")
    return 0
