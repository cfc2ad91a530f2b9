"""``kvmesh bench gossip``: how fast the mesh converges, and what it costs on the wire.

Runs the production mesh core (``mesh.gossip.MeshCore``: SWIM membership, signed envelopes,
delta push, anti-entropy) with the real ``crdt.PrefixIndex`` on the in-memory network
(``mesh.simnet``), in virtual time, for meshes of N routers spread over four regions with
realistic one-way delays (1 ms inside a region, 35-120 ms across).

1. **Convergence time**: one router ingests one engine event (8 blocks); the time until
   every router's index holds that version. Reported as p50/p99 over ``--trials`` events,
   in milliseconds and in gossip rounds (``gossip_interval``, 200 ms by default).
2. **Bytes per router per second** at ``--rate`` engine events per second mesh-wide
   (16 blocks per store, a quarter are removals), over ``--duration`` virtual seconds,
   split into state exchange (push, push-ack, sync) and membership (probes), next to the
   floor: the event payload every router must receive at least once (8 B per block key).

Figures are printed and written to ``results/gossip_convergence.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.progress import Bar, Phases
from crdt.prefix_index import PrefixIndex
from mesh.gossip import GossipConfig, MeshCore
from mesh.membership import SwimConfig
from mesh.simnet import SimNet, region_latency
from sim.metrics import percentile

REGIONS = ("us", "eu", "ap", "sa")
ONE_WAY = {
    ("us", "eu"): 0.040,
    ("us", "ap"): 0.075,
    ("us", "sa"): 0.060,
    ("eu", "ap"): 0.110,
    ("eu", "sa"): 0.095,
    ("ap", "sa"): 0.120,
}
STATE_KINDS = ("push", "push_ack", "sync", "sync_reply")
MEMBERSHIP_KINDS = ("ping", "ack", "ping_req", "nack", "notice")


@dataclass
class Router:
    core: MeshCore
    index: PrefixIndex
    replica: str
    seq: int = 0


def build(n: int, seed: int, swim: SwimConfig, gossip: GossipConfig) -> tuple[SimNet, list[Router]]:
    net = SimNet(seed=seed, latency=region_latency(0.001, ONE_WAY), jitter=0.002)
    seeds = [SimNet.addr_of(f"n{i}") for i in range(min(n, len(REGIONS)))]
    routers = []
    for i in range(n):
        index = PrefixIndex()
        core = net.spawn(
            f"n{i}",
            REGIONS[i % len(REGIONS)],
            {"prefix": index},
            seeds=seeds,
            swim=swim,
            gossip=gossip,
        )
        r = Router(core, index, f"http://replica-{i}")
        index.reset(r.replica, 1)
        r.seq = 1
        index.store(r.replica, (1, 1), [random.Random(i).getrandbits(63) for _ in range(32)])
        routers.append(r)
    want = n - 1
    bar = Bar(f"N={n} membership", None, "virtual s")

    def all_alive() -> bool:
        alive = sum(len(r.core.membership.alive()) == want for r in routers)
        bar.update(net.now, f"{alive}/{n} routers see every peer")
        return alive == n

    ok = net.run_until_true(all_alive, timeout=300, check_every=0.5)
    bar.close()
    if not ok:
        raise RuntimeError(f"membership of {n} routers did not converge")
    target = {r.replica: (1, r.seq) for r in routers}
    ok = net.run_until_true(
        lambda: all(r.index.version(k) == v for r in routers for k, v in target.items()),
        timeout=120,
        check_every=0.5,
    )
    if not ok:
        raise RuntimeError(f"initial state of {n} routers did not converge")
    return net, routers


def convergence(
    net: SimNet, routers: list[Router], trials: int, seed: int, gossip: GossipConfig
) -> dict[str, Any]:
    wall = time.perf_counter()
    n = len(routers)
    rng = random.Random(seed)
    times: list[float] = []
    bar = Bar(f"N={n} convergence", trials, "events")
    for _ in range(trials):
        r = rng.choice(routers)
        r.seq += 1
        version = (1, r.seq)
        r.index.store(r.replica, version, [rng.getrandbits(63) for _ in range(8)])
        start = net.now

        def everywhere(replica: str = r.replica, version: tuple[int, int] = version) -> bool:
            return all(x.index.version(replica) == version for x in routers)

        ok = net.run_until_true(everywhere, timeout=60, check_every=0.002)
        if not ok:
            raise RuntimeError(f"an event did not reach all {n} routers within 60 s")
        times.append(net.now - start)
        bar.advance(1, f"last {times[-1] * 1000:.0f} ms")
        net.run_for(rng.uniform(0.1, 0.3))
    bar.close()
    gi = gossip.gossip_interval
    return {
        "routers": n,
        "trials": trials,
        "p50_ms": percentile(times, 50) * 1000,
        "p99_ms": percentile(times, 99) * 1000,
        "mean_ms": statistics.fmean(times) * 1000,
        "p50_rounds": percentile(times, 50) / gi,
        "p99_rounds": percentile(times, 99) / gi,
        "wall_s": time.perf_counter() - wall,
    }


def traffic(
    net: SimNet, routers: list[Router], rate: float, duration: float, seed: int
) -> dict[str, Any]:
    wall = time.perf_counter()
    n = len(routers)
    rng = random.Random(seed + 1)
    held: dict[str, list[int]] = {r.replica: [] for r in routers}

    def one_event() -> int:
        r = rng.choice(routers)
        r.seq += 1
        keys = held[r.replica]
        if keys and rng.random() < 0.25:
            gone = [keys.pop(rng.randrange(len(keys))) for _ in range(min(16, len(keys)))]
            r.index.remove(r.replica, (1, r.seq), gone)
            return len(gone)
        new = [rng.getrandbits(63) for _ in range(16)]
        keys.extend(new)
        r.index.store(r.replica, (1, r.seq), new)
        return len(new)

    def run(seconds: float, label: str) -> int:
        blocks = 0
        end = net.now + seconds
        step = 1.0 / rate
        bar = Bar(f"N={n} {label}", seconds, "virtual s")
        t0 = net.now
        while net.now + step <= end:
            blocks += one_event()
            net.run_for(step)
            bar.update(net.now - t0)
        net.run_until(end)
        bar.close()
        return blocks

    run(2.0, "traffic warm-up")  # pushes and beliefs in their steady state
    before = [Counter(r.core.counters) for r in routers]
    blocks = run(duration, "traffic")
    diff = Counter[str]()
    for r, b in zip(routers, before, strict=True):
        diff.update({k: v - b.get(k, 0) for k, v in r.core.counters.items()})
    per = float(n) * duration

    def kinds(names: Sequence[str]) -> float:
        return sum(diff[f"tx.bytes.{k}"] for k in names) / per

    floor = blocks * 8 / duration  # every router needs every key once
    state = kinds(STATE_KINDS)
    return {
        "routers": n,
        "events_per_s": rate,
        "blocks_per_s": blocks / duration,
        "bytes_per_router_s": diff["tx.bytes"] / per,
        "state_bytes_per_router_s": state,
        "membership_bytes_per_router_s": kinds(MEMBERSHIP_KINDS),
        "frames_per_router_s": diff["tx.frames"] / per,
        "floor_bytes_per_router_s": floor,
        "state_over_floor": state / floor if floor else None,
        "wall_s": time.perf_counter() - wall,
    }


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "# Gossip convergence and traffic (in-memory network, virtual time)",
        "",
        f"Command: `{res['command']}`",
        "",
        "| routers | p50 ms | p99 ms | p50 rounds | p99 rounds | trials |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in res["convergence"]:
        lines.append(
            f"| {c['routers']} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} | "
            f"{c['p50_rounds']:.1f} | {c['p99_rounds']:.1f} | {c['trials']} |"
        )
    lines += [
        "",
        f"Traffic at {res['rate']:g} engine events/s mesh-wide:",
        "",
        "| routers | KB/s per router | state KB/s | membership KB/s | frames/s | "
        "floor KB/s | state / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in res["traffic"]:
        ratio = t["state_over_floor"]
        lines.append(
            f"| {t['routers']} | {t['bytes_per_router_s'] / 1024:.1f} | "
            f"{t['state_bytes_per_router_s'] / 1024:.1f} | "
            f"{t['membership_bytes_per_router_s'] / 1024:.1f} | "
            f"{t['frames_per_router_s']:.1f} | {t['floor_bytes_per_router_s'] / 1024:.1f} | "
            f"{ratio:.1f} |"
            if ratio is not None
            else f"| {t['routers']} | - | - | - | - | - | - |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench gossip", description=__doc__)
    ap.add_argument("--sizes", default="4,16,64,256", help="router counts, comma-separated")
    ap.add_argument("--trials", type=int, default=30, help="events timed per size")
    ap.add_argument("--rate", type=float, default=100.0, help="engine events/s, mesh-wide")
    ap.add_argument("--duration", type=float, default=5.0, help="virtual seconds measured")
    ap.add_argument("--gossip-interval", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    gossip = GossipConfig(gossip_interval=args.gossip_interval)
    res: dict[str, Any] = {
        "command": " ".join(["kvmesh bench gossip", *argv]),
        "rate": args.rate,
        "gossip_interval": args.gossip_interval,
        "convergence": [],
        "traffic": [],
    }
    phases = Phases("gossip", 3 * len(sizes))
    for n in sizes:
        wall = time.perf_counter()
        with phases.step(f"N={n}: build the mesh"):
            net, routers = build(n, args.seed, SwimConfig.lan(), gossip)
        print(
            f"N={n:4d}  mesh built in {net.now:.1f} virtual s  [{time.perf_counter() - wall:.0f} s]"
        )
        with phases.step(f"N={n}: convergence of {args.trials} events"):
            c = convergence(net, routers, args.trials, args.seed, gossip)
        res["convergence"].append(c)
        print(
            f"N={n:4d}  convergence p50 {c['p50_ms']:6.0f} ms ({c['p50_rounds']:.1f} rounds)"
            f"  p99 {c['p99_ms']:6.0f} ms ({c['p99_rounds']:.1f} rounds)  [{c['wall_s']:.0f} s]",
            flush=True,
        )
        with phases.step(f"N={n}: traffic at {args.rate:g} events/s"):
            t = traffic(net, routers, args.rate, args.duration, args.seed)
        res["traffic"].append(t)
        print(
            f"N={n:4d}  {t['bytes_per_router_s'] / 1024:7.1f} KB/s per router"
            f" (state {t['state_bytes_per_router_s'] / 1024:.1f},"
            f" membership {t['membership_bytes_per_router_s'] / 1024:.1f},"
            f" floor {t['floor_bytes_per_router_s'] / 1024:.1f})"
            f"  {t['frames_per_router_s']:.0f} frames/s  [{t['wall_s']:.0f} s]",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gossip_convergence.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (out / "gossip_convergence.md").write_text(text)
    plotted = plot(res, out / "gossip_convergence.png")
    print()
    print(text)
    if plotted:
        print(f"plot: {plotted}")
    return 0


def plot(res: dict[str, Any], path: Path) -> Path | None:
    """Convergence (p50/p99) and traffic per router against the number of routers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no plot: pip install 'kvmesh[plots]' for matplotlib)")
        return None
    conv, traf = res["convergence"], res["traffic"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    ns = [c["routers"] for c in conv]
    a.plot(ns, [c["p50_ms"] for c in conv], "o-", label="p50")
    a.plot(ns, [c["p99_ms"] for c in conv], "s-", label="p99")
    a.set(xscale="log", xlabel="routers", ylabel="ms until every router has an event",
          title="Convergence")
    a.legend()
    nt = [t["routers"] for t in traf]
    b.plot(nt, [t["bytes_per_router_s"] / 1024 for t in traf], "o-", label="total")
    b.plot(nt, [t["state_bytes_per_router_s"] / 1024 for t in traf], "s-", label="state")
    b.plot(nt, [t["membership_bytes_per_router_s"] / 1024 for t in traf], "^-",
           label="membership")
    b.plot(nt, [t["floor_bytes_per_router_s"] / 1024 for t in traf], "k--", label="floor")
    b.set(xscale="log", xlabel="routers", ylabel="KB/s sent per router",
          title=f"Traffic at {res['rate']:g} events/s")
    b.legend()
    for ax in (a, b):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(res["command"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
