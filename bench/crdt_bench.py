"""``kvmesh bench crdt``: PrefixIndex apply, merge, wire and query speed, and memory per pair.

Workload. ``--replicas`` replicas (default 64) hold ``--pairs`` (block, replica) pairs (default
1M) of random 64-bit block keys, laid out as ``pairs / k`` blocks each held by ``k`` random
replicas; ingestion writes each replica's keys in batches of 16 per seq, as an engine's
``BlockStored`` events arrive. Figures, all from one process, one after the other:

- **apply**: ``PrefixIndex.store`` block events per second while building the index (k = 4),
  and with churn (a removal for every store, after the index is full);
- **memory**: bytes per (block, replica) pair measured with ``tracemalloc`` (everything the
  index allocates: the holder table and dict, key and mask ints, per-slice logs), for
  k = 1, 2, 4, 16;
- **wire**: full-state delta to bytes (``to_wire`` + ``crdt.wire.encode``) and back
  (``decode`` + ``delta_from_wire``), pairs per second and MB/s;
- **merge**: the decoded full-state delta merged into an empty index (pairs per second), and a
  stream of small incremental deltas (one per ingested batch) merged by a follower;
- **query**: ``match`` of 128 chained keys against 64 replicas that hold random-length prefixes
  of the chain (a quarter of the queries: all 64 replicas hold all 128 keys, the worst case:
  the walk never stops early), and of 128 keys held by one replica each (lone holders, the
  compact table's side); p50 / p99 / max per query, beside a floor: the same lookups in one
  plain dict, timed in the same run.

Writes ``results/crdt.json`` and ``results/crdt.md`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Callable
from itertools import accumulate, repeat
from operator import and_
from pathlib import Path
from typing import Any

from bench.progress import Phases
from crdt import wire
from crdt.prefix_index import PrefixIndex
from sim.metrics import percentile

BATCH = 16
CHAIN = 128


def replica_name(i: int) -> str:
    return f"http://10.0.{i // 256}.{i % 256}:8000"


def layout(pairs: int, replicas: int, per_block: int, seed: int) -> dict[str, list[int]]:
    """Per replica, the keys it holds: ``pairs // per_block`` blocks on ``per_block`` replicas."""
    rng = random.Random(seed)
    held: dict[str, list[int]] = {replica_name(i): [] for i in range(replicas)}
    names = list(held)
    for _ in range(pairs // per_block):
        key = rng.getrandbits(64)
        for name in rng.sample(names, per_block):
            held[name].append(key)
    return held


def build(held: dict[str, list[int]]) -> tuple[PrefixIndex, int, float]:
    """Ingest every replica's keys in batches; returns (index, block events, seconds)."""
    idx = PrefixIndex()
    events = 0
    t0 = time.perf_counter()
    for name, keys in held.items():
        idx.reset(name, 1)
        for seq, at in enumerate(range(0, len(keys), BATCH)):
            batch = keys[at : at + BATCH]
            idx.store(name, (1, seq), batch)
            events += len(batch)
    return idx, events, time.perf_counter() - t0


def churn(
    idx: PrefixIndex, held: dict[str, list[int]], seed: int, rounds: int
) -> tuple[int, float]:
    """Per round and replica: evict a batch of its oldest keys and store a batch of new ones."""
    rng = random.Random(seed)
    events = 0
    seqs = {name: idx.version(name) or (1, 0) for name in held}
    t0 = time.perf_counter()
    for _ in range(rounds):
        for name, keys in held.items():
            epoch, seq = seqs[name]
            gone, keys[:BATCH] = keys[:BATCH], []
            idx.remove(name, (epoch, seq + 1), gone)
            fresh = [rng.getrandbits(64) for _ in range(BATCH)]
            idx.store(name, (epoch, seq + 1), fresh)
            keys.extend(fresh)
            seqs[name] = (epoch, seq + 1)
            events += len(gone) + BATCH
    return events, time.perf_counter() - t0


def memory_per_pair(pairs: int, replicas: int, per_block: int, seed: int) -> dict[str, Any]:
    held = layout(pairs, replicas, per_block, seed)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    idx, _, _ = build(held)
    idx.compact()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    real = idx.pair_count()
    return {
        "layout": f"{pairs // per_block} blocks x {per_block} replicas",
        "replicas_per_block": per_block,
        "blocks": pairs // per_block,
        "pairs": real,
        "bytes": after - before,
        "bytes_per_pair": round((after - before) / max(1, real), 1),
    }


def add_chains(idx: PrefixIndex, replicas: int, chains: int, seed: int) -> list[list[int]]:
    """Chains of 128 keys; every replica holds a random-length prefix (a quarter: all of it)."""
    rng = random.Random(seed)
    out = []
    for c in range(chains):
        chain = [rng.getrandbits(64) for _ in range(CHAIN)]
        full = c % 4 == 0
        for i in range(replicas):
            n = CHAIN if full else rng.randint(0, CHAIN)
            _store_next(idx, replica_name(i), chain[:n])
        out.append(chain)
    return out


def add_lone_chains(idx: PrefixIndex, replicas: int, chains: int, seed: int) -> list[list[int]]:
    """Chains of 128 keys, each held whole by one random replica (its keys have one holder)."""
    rng = random.Random(seed)
    out = []
    for _ in range(chains):
        chain = [rng.getrandbits(64) for _ in range(CHAIN)]
        _store_next(idx, replica_name(rng.randrange(replicas)), chain)
        out.append(chain)
    return out


def _store_next(idx: PrefixIndex, name: str, keys: list[int]) -> None:
    version = idx.version(name) or (1, 0)
    idx.store(name, (version[0], version[1] + 1), keys)


def time_pair(
    fns: tuple[Callable[[list[int]], object], Callable[[list[int]], object]],
    chains: list[list[int]], n: int, rng: random.Random,
) -> tuple[dict[str, float], dict[str, float]]:
    """Two functions on the same ``n`` random chains, interleaved query by query (the order
    alternating), so a change in machine load hits both alike: wall and this thread's CPU
    time per call, in us, for each."""
    samples: tuple[tuple[list[int], list[int]], ...] = (([], []), ([], []))
    wall_ns, cpu_ns = time.perf_counter_ns, time.thread_time_ns
    overhead = min(_clock_pair_cost(wall_ns, cpu_ns) for _ in range(200))
    for i in range(n):
        q = chains[rng.randrange(len(chains))]
        for j in ((0, 1) if i % 2 else (1, 0)):
            fn, (wall, cpu) = fns[j], samples[j]
            c0 = cpu_ns()
            t0 = wall_ns()
            fn(q)
            t1 = wall_ns()
            c1 = cpu_ns()
            wall.append(t1 - t0)
            cpu.append(max(0, c1 - c0 - overhead))

    def pct(xs: list[int], p: float) -> float:
        return round(percentile(xs, p * 100) / 1000, 2)

    out = []
    for wall, cpu in samples:
        wall.sort()
        cpu.sort()
        out.append({
            "p50_us": pct(wall, 0.5),
            "p99_us": pct(wall, 0.99),
            "max_us": pct(wall, 1.0),
            "cpu_p50_us": pct(cpu, 0.5),
            "cpu_p99_us": pct(cpu, 0.99),
        })
    return out[0], out[1]


def time_queries(idx: PrefixIndex, chains: list[list[int]], n: int, seed: int) -> dict[str, Any]:
    """``match`` on random chains, beside the floor: the same lookups in one plain dict.

    The floor: 128 lookups and ANDs run in C (``accumulate(map(dict.get, keys), and_)``) on a
    dict of every (key, mask) the index holds. Both are timed query by query, interleaved,
    so their ratio does not depend on machine load.
    """
    rng = random.Random(seed)
    match = idx.match
    matched = sum(len(match(q)) for q in chains) / len(chains)
    get = dict(idx._holders.items()).get
    q, floor = time_pair(
        (match, lambda k: list(accumulate(map(get, k, repeat(0)), and_))), chains, n, rng)
    return {
        "queries": n,
        "keys_per_query": CHAIN,
        **q,
        "dict_floor": floor,
        "query_over_floor": round(q["cpu_p50_us"] / max(0.01, floor["cpu_p50_us"]), 2),
        "mean_replicas_matched": round(matched, 1),
    }


def _clock_pair_cost(wall_ns: Any, cpu_ns: Any) -> int:
    """What reading both clocks costs, as seen by the CPU clock (subtracted from samples)."""
    c0 = cpu_ns()
    wall_ns()
    wall_ns()
    c1 = cpu_ns()
    return int(c1 - c0)


def wire_and_merge(idx: PrefixIndex) -> dict[str, Any]:
    pairs = idx.pair_count()
    t0 = time.perf_counter()
    delta = idx.full_delta()
    data = wire.encode(delta.to_wire())
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    back = PrefixIndex().delta_from_wire(wire.decode(data))
    t_dec = time.perf_counter() - t0
    follower = PrefixIndex()
    t0 = time.perf_counter()
    follower.merge(back, 0.0)
    t_merge = time.perf_counter() - t0
    same = follower.pair_count() == pairs
    mb = len(data) / 1e6
    return {
        "pairs": pairs,
        "bytes": len(data),
        "bytes_per_pair_on_wire": round(len(data) / max(1, pairs), 2),
        "encode_pairs_per_s": round(pairs / t_enc),
        "encode_mb_per_s": round(mb / t_enc, 1),
        "decode_pairs_per_s": round(pairs / t_dec),
        "decode_mb_per_s": round(mb / t_dec, 1),
        "full_merge_pairs_per_s": round(pairs / t_merge),
        "follower_identical": same,
    }


def incremental(seed: int, batches: int) -> dict[str, Any]:
    """An ingester writes batches; after each, a follower merges what it lacks (via bytes)."""
    rng = random.Random(seed)
    src, dst = PrefixIndex(), PrefixIndex()
    names = [replica_name(i) for i in range(16)]
    for name in names:
        src.reset(name, 1)
    dst.merge(src.full_delta(), 0.0)
    events = 0
    live: dict[str, list[int]] = {name: [] for name in names}
    t_delta = t_merge = 0.0
    for seq in range(batches):
        name = names[seq % len(names)]
        keys = [rng.getrandbits(64) for _ in range(BATCH)]
        src.store(name, (1, seq), keys)
        live[name].extend(keys)
        events += BATCH
        if len(live[name]) > 4096:
            gone, live[name] = live[name][:BATCH], live[name][BATCH:]
            src.remove(name, (1, seq), gone)
            events += BATCH
        t0 = time.perf_counter()
        data = wire.encode(src.delta_since(dst.digest(), 0.0).to_wire())
        t1 = time.perf_counter()
        dst.merge(dst.delta_from_wire(wire.decode(data)), 0.0)
        t2 = time.perf_counter()
        t_delta += t1 - t0
        t_merge += t2 - t1
    return {
        "batches": batches,
        "block_events": events,
        "delta_per_s": round(batches / t_delta),
        "merge_per_s": round(batches / t_merge),
        "merged_block_events_per_s": round(events / t_merge),
        "follower_identical": dst.content() == src.content(),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvmesh bench crdt", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000, help="(block, replica) pairs")
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="results", help="folder for crdt.json and crdt.md")
    args = parser.parse_args(argv)
    if args.replicas < 16:
        parser.error("--replicas must be at least 16 (the layouts put a block on 16 replicas)")

    print(
        f"kvmesh bench crdt: {args.pairs} pairs over {args.replicas} replicas (python "
        f"{platform.python_version()}, {platform.machine()})"
    )
    results: dict[str, Any] = {
        "command": "kvmesh bench crdt " + " ".join(argv),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "pairs": args.pairs,
        "replicas": args.replicas,
    }

    phases = Phases("crdt", 6)
    gc.disable()
    try:
        with phases.step(f"apply {args.pairs:,} pairs"):
            held = layout(args.pairs, args.replicas, 4, args.seed)
            idx, events, secs = build(held)
        results["apply"] = {"block_events": events, "events_per_s": round(events / secs)}
        print(f"apply:   {events / secs:,.0f} store events/s ({events:,} events, {secs:.2f} s)")
        with phases.step("churn"):
            ch_events, ch_secs = churn(idx, held, args.seed + 1,
                                       rounds=max(1, args.pairs // 100_000))
        results["apply"]["churn_events_per_s"] = round(ch_events / ch_secs)
        print(f"churn:   {ch_events / ch_secs:,.0f} store+remove events/s ({ch_events:,} events)")

        with phases.step("wire encode/decode and full-state merge"):
            w = wire_and_merge(idx)
        results["wire"] = w
        print(
            f"wire:    encode {w['encode_pairs_per_s']:,} pairs/s ({w['encode_mb_per_s']} MB/s), "
            f"decode {w['decode_pairs_per_s']:,} pairs/s ({w['decode_mb_per_s']} MB/s), "
            f"{w['bytes_per_pair_on_wire']} B/pair on the wire"
        )
        print(
            f"merge:   full state {w['full_merge_pairs_per_s']:,} pairs/s "
            f"(follower identical: {w['follower_identical']})"
        )
        with phases.step("incremental deltas"):
            inc = incremental(args.seed + 2, batches=max(200, min(20_000, args.pairs // 50)))
        results["incremental"] = inc
        print(
            f"         incremental: {inc['merge_per_s']:,} deltas merged/s "
            f"({inc['merged_block_events_per_s']:,} block events/s), "
            f"{inc['delta_per_s']:,} deltas built+encoded/s "
            f"(identical: {inc['follower_identical']})"
        )

        with phases.step(f"{args.queries:,} queries, two shapes"):
            shared = add_chains(idx, args.replicas, 64, args.seed + 3)
            lone = add_lone_chains(idx, args.replicas, 64, args.seed + 5)
            results["query"] = q = time_queries(idx, shared, args.queries, args.seed + 4)
            results["query_lone"] = ql = time_queries(idx, lone, args.queries, args.seed + 6)
        for what, r in (
            (f"{args.replicas} replicas hold random prefixes", q),
            ("each chain on one replica", ql),
        ):
            f = r["dict_floor"]
            print(
                f"query:   128 keys, {what}: wall p50 {r['p50_us']} us, p99 {r['p99_us']} us, "
                f"max {r['max_us']} us; CPU p50 {r['cpu_p50_us']}, p99 {r['cpu_p99_us']} us "
                f"({r['queries']} queries) | floor (128 lookups in one plain dict): wall p50 "
                f"{f['p50_us']}, p99 {f['p99_us']} us; match CPU / floor CPU = "
                f"{r['query_over_floor']}"
            )
        del idx, held
    finally:
        gc.enable()

    mem = []
    with phases.step("memory per pair, 4 layouts"):
        for k in (1, 2, 4, 16):
            m = memory_per_pair(args.pairs, args.replicas, k, args.seed + 5)
            mem.append(m)
            print(
                f"memory:  {m['bytes_per_pair']} B/pair for {m['layout']} "
                f"({m['bytes'] / 1e6:.1f} MB, {m['pairs']:,} pairs)"
            )
    results["memory"] = mem

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "crdt.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "crdt.md").write_text(markdown(results))
    print(f"wrote {out / 'crdt.json'} and {out / 'crdt.md'}")
    return 0


def markdown(r: dict[str, Any]) -> str:
    w, q, inc = r["wire"], r["query"], r["incremental"]
    lines = [
        "# PrefixIndex benchmark",
        "",
        f"Command: `{r['command'].strip()}` (Python {r['python']}, {r['machine']}; one process,",
        "figures measured one after the other on a shared machine: compare ratios, not absolutes;",
        "query CPU time is this thread's CPU clock, which does not count time spent descheduled).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| apply (store events/s, building) | {r['apply']['events_per_s']:,} |",
        f"| apply with churn (store+remove events/s) | {r['apply']['churn_events_per_s']:,} |",
        f"| full delta encode (pairs/s; MB/s) | {w['encode_pairs_per_s']:,}; "
        f"{w['encode_mb_per_s']} |",
        f"| full delta decode (pairs/s; MB/s) | {w['decode_pairs_per_s']:,}; "
        f"{w['decode_mb_per_s']} |",
        f"| bytes per pair on the wire (full state) | {w['bytes_per_pair_on_wire']} |",
        f"| full-state merge (pairs/s) | {w['full_merge_pairs_per_s']:,} |",
        f"| incremental merge (deltas/s; block events/s) | {inc['merge_per_s']:,}; "
        f"{inc['merged_block_events_per_s']:,} |",
    ]
    for label, x in (
        (f"{r['replicas']} replicas hold random prefixes", q),
        ("each chain on one replica", r["query_lone"]),
    ):
        f = x["dict_floor"]
        lines += [
            f"| query, {label}: wall p50 / p99 / max (us, 128 keys) | "
            f"{x['p50_us']} / {x['p99_us']} / {x['max_us']} |",
            f"| same queries, CPU p50 / p99 (us) | {x['cpu_p50_us']} / {x['cpu_p99_us']} |",
            f"| floor, 128 lookups in one plain dict: wall p50 / p99 (us) | "
            f"{f['p50_us']} / {f['p99_us']} |",
            f"| match CPU p50 / floor CPU p50 (load-independent ratio) | {x['query_over_floor']} |",
        ]
    lines += [
        "",
        "Memory (tracemalloc, everything the index allocates):",
        "",
        "| layout | pairs | MB | bytes per pair |",
        "|---|---|---|---|",
    ]
    for m in r["memory"]:
        lines.append(
            f"| {m['layout']} | {m['pairs']:,} | {m['bytes'] / 1e6:.1f} | {m['bytes_per_pair']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
