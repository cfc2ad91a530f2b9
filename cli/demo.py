"""``kvmesh demo``: the 3-region local mesh with simulated engines (no configuration needed)."""

from __future__ import annotations

import argparse

from mesh.policies import POLICIES
from sim.demo import DemoConfig, main


def register(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--policies", default=",".join(d.policies),
                        help="comma-separated policies to compare "
                        f"(default {','.join(d.policies)})")
    parser.add_argument("--duration", type=float, default=d.duration,
                        help=f"seconds of traffic per policy (default {d.duration:g})")
    parser.add_argument("--speedup", type=float, default=d.speedup,
                        help=f"engine time compression (default {d.speedup:g})")
    parser.add_argument("--clients", default=",".join(f"{k}={v}" for k, v in d.clients.items()),
                        help="closed-loop chat clients per region, e.g. us=10,eu=4,asia=4")
    parser.add_argument("--rtt-scale", type=float, default=d.rtt_scale,
                        help="multiply the inter-region round trips (default 1)")
    parser.add_argument("--max-tokens", type=int, default=d.max_tokens,
                        help="output tokens per turn")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--workdir", help="keep configs and logs here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary logs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    for p in policies:
        if p not in POLICIES:
            print(f"kvmesh demo: unknown policy {p!r} (known: {', '.join(sorted(POLICIES))})")
            return 2
    clients: dict[str, int] = {}
    for item in args.clients.split(","):
        region, _, n = item.partition("=")
        if not n.isdigit():
            print(f"kvmesh demo: --clients expects REGION=N,..., got {item!r}")
            return 2
        clients[region.strip()] = int(n)
    if args.duration <= 0 or args.speedup <= 0:
        print("kvmesh demo: --duration and --speedup must be positive")
        return 2
    cfg = DemoConfig(policies=policies, duration=args.duration, speedup=args.speedup,
                     clients=clients, rtt_scale=args.rtt_scale, max_tokens=args.max_tokens,
                     seed=args.seed, workdir=args.workdir, keep_workdir=args.keep,
                     progress=not args.no_progress)
    return main(cfg)
