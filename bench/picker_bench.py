"""``kvmesh bench picker``: kvmesh as a gateway endpoint picker behind a real Envoy.

One rig (``bench.picker_rig``): ``--engines`` ``kvmesh sim-engine`` processes, one router
serving both its HTTP proxy and the ext_proc endpoint picker, one Envoy with a picker
listener and a plain round-robin listener over the same engines.

1. **Added latency**: the same request shapes (unique prompts, so no cache reuse on any
   path) go one at a time, in rotating order, to Envoy round-robin alone, to Envoy asking
   kvmesh, and (for reference) to the kvmesh HTTP proxy itself; the client times TTFT (first
   content chunk of the stream) and the whole response. Side by side: p50/p99 of each path
   and their difference to Envoy alone.
2. **Decision quality**: one multi-turn chat workload (sessions sharing system prompts,
   follow-up turns) is played three times, each with its own tokens (a phase tag leads every
   prompt, so the phases share no cache): through Envoy round-robin, through Envoy + the
   kvmesh picker, and through the kvmesh HTTP proxy. Hit rate is the engines' own
   ``vllm:prefix_cache_hits / queries`` over the phase (what the engines really reused).

Figures are printed and written to ``results/picker_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from bench.picker_rig import MODEL, Gateway, http_ok, picker_healthy_at_envoy, wait_for


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def ms(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 0.5) * 1e3, 3), "p99_ms": round(pct(values, 0.99) * 1e3, 3),
            "mean_ms": round(sum(values) / len(values) * 1e3, 3)}


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(4000)}" for _ in range(n))


async def stream_once(s: aiohttp.ClientSession, base: str, messages: list[dict[str, str]],
                      max_tokens: int) -> tuple[float, float, str]:
    """(TTFT, total, reply text) of one streamed chat completion."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first = None
    text: list[str] = []
    async with s.post(f"{base}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{base}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: {"):
                    continue
                for ch in json.loads(event[6:]).get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") or ""
                    if piece and first is None:
                        first = time.perf_counter() - t0
                    text.append(piece)
    total = time.perf_counter() - t0
    return (first if first is not None else total), total, "".join(text)


