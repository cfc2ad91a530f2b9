"""``kvmesh bench kvevents``: how many engine block events one router process ingests per second.

Workload: a vLLM-like engine serving multi-turn conversations. Each scheduler step publishes one
batch: several ``BlockStored`` (each a run of 16-token blocks chained to the conversation's
last block, 1-8 blocks, 4 on average) and, once the cache is full, one ``BlockRemoved`` per
evicted block, as vLLM emits them. Payloads are encoded by ``kvevents.publisher.encode_batch``
(the vLLM wire encoder), in the current map encoding and in the array encoding.

Stages, each timed over the same batches in one process:

1. **decode**: payload bytes -> typed events (``kvevents.decode.decode_batch``);
2. **keys**: router block keys from token ids + the refcounted engine-hash map
   (``kvevents.keys.EngineKeyMap``);
3. **apply**: the resulting writes into the index (``crdt.prefix_index.PrefixIndex``);
4. **end to end**: ``EngineIngest.on_message`` (sequence tracking + all of the above), which
   is what the ZMQ subscriber and the Redis reader run per message.

A "block event" is one block hash in a store or remove event. Figures go to
``results/kvevents_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from crdt.prefix_index import PrefixIndex
from kvevents.decode import RawMessage, decode_batch
from kvevents.events import BlockRemoved, BlockStored, EventBatch, IndexWriter, KVEvent
from kvevents.ingest import EngineIngest
from kvevents.keys import EngineKeyMap
from kvevents.memory_index import MemoryIndex
from kvevents.publisher import EventFormat, encode_batch

BLOCK = 16
FORMATS: tuple[EventFormat, ...] = ("map", "array")


def make_payloads(
    batches: int, seed: int, fmt: EventFormat, cache_blocks: int = 20_000
) -> tuple[list[bytes], int]:
    """Engine-like batches and the number of block events in them."""
    rng = random.Random(seed)
    conversations: list[int | None] = [None] * 256  # last block hash of each conversation
    cached: dict[int, None] = {}  # insertion order = eviction order (LRU-ish)
    payloads: list[bytes] = []
    block_events = 0
    ts = 1_800_000_000.0
    for _ in range(batches):
        events: list[KVEvent] = []
        for _ in range(rng.randint(6, 10)):
            c = rng.randrange(len(conversations))
            if rng.random() < 0.1:
                conversations[c] = None  # a new conversation
            parent = conversations[c]
            if parent is not None and parent not in cached:
                parent = None
            n = min(8, max(1, round(rng.expovariate(1 / 4))))
            hashes = [rng.getrandbits(64) for _ in range(n)]
            tokens = [rng.randrange(128_000) for _ in range(n * BLOCK)]
            events.append(BlockStored(hashes, parent, tokens, BLOCK, medium="GPU"))
            block_events += n
            for h in hashes:
                cached[h] = None
            conversations[c] = hashes[-1]
        while len(cached) > cache_blocks:
            victim = next(iter(cached))
            del cached[victim]
            events.append(BlockRemoved([victim], "GPU"))
            block_events += 1
        ts += 0.02
        payloads.append(encode_batch(events, ts, 0, fmt))
    return payloads, block_events


def stage_decode(payloads: list[bytes]) -> tuple[float, list[EventBatch]]:
    gc.collect()
    t = time.perf_counter()
    out = [decode_batch(p) for p in payloads]
    return time.perf_counter() - t, out


def stage_keys(batches: list[EventBatch]) -> tuple[float, list[tuple[int, bool, list[int]]]]:
    km = EngineKeyMap()
    writes: list[tuple[int, bool, list[int]]] = []
    gc.collect()
    t = time.perf_counter()
    for seq, batch in enumerate(batches):
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                new = km.stored(ev)
                if new:
                    writes.append((seq, True, new))
            elif isinstance(ev, BlockRemoved):
                gone = km.removed(ev)
                if gone:
                    writes.append((seq, False, gone))
    return time.perf_counter() - t, writes


def stage_apply(writer: IndexWriter, writes: list[tuple[int, bool, list[int]]]) -> float:
    writer.reset("engine-0", 1, False)
    gc.collect()
    t = time.perf_counter()
    for seq, is_store, keys in writes:
        if is_store:
            writer.store("engine-0", (1, seq), keys)
        else:
            writer.remove("engine-0", (1, seq), keys)
    return time.perf_counter() - t


def stage_e2e(payloads: list[bytes], writer: IndexWriter) -> float:
    ingest = EngineIngest("engine-0", writer)
    msgs = [RawMessage(b"", seq, p) for seq, p in enumerate(payloads)]
    gc.collect()
    t = time.perf_counter()
    for m in msgs:
        ingest.on_message(m, 0.0)
    return time.perf_counter() - t


def spread(times: list[float]) -> list[float]:
    return [min(times), statistics.median(times), max(times)]


def bench_encoding(fmt: EventFormat, batches: int, rounds: int, seed: int) -> dict[str, Any]:
    payloads, block_events = make_payloads(batches, seed, fmt)
    t_decode: list[float] = []
    t_keys: list[float] = []
    t_apply: list[float] = []
    t_apply_mem: list[float] = []
    t_e2e: list[float] = []
    decoded: list[EventBatch] = []
    writes: list[tuple[int, bool, list[int]]] = []
    for _ in range(rounds):
        took, decoded = stage_decode(payloads)
        t_decode.append(took)
        took, writes = stage_keys(decoded)
        t_keys.append(took)
        t_apply.append(stage_apply(PrefixIndex(), writes))
        t_apply_mem.append(stage_apply(MemoryIndex(), writes))
        t_e2e.append(stage_e2e(payloads, PrefixIndex()))
    best = {
        "decode_s": min(t_decode),
        "keys_s": min(t_keys),
        "apply_prefix_index_s": min(t_apply),
        "apply_memory_index_s": min(t_apply_mem),
        "e2e_s": min(t_e2e),
    }
    return {
        "payload_mb": round(sum(len(p) for p in payloads) / 1e6, 2),
        "events": sum(len(b.events) for b in decoded),
        "block_events": block_events,
        "index_writes": len(writes),
        **best,
        "decode_block_events_per_s": block_events / best["decode_s"],
        "keys_block_events_per_s": block_events / best["keys_s"],
        "apply_block_events_per_s": block_events / best["apply_prefix_index_s"],
        "stages_sum_block_events_per_s": block_events
        / (best["decode_s"] + best["keys_s"] + best["apply_prefix_index_s"]),
        "e2e_block_events_per_s": block_events / best["e2e_s"],
        "e2e_us_per_batch": best["e2e_s"] / batches * 1e6,
        "spread_min_median_max_s": {
            "decode": spread(t_decode),
            "keys": spread(t_keys),
            "apply": spread(t_apply),
            "e2e": spread(t_e2e),
        },
    }


def run(batches: int, rounds: int, seed: int) -> dict[str, Any]:
    return {
        "batches": batches,
        "rounds": rounds,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "apply_index": "crdt.prefix_index.PrefixIndex",
        "encodings": {fmt: bench_encoding(fmt, batches, rounds, seed) for fmt in FORMATS},
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        "# kvevents ingestion benchmark",
        "",
        f"{res['batches']} batches, best of {res['rounds']} rounds, one process "
        f"(Python {res['python']}, {res['machine']}); apply stage into {res['apply_index']}.",
        "",
        "| encoding | stage | seconds | block events/s | share of stages |",
        "|---|---|---:|---:|---:|",
    ]
    for fmt, r in res["encodings"].items():
        total = r["decode_s"] + r["keys_s"] + r["apply_prefix_index_s"]
        for name, key in (
            ("decode", "decode_s"),
            ("keys", "keys_s"),
            ("apply (PrefixIndex)", "apply_prefix_index_s"),
        ):
            lines.append(
                f"| {fmt} | {name} | {r[key]:.3f} | {r['block_events'] / r[key]:,.0f} "
                f"| {r[key] / total:.0%} |"
            )
        lines.append(
            f"| {fmt} | (apply into dict model, for comparison) | {r['apply_memory_index_s']:.3f} "
            f"| {r['block_events'] / r['apply_memory_index_s']:,.0f} | |"
        )
        lines.append(
            f"| {fmt} | **end to end (EngineIngest)** | {r['e2e_s']:.3f} "
            f"| **{r['e2e_block_events_per_s']:,.0f}** | |"
        )
    lines += [""]
    for fmt, r in res["encodings"].items():
        lines.append(
            f"- {fmt}: {r['block_events']:,} block events in {r['events']:,} events "
            f"({r['payload_mb']} MB of payload), {r['index_writes']:,} index writes, "
            f"{r['e2e_us_per_batch']:.0f} us per batch end to end."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench kvevents", description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4000, help="scheduler steps to publish")
    ap.add_argument("--rounds", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    res = run(args.batches, args.rounds, args.seed)
    text = render(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kvevents_bench.json").write_text(json.dumps(res, indent=1))
    (out / "kvevents_bench.md").write_text(text)
    print(f"written to {out / 'kvevents_bench.json'} and {out / 'kvevents_bench.md'}")
    return 0
