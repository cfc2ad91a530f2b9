"""``kvmesh bench router``: what routing costs.

1. **Decision time** for a 2k-token chat prompt against a ``PrefixIndex`` holding 1M blocks
   over 64 replicas in 4 regions: tokenization (chat template + builtin tokenizer), block keys,
   view build, and the policy itself (every registered policy), p50/p99 each, in process.
2. **Added latency to TTFT**: one ``kvmesh sim-engine`` and one ``kvmesh router`` in front of
   it (subprocesses); requests alternate between the engine directly and the router, one at a
   time, so both see the same engine state; TTFT is the first content chunk of the stream.
3. **Throughput**: requests per second through the router against the same engine reached
   directly, each with ``--concurrency`` clients for ``--seconds``, side by side in one run
   (one token per request, so the engine is not the bottleneck it would otherwise be).

Figures are printed and written to ``results/router_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.progress import Bar
from crdt.prefix_index import PrefixIndex
from kvevents.keys import request_keys
from kvevents.tokenizers.base import BuiltinTokenizer
from mesh.policies import POLICIES, Policy, RegionView, Request, View, make_policy
from mesh.view import Dispatches, RegionRecord, ReplicaRecord, ViewBuilder
from sim.metrics import percentile
from sim.procs import Proc, free_ports, kvmesh_argv, wait_http

MODEL = "bench-model"


def summary_us(values: Sequence[float]) -> dict[str, float]:
    return {"p50_us": percentile(values, 50) * 1e6, "p99_us": percentile(values, 99) * 1e6}


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# -- 1. decision time ----------------------------------------------------------------------


def decision_bench(blocks: int, replicas: int, iterations: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    tok = BuiltinTokenizer()
    words = [f"w{i}" for i in range(5000)]
    names = [f"http://10.{i // 16}.0.{i % 16}:8000" for i in range(replicas)]
    regions = ["us", "eu", "asia", "sa"]
    region_of = {n: regions[i % len(regions)] for i, n in enumerate(names)}
    index = PrefixIndex()
    seqs = dict.fromkeys(names, 0)
    t_build = time.perf_counter()
    stored = 0
    base_texts: list[str] = []
    bar = Bar("indexing", blocks, "blocks")
    while stored < blocks:
        # A conversation-sized chain of about 2k tokens on one or two replicas.
        text = " ".join(rng.choice(words) for _ in range(1024))
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        keys = request_keys(ids, 16)
        if len(base_texts) < 64:
            base_texts.append(text)
        for name in rng.sample(names, rng.choice((1, 1, 2))):
            seqs[name] += 1
            index.store(name, (1, seqs[name]), keys)
            stored += len(keys)
        bar.update(stored)
    bar.close()
    build_s = time.perf_counter() - t_build
    # Move the long-lived index out of the collector's way, as a running router's would be.
    gc.collect()
    gc.freeze()

    # The request: an indexed conversation plus a new turn (so the match is partial).
    text = base_texts[7]
    messages = [{"role": "user", "content": text},
                {"role": "assistant", "content": " ".join(words[:60])},
                {"role": "user", "content": " ".join(rng.choice(words) for _ in range(40))}]
    ids = tok.encode(tok.apply_chat_template(messages))
    tokenize = timed(lambda: tok.encode(tok.apply_chat_template(messages)), iterations)
    # The same conversation's next turn, the earlier turns seen before (the prefix cache):
    # each iteration a different new turn, so only the earlier turns can hit.
    seen = BuiltinTokenizer()
    seen.encode_chat(messages[:2])
    turns = iter([[*messages[:2], {"role": "user", "content": " ".join(
        rng.choice(words) for _ in range(40))}] for _ in range(iterations)])
    tokenize_seen = timed(lambda: seen.encode_chat(next(turns)), iterations)
    keys_t = timed(lambda: request_keys(ids, 16), iterations)
    keys = request_keys(ids, 16)
    match = timed(lambda: index.match(keys), iterations)

    records = [
        ReplicaRecord(n, region_of[n], True, rng.randint(0, 4), rng.randint(0, 30),
                      rng.random() * 0.8, rng.random() * 0.5, rng.randint(0, 3), 4000.0)
        for n in names
    ]
    region_records = {r: RegionRecord(r, 0.05 + 0.05 * i, (f"http://router-{r}:8000",), 0)
                      for i, r in enumerate(regions[1:])}
    builder = ViewBuilder(region="us", dispatches=Dispatches(), records=lambda now: records,
                          regions=lambda now: region_records, prefix=index)
    view_t = timed(lambda: builder.build(0.0), iterations)
    view = builder.build(0.0)
    req = Request("bench", ids, keys, 16, "user-1", 64, 0.0)
    policies: dict[str, dict[str, float]] = {}
    for name in sorted(POLICIES):
        policy = make_policy(name)
        prng = random.Random(seed)

        def decide(p: Policy = policy, r: random.Random = prng) -> object:
            return p.decide(req, view, 0.0, r)

        policies[name] = summary_us(timed(decide, iterations))
    kvmesh = make_policy("kvmesh")
    total = timed(lambda: kvmesh.decide(
        Request("b", ids, request_keys(ids, 16), 16, None, 0, 0.0), builder.build(0.0), 0.0,
        rng), iterations)
    matched = max(index.match(keys).values(), default=0)
    return {
        "blocks_indexed": index.pair_count(),
        "replicas": replicas,
        "prompt_tokens": len(ids),
        "prompt_blocks": len(keys),
        "best_match_blocks": matched,
        "index_build_s": round(build_s, 2),
        "tokenize": summary_us(tokenize),
        "tokenize_turns_seen": summary_us(tokenize_seen),
        "block_keys": summary_us(keys_t),
        "index_match": summary_us(match),
        "view_build": summary_us(view_t),
        "policy_decide": policies,
        "keys_view_decide_kvmesh": summary_us(total),
    }


# -- 2 and 3. a router in front of a simulated engine ----------------------------------------


async def ttft(session: aiohttp.ClientSession, base: str, prompt: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if first is None and line.startswith(b"data: {") and b'"content":"' in line \
                    and b'"content":""' not in line:
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError("no content chunk")
    return first


async def rps(session: aiohttp.ClientSession, base: str, concurrency: int,
              seconds: float) -> float:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 1}
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            async with session.post(f"{base}/v1/chat/completions", json=body) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.monotonic() - t0)


async def proxy_bench(samples: int, concurrency: int, seconds: float, speedup: float,
                      seed: int, prepare_in: str = "process") -> dict[str, Any]:
    eport, rport = free_ports(2)
    engine_url, router_url = f"http://127.0.0.1:{eport}", f"http://127.0.0.1:{rport}"
    tmp = Path(tempfile.mkdtemp(prefix="kvmesh-bench-"))
    cfg = tmp / "router.yaml"
    cfg.write_text(f"region: us\nlisten: 127.0.0.1:{rport}\nengines: [{{url: {engine_url}}}]\n"
                   f"policy: kvmesh\nlog_level: warning\nprepare_in: {prepare_in}\n")
    engine = Proc("engine", kvmesh_argv("sim-engine", "--port", str(eport), "--model", MODEL,
                                        "--speedup", str(speedup), "--log-level", "WARNING"),
                  tmp / "engine.log")
    router = Proc("router", kvmesh_argv("router", "--config", str(cfg)), tmp / "router.log")
    rng = random.Random(seed)
    try:
        await engine.start()
        await router.start()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_http(session, f"{engine_url}/health", engine)
            await wait_http(session, f"{router_url}/ready", router)
            direct: list[float] = []
            routed: list[float] = []
            bar = Bar("TTFT pairs (engine, router)", samples + 10, "pairs")
            for i in range(samples + 10):
                prompt = " ".join(f"w{rng.randrange(5000)}" for _ in range(256))
                order = [(engine_url, direct), (router_url, routed)]
                if i % 2:
                    order.reverse()
                for base, out in order:
                    value = await ttft(session, base, prompt, 4)
                    if i >= 10:  # warm-up
                        out.append(value)
                bar.advance()
            bar.close()
            print(f"  throughput: {concurrency} clients for {seconds:g} s, engine then router",
                  file=sys.stderr, flush=True)
            added = [r - d for r, d in zip(routed, direct, strict=True)]
            rps_direct = await rps(session, engine_url, concurrency, seconds)
            rps_router = await rps(session, router_url, concurrency, seconds)
    finally:
        await asyncio.gather(router.stop(10.0), engine.stop(10.0))
    ms = 1000.0
    return {
        "samples": samples,
        "engine_speedup": speedup,
        "ttft_direct_ms": {"p50": percentile(direct, 50) * ms, "p99": percentile(direct, 99) * ms},
        "ttft_router_ms": {"p50": percentile(routed, 50) * ms, "p99": percentile(routed, 99) * ms},
        "added_ms": {"p50": (percentile(routed, 50) - percentile(direct, 50)) * ms,
                     "p99": (percentile(routed, 99) - percentile(direct, 99)) * ms,
                     "mean_paired": statistics.fmean(added) * ms},
        "concurrency": concurrency,
        "prepare_in": prepare_in,
        "rps_direct": rps_direct,
        "rps_router": rps_router,
    }


def markdown(res: dict[str, Any]) -> str:
    d = res["decision"]
    lines = [
        "# Router benchmark", "",
        f"Command: `{res['command']}`", "",
        f"## Decision time: {d['prompt_tokens']}-token prompt, {d['blocks_indexed']:,} indexed "
        f"blocks, {d['replicas']} replicas (best match {d['best_match_blocks']}/"
        f"{d['prompt_blocks']} blocks)", "",
        "| step | p50 (us) | p99 (us) |", "|---|---|---|",
    ]
    for step in ("tokenize", "tokenize_turns_seen", "block_keys", "index_match", "view_build",
                 "keys_view_decide_kvmesh"):
        lines.append(f"| {step} | {d[step]['p50_us']:.1f} | {d[step]['p99_us']:.1f} |")
    for name, v in d["policy_decide"].items():
        lines.append(f"| decide: {name} | {v['p50_us']:.1f} | {v['p99_us']:.1f} |")
    p = res.get("proxy")
    if p:
        lines += [
            "", f"## Router overhead ({p['samples']} alternating requests, engine speedup "
            f"{p['engine_speedup']:g})", "",
            "| | p50 (ms) | p99 (ms) |", "|---|---|---|",
            f"| TTFT direct | {p['ttft_direct_ms']['p50']:.2f} | "
            f"{p['ttft_direct_ms']['p99']:.2f} |",
            f"| TTFT via router | {p['ttft_router_ms']['p50']:.2f} | "
            f"{p['ttft_router_ms']['p99']:.2f} |",
            f"| added by the router | {p['added_ms']['p50']:.2f} | "
            f"{p['added_ms']['p99']:.2f} |",
            "", f"Mean of the paired differences: {p['added_ms']['mean_paired']:.2f} ms.",
            "", f"## Throughput ({p['concurrency']} clients, 1 output token)", "",
            f"- engine directly: {p['rps_direct']:.0f} req/s",
            f"- through one router process: {p['rps_router']:.0f} req/s",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench router", description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=200, help="TTFT pairs")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--speedup", type=float, default=100.0, help="simulated engine speedup")
    ap.add_argument("--skip-proxy", action="store_true", help="only the in-process part")
    ap.add_argument("--prepare-in", choices=["process", "thread"], default="process",
                    help="the router's prepare_in setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"command": "kvmesh bench router " + " ".join(argv)}
    print(f"decision time: indexing {args.blocks:,} blocks over {args.replicas} replicas ...",
          flush=True)
    res["decision"] = decision_bench(args.blocks, args.replicas, args.iterations, args.seed)
    if not args.skip_proxy:
        print("router overhead and throughput against a simulated engine ...", flush=True)
        res["proxy"] = asyncio.run(proxy_bench(args.samples, args.concurrency, args.seconds,
                                               args.speedup, args.seed, args.prepare_in))
    text = markdown(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_bench.json").write_text(json.dumps(res, indent=1))
    (out / "router_bench.md").write_text(text)
    print(f"written to {out / 'router_bench.json'} and {out / 'router_bench.md'}")
    return 0


__all__ = ["RegionView", "View", "main"]