async def latency(s: aiohttp.ClientSession, paths: dict[str, str], samples: int,
                  prompt_words: int, max_tokens: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ttft: dict[str, list[float]] = {k: [] for k in paths}
    total: dict[str, list[float]] = {k: [] for k in paths}
    for base in paths.values():  # warm connections on every path
        await stream_once(s, base, [{"role": "user", "content": "warm up"}], 2)
    items = list(paths.items())
    for i in range(samples):
        order = items[i % len(items):] + items[:i % len(items)]  # rotate who goes first
        for name, base in order:
            msg = [{"role": "user", "content": words(rng, prompt_words)}]
            t, tot, _ = await stream_once(s, base, msg, max_tokens)
            ttft[name].append(t)
            total[name].append(tot)
    out: dict[str, Any] = {k: {"ttft": ms(ttft[k]), "total": ms(total[k])} for k in paths}
    base_name, *others = list(paths)
    out["added"] = {other: {
        f"ttft_{q}_ms": round(out[other]["ttft"][f"{q}_ms"] - out[base_name]["ttft"][f"{q}_ms"], 3)
        for q in ("p50", "p99")} for other in others}
    return out


def engine_cache(urls: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    for u in urls:
        with urllib.request.urlopen(f"{u}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def workload(s: aiohttp.ClientSession, base: str, tag: str, sessions: int, turns: int,
                   systems: int, concurrency: int, seed: int) -> dict[str, Any]:
    """Multi-turn chats; every prompt starts with ``tag`` so phases never share a prefix."""
    rng = random.Random(seed)
    prompts = [f"{tag} system prompt {k}: " + words(rng, 400) for k in range(systems)]
    plans = [(prompts[i % systems], [words(rng, 40) for _ in range(turns)])
             for i in range(sessions)]
    queue: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
    for p in plans:
        queue.put_nowait(p)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        while not queue.empty():
            system, users = queue.get_nowait()
            messages = [{"role": "system", "content": system}]
            for u in users:
                messages.append({"role": "user", "content": u})
                try:
                    _, _, reply = await stream_once(s, base, messages, 16)
                except (RuntimeError, aiohttp.ClientError):
                    errors += 1
                    break
                messages.append({"role": "assistant", "content": reply})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": sessions * turns, "errors": errors,
            "seconds": round(time.perf_counter() - t0, 2)}


async def run(args: argparse.Namespace, g: Gateway) -> dict[str, Any]:
    urls = [g.engine(f"engine-{i}", args.speedup, "--num-gpu-blocks", str(args.gpu_blocks))
            for i in range(args.engines)]
    g.start_router("router", g.router_config("router", {}, log_level="warning",
                                             policy=args.policy))
    lis = g.envoy()
    for u in urls:
        wait_for(lambda u=u: http_ok(f"{u}/health"), 60, f"{u} up")
    wait_for(lambda: http_ok(f"{g.router}/ready"), 60, "router ready")
    wait_for(lambda: http_ok(f"{lis['admin']}/ready"), 60, "envoy ready")
    wait_for(lambda: picker_healthy_at_envoy(lis["admin"]) is True, 60, "picker healthy")
    res: dict[str, Any] = {"engines": args.engines, "speedup": args.speedup,
                           "policy": args.policy}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        res["latency"] = await latency(
            s, {"envoy_round_robin": lis["rr"], "envoy_kvmesh_picker": lis["closed"],
                "kvmesh_http_proxy": g.router},
            args.samples, args.prompt_words, args.max_tokens, args.seed)
        quality: dict[str, Any] = {}
        for phase, base in (("envoy_round_robin", lis["rr"]),
                            ("envoy_kvmesh_picker", lis["closed"]),
                            ("kvmesh_http_proxy", g.router)):
            h0, q0 = await asyncio.to_thread(engine_cache, urls)
            r = await workload(s, base, phase, args.sessions, args.turns, args.systems,
                               args.concurrency, args.seed)
            h1, q1 = await asyncio.to_thread(engine_cache, urls)
            r["hit_rate"] = round((h1 - h0) / (q1 - q0), 4) if q1 > q0 else 0.0
            quality[phase] = r
        quality["picker_minus_proxy_points"] = round(
            100 * (quality["envoy_kvmesh_picker"]["hit_rate"]
                   - quality["kvmesh_http_proxy"]["hit_rate"]), 2)
        res["quality"] = quality
    return res


def markdown(res: dict[str, Any]) -> str:
    lat = res["latency"]
    lines = [f"# kvmesh bench picker ({res['engines']} sim engines, speedup {res['speedup']}, "
             f"policy {res['policy']})", "", "## Added latency (streamed chat, unique prompts)",
             "", "| path | TTFT p50 ms | TTFT p99 ms | total p50 ms | total p99 ms |",
             "|---|---|---|---|---|"]
    for k in ("envoy_round_robin", "envoy_kvmesh_picker", "kvmesh_http_proxy"):
        v = lat[k]
        lines.append(f"| {k} | {v['ttft']['p50_ms']} | {v['ttft']['p99_ms']} | "
                     f"{v['total']['p50_ms']} | {v['total']['p99_ms']} |")
    added = lat["added"]["envoy_kvmesh_picker"]
    proxy = lat["added"]["kvmesh_http_proxy"]
    lines += ["", f"TTFT added over Envoy round-robin alone: picker p50 {added['ttft_p50_ms']} ms, "
              f"p99 {added['ttft_p99_ms']} ms; kvmesh HTTP proxy (instead of Envoy) p50 "
              f"{proxy['ttft_p50_ms']} ms, p99 {proxy['ttft_p99_ms']} ms.", "",
              "## Decision quality (same multi-turn workload, engines' own prefix-cache hits)",
              "", "| path | requests | errors | seconds | engine hit rate |",
              "|---|---|---|---|---|"]
    q = res["quality"]
    for k in ("envoy_round_robin", "envoy_kvmesh_picker", "kvmesh_http_proxy"):
        v = q[k]
        lines.append(f"| {k} | {v['requests']} | {v['errors']} | {v['seconds']} | "
                     f"{v['hit_rate']:.2%} |")
    lines += ["", f"Picker minus HTTP proxy: {q['picker_minus_proxy_points']} points."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kvmesh bench picker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--speedup", type=float, default=20.0)
    ap.add_argument("--gpu-blocks", type=int, default=4096, help="KV blocks per engine")
    ap.add_argument("--policy", default="kvmesh")
    ap.add_argument("--samples", type=int, default=200, help="latency samples per path")
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=48)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--systems", type=int, default=8, help="distinct shared system prompts")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results", help="output folder")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvmesh-picker-bench-") as tmp:
        g = Gateway(Path(tmp))
        try:
            res = asyncio.run(run(args, g))
        except (RuntimeError, TimeoutError) as exc:
            print(f"kvmesh bench picker: {exc}", file=sys.stderr)
            for name, _ in g.procs:
                print(f"--- {name}\n{g.log(name)[-2000:]}", file=sys.stderr)
            return 1
        finally:
            g.close()
    text = markdown(res)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "picker_bench.json").write_text(json.dumps(res, indent=1))
    (out / "picker_bench.md").write_text(text)
    return 0
