"""The ``kvmesh`` command: the top of the stack (it may import every package; none imports it).

Each subcommand lives in its own module that exposes ``register(subparsers)``;
the module adds its parser and sets ``func`` (``argparse.Namespace -> int``).
Modules are imported lazily by name so ``kvmesh --help`` stays fast and a
broken optional dependency only breaks its own subcommand. Adding a
subcommand is one line in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import signal
from collections.abc import Callable, Sequence
from types import FrameType

# name -> (module path, one-line help). Keep sorted by name.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("cli.bench", "run a benchmark or evaluation scenario (--list)"),
    "bridge": ("cli.bridge", "relay an engine's ZMQ KV events into a Redis Stream"),
    "demo": ("cli.demo", "a local 3-region mesh with simulated engines; compares policies"),
    "doctor": ("cli.doctor", "check a router config against the live engines (--config FILE)"),
    "netdelay": ("sim.netdelay", "user-space TCP delay proxy between regions (no netem needed)"),
    "plan": ("plan.cli", "capacity plan from demand history: forecast + integer program"),
    "router": ("cli.router", "run a router node (kvmesh router --config FILE)"),
    "sim-engine": ("cli.engine", "a simulated vLLM engine: OpenAI API, KV events, GPU timing"),
    "version": ("cli.version", "print the kvmesh version"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmesh",
        description="A decentralized CRDT mesh of LLM inference routers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in sorted(SUBCOMMANDS.items()):
        register: Callable[[argparse.ArgumentParser], None] = importlib.import_module(
            module
        ).register
        register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_like_ctrl_c() -> None:
    """Make SIGTERM (a timeout, a killed job) end this process like Ctrl-C, so the cleanup
    of what it started runs: engines, routers and proxies live in sessions of their own and
    would outlive it. Leaves a handler already installed alone."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    sigterm_like_ctrl_c()  # long-running nodes install their own handler
    return func(args)

