"""``kvmesh bench worker-link``: what a worker process pays to ask its primary, beside what
deciding locally would cost it, in one run.

A router node with several processes decides in one of them (``mesh/workers.py``); a worker
sends each request's tokens and keys over a Unix socket and waits for the placement. The
alternative is that every worker decides itself from a shared snapshot of the mesh state.
This measures both sides of that choice:

1. **the hop**: a ``place`` call of a real request (its token ids and keys, as the worker
   sends them) to a primary in another process that decodes it and answers a placement, p50
   and p99 one call at a time, and calls per second with 32 outstanding;
2. **the decision it carries**: keys + view + the kvmesh policy for a 2k-token chat prompt
   against ``--blocks`` blocks over ``--replicas`` replicas (``kvmesh bench router``'s
   in-process measurement), which a locally deciding worker would run itself.

Figures are printed and written to ``results/worker_link.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.router_bench import decision_bench, summary_us
from kvevents.block_sizes import sized_request_keys
from kvevents.tokenizers.base import BuiltinTokenizer
from mesh.dispatch import Ask
from mesh.policies.base import Request
from mesh.worker_link import connect
from mesh.workers import WorkerKeys, ask_wire, placement_of

PRIMARY = """
import asyncio, sys
from mesh.dispatch import Placement, Target
from mesh.policies.base import Decision
from mesh.worker_link import LinkServer
from mesh.workers import placement_wire, tokens_of, worker_keys

ANSWER = placement_wire(Placement(Decision("http://e1", "us", "best ttft", "kvmesh",
                        matched_blocks=3, total_blocks=9),
                        Target("http://e1", "http://e1", "us", True), "local", 0.01),
                        16, 16, (48, 6, False), 1)

async def handle(link, op, body):
    wire = body[1]
    tokens_of(wire[1])
    worker_keys(wire[6], 0)
    return ANSWER

async def main():
    server = LinkServer(sys.argv[1], handle)
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def ask_for(messages: list[dict[str, str]]) -> tuple[Ask, int]:
    tok = BuiltinTokenizer()
    ids = tok.encode(tok.apply_chat_template(messages))
    keys = WorkerKeys(sized_request_keys(ids, (16,)), (16,), None, None, None)
    return Ask(Request("bench", ids, keys, 16, None, 16, 0.0, "bench-model")), len(ids)


async def hop_bench(asks: dict[str, Ask], calls: int, seconds: float) -> dict[str, Any]:
    folder = tempfile.mkdtemp(prefix="kvmesh-link-bench-")
    path = os.path.join(folder, "link.sock")
    root = str(Path(__file__).resolve().parents[1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRIMARY, path, stdout=asyncio.subprocess.PIPE, cwd=root,
        env={**os.environ, "PYTHONPATH": root})
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 60)
        link = await connect(path)
        out: dict[str, Any] = {}
        for name, ask in asks.items():
            for _ in range(200):  # warm up
                placement_of(await link.call("place", [0, ask_wire(ask)]))
            one = []
            for _ in range(calls):
                t = time.perf_counter()
                placement_of(await link.call("place", [0, ask_wire(ask)]))
                one.append(time.perf_counter() - t)
            lat: list[float] = []
            end = time.perf_counter() + seconds

            async def loop(a: Ask = ask, end: float = end, lat: list[float] = lat) -> None:
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    placement_of(await link.call("place", [0, ask_wire(a)]))
                    lat.append(time.perf_counter() - t)

            t0 = time.perf_counter()
            await asyncio.gather(*(loop() for _ in range(32)))
            out[name] = {"one_at_a_time": summary_us(one),
                         "c32": {**summary_us(lat),
                                 "calls_per_s": len(lat) / (time.perf_counter() - t0)}}
        await link.close()
        return out
    finally:
        proc.kill()
        await proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def markdown(res: dict[str, Any]) -> str:
    d = res["decision"]
    lines = ["# A worker's hop to its primary, beside deciding locally", "",
             f"Command: `{res['command']}`", "",
             "| what | p50 µs | p99 µs | calls/s (32 outstanding) |", "|---|---|---|---|"]
    for name, h in res["hop"].items():
        one, c32 = h["one_at_a_time"], h["c32"]
        lines.append(f"| place hop, {name}: one at a time | {one['p50_us']:.1f} | "
                     f"{one['p99_us']:.1f} | - |")
        lines.append(f"| place hop, {name}: 32 outstanding | {c32['p50_us']:.1f} | "
                     f"{c32['p99_us']:.1f} | {c32['calls_per_s']:.0f} |")
    k = d["keys_view_decide_kvmesh"]
    lines += [f"| keys + view + kvmesh decide, {d['prompt_tokens']} tokens, "
              f"{d['blocks_indexed']:,} blocks x {d['replicas']} replicas | {k['p50_us']:.1f} "
              f"| {k['p99_us']:.1f} | - |",
              f"| view build alone | {d['view_build']['p50_us']:.1f} | "
              f"{d['view_build']['p99_us']:.1f} | - |", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench worker-link",
                                 description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    args = ap.parse_args(argv)
    words = " ".join(f"w{(i * 7919) % 5000}" for i in range(200))
    long_text = " ".join(f"w{(i * 104729) % 5000}" for i in range(1024))
    asks = {}
    for label, messages in (("200-word prompt", [{"role": "user", "content": words}]),
                            ("1024-word prompt", [{"role": "user", "content": long_text}])):
        ask, n = ask_for(messages)
        asks[f"{label} ({n} tokens)"] = ask
    res: dict[str, Any] = {"command": "kvmesh bench worker-link " + " ".join(argv)}
    print("the hop: place calls to a primary process ...", flush=True)
    res["hop"] = asyncio.run(hop_bench(asks, args.calls, args.seconds))
    print(f"the decision: indexing {args.blocks:,} blocks over {args.replicas} replicas ...",
          flush=True)
    res["decision"] = decision_bench(args.blocks, args.replicas, args.iterations, args.seed)
    text = markdown(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "worker_link.json").write_text(json.dumps(res, indent=1))
    (out / "worker_link.md").write_text(text)
    print(f"written to {out / 'worker_link.json'} and {out / 'worker_link.md'}")
    return 0



