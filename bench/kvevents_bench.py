"""``kvmesh bench kvevents``: how many engine block events one router process ingests per second.

Workload: a vLLM-like engine serving multi-turn conversations. Each scheduler step publishes one
batch: several ``BlockStored`` (each a run of 16-token blocks chained to the conversation's
last block, 1-8 blocks, 4 on average) and, once the cache is full, one ``BlockRemoved`` per
evicted block, as vLLM emits them. Payloads are encoded by ``kvevents.publisher.encode_batch``
(the vLLM wire encoder), in the current map encoding and in the array encoding.

Stages, each timed over the same batches in one process:

1. **decode**: payload bytes -> typed events, as ingestion does it (msgspec typed structs,
   the generic decoder for anything else); ``decode_batch`` (which also builds the contract
   dataclasses) is timed alongside for comparison;
2. **keys**: router block keys from token ids + the refcounted engine-hash map
   (``kvevents.keys.EngineKeyMap``);
3. **apply**: the resulting writes into the index (``crdt.prefix_index.PrefixIndex``);
4. **end to end**: ``EngineIngest.on_message`` (sequence tracking + all of the above), which
   is what the ZMQ subscriber and the Redis reader run per message.

A "block event" is one block hash in a store or remove event. Stages 1-3 run with the garbage
collector paused (they keep all batches alive between stages, which a router never does);
the end-to-end run keeps it on. Figures go to
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

from bench.progress import Bar
from crdt.prefix_index import PrefixIndex
from kvevents.decode import RawMessage, decode_batch
from kvevents.decode_fast import REMOVED_TYPES, STORED_TYPES, decode_for_ingest
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


Timing = tuple[float, float]
"""(wall seconds, CPU seconds of this process)."""


def _clock() -> Timing:
    return time.perf_counter(), time.process_time()


def _since(start: Timing) -> Timing:
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _quiet() -> None:
    # Stages keep every batch alive for the next stage, which a router never does; the
    # collector would then mostly scan the bench's own data. Stages run with it paused (the
    # caller re-enables it); the end-to-end run keeps it on, as in a router.
    gc.collect()
    gc.disable()


def stage_decode(payloads: list[bytes]) -> tuple[Timing, list[EventBatch]]:
    """What ingestion decodes: typed structs where possible (no dataclass per event)."""
    _quiet()
    t = _clock()
    out = []
    for p in payloads:
        fast = decode_for_ingest(p)
        out.append(EventBatch(fast[0], fast[1]) if fast is not None else decode_batch(p))
    return _since(t), out


def stage_decode_api(payloads: list[bytes]) -> Timing:
    """``decode_batch``: the public API, which builds the contract dataclasses."""
    _quiet()
    t = _clock()
    for p in payloads:
        decode_batch(p)
    return _since(t)


Writes = list[tuple[int, bool, list[int]]]


def stage_keys(batches: list[EventBatch]) -> tuple[Timing, Writes]:
    """Keys and the index writes they imply, consecutive ones of a kind merged (as ingest does)."""
    km = EngineKeyMap()
    writes: Writes = []
    _quiet()
    t = _clock()
    for seq, batch in enumerate(batches):
        for ev in batch.events:
            if isinstance(ev, STORED_TYPES):
                changed, is_store = km.stored(ev), True
            elif isinstance(ev, REMOVED_TYPES):
                changed, is_store = km.removed(ev), False
            else:
                continue
            if changed:
                if writes and writes[-1][0] == seq and writes[-1][1] is is_store:
                    writes[-1][2].extend(changed)
                else:
                    writes.append((seq, is_store, changed))
    return _since(t), writes


def stage_apply(writer: IndexWriter, writes: Writes) -> Timing:
    writer.reset("engine-0", 1, False)
    _quiet()
    t = _clock()
    for seq, is_store, keys in writes:
        if is_store:
            writer.store("engine-0", (1, seq), keys)
        else:
            writer.remove("engine-0", (1, seq), keys)
    return _since(t)


def stage_e2e(payloads: list[bytes], writer: IndexWriter) -> Timing:
    ingest = EngineIngest("engine-0", writer)
    msgs = [RawMessage(b"", seq, p) for seq, p in enumerate(payloads)]
    gc.collect()
    gc.enable()
    t = _clock()
    for m in msgs:
        ingest.on_message(m, 0.0)
    return _since(t)


def bench_encoding(fmt: EventFormat, batches: int, rounds: int, seed: int) -> dict[str, Any]:
    payloads, block_events = make_payloads(batches, seed, fmt)
    times: dict[str, list[Timing]] = {
        "decode": [],
        "decode_api": [],
        "keys": [],
        "apply": [],
        "apply_dict_model": [],
        "e2e": [],
    }
    decoded: list[EventBatch] = []
    writes: Writes = []
    bar = Bar(f"{fmt}: {batches} batches, 6 stages", rounds, "rounds")
    try:
        for _ in range(rounds):
            took, decoded = stage_decode(payloads)
            times["decode"].append(took)
            times["decode_api"].append(stage_decode_api(payloads))
            took, writes = stage_keys(decoded)
            times["keys"].append(took)
            times["apply"].append(stage_apply(PrefixIndex(), writes))
            times["apply_dict_model"].append(stage_apply(MemoryIndex(), writes))
            times["e2e"].append(stage_e2e(payloads, PrefixIndex()))
            bar.advance()
        bar.close()
    finally:
        gc.enable()
    stages: dict[str, Any] = {}
    for name, runs in times.items():
        wall = min(w for w, _ in runs)
        cpu = min(c for _, c in runs)
        stages[name] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "block_events_per_s_wall": block_events / wall,
            "block_events_per_s_cpu": block_events / cpu,
            "wall_s_min_median_max": [
                wall,
                statistics.median(w for w, _ in runs),
                max(w for w, _ in runs),
            ],
        }
    parts = ("decode", "keys", "apply")
    return {
        "payload_mb": round(sum(len(p) for p in payloads) / 1e6, 2),
        "events": sum(len(b.events) for b in decoded),
        "block_events": block_events,
        "index_writes": len(writes),
        "stages": stages,
        "stages_sum_block_events_per_s_cpu": block_events / sum(stages[p]["cpu_s"] for p in parts),
        "e2e_us_per_batch_cpu": stages["e2e"]["cpu_s"] / batches * 1e6,
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
        f"(Python {res['python']}, {res['machine']}), index: {res['apply_index']}. "
        "Rates are block events per second: per CPU second of this process (what one core "
        "sustains) and per wall second (depends on what else the machine runs).",
        "",
        "| encoding | stage | CPU s | block events/s (CPU) | wall s | block events/s (wall) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    names = {
        "decode": "decode",
        "decode_api": "(decode_batch API, builds dataclasses)",
        "keys": "keys (router keys + hash map)",
        "apply": "apply (PrefixIndex)",
        "apply_dict_model": "apply (dict model, for comparison)",
        "e2e": "**end to end (EngineIngest)**",
    }
    for fmt, r in res["encodings"].items():
        for key, label in names.items():
            st = r["stages"][key]
            lines.append(
                f"| {fmt} | {label} | {st['cpu_s']:.3f} | {st['block_events_per_s_cpu']:,.0f} "
                f"| {st['wall_s']:.3f} | {st['block_events_per_s_wall']:,.0f} |"
            )
    lines.append("")
    for fmt, r in res["encodings"].items():
        st = r["stages"]
        total = sum(st[p]["cpu_s"] for p in ("decode", "keys", "apply"))
        share = ", ".join(f"{p} {st[p]['cpu_s'] / total:.0%}" for p in ("decode", "keys", "apply"))
        lines.append(
            f"- {fmt}: {r['block_events']:,} block events in {r['events']:,} events "
            f"({r['payload_mb']} MB of payload), {r['index_writes']:,} index writes; "
            f"CPU share {share}; {r['e2e_us_per_batch_cpu']:.0f} us of CPU per batch end to end."
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
