"""``kvmesh demo``: a local 3-region mesh on loopback, one workload, three policies, one table.

What runs (all subprocesses on 127.0.0.1, free ports):

- per region (us, eu, asia): two ``kvmesh sim-engine`` processes (vLLM-compatible HTTP and
  ZMQ KV events, timing from the L4 / Llama-3.1-8B profile divided by ``--speedup``) and one
  ``kvmesh router`` that subscribes to its engines' events and gossips with the other two;
- the processes are :class:`sim.localmesh.LocalMesh`'s (this is one scenario on it);
- inter-region round trips are added in user space by the routers (config ``emulate_rtt``):
  a request forwarded into a region is held by the router there that long before it is
  decided, which is what a real round trip costs before the first byte. The routers' cost
  models are told the same figures. Gossip between routers is not delayed.

Then, per policy (round_robin, skylb, kvmesh by default): engine caches are reset, three
fresh routers start with that policy, closed-loop chat clients in every region (more in us:
its two engines are the busiest) hold multi-turn conversations through their own region's
router for ``--duration`` seconds, and the routers stop. The table compares time to first
token, throughput, the engines' prefix-cache hit rate and cross-region forwards.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sim.localmesh import MODEL, LocalFleetSpec, LocalMesh, prefill_rate
from sim.metrics import percentile
from sim.profiles import DEFAULT_PROFILE
from sim.topology import Link

REGIONS = ("us", "eu", "asia")
RTT_MS: Mapping[tuple[str, str], float] = {
    ("us", "eu"): 80.0, ("us", "asia"): 150.0, ("eu", "asia"): 200.0,
}
_WORD_TEXT = (
    "the of and to in is that for it as was with be by on not this are or from at which "
    "but have an they you were one all we their has would when if so no what up out some "
    "into more time could other than then now only its about over also new these two may "
    "first any like our well way even because most through where much down good make many "
    "before must such long great just know see after take every place little world cache "
    "block route region engine token prefix model request replica mesh gossip latency "
    "question answer explain compare design system memory network queue budget deploy"
)
WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class DemoConfig:
    policies: tuple[str, ...] = ("round_robin", "skylb", "kvmesh")
    duration: float = 20.0
    """Seconds of traffic per policy."""
    speedup: float = 10.0
    clients: Mapping[str, int] = field(
        default_factory=lambda: {"us": 10, "eu": 4, "asia": 4}
    )
    engines_per_region: int = 2
    rtt_scale: float = 1.0
    """Multiplies every inter-region round trip (e.g. 1/speedup to compress the network too)."""
    max_tokens: int = 48
    seed: int = 0
    workdir: str | None = None
    keep_workdir: bool = False
    progress: bool = True


# -- the mesh ----------------------------------------------------------------------------


def rtt_s(a: str, b: str, scale: float) -> float:
    if a == b:
        return 0.0
    ms = RTT_MS.get((a, b)) or RTT_MS.get((b, a)) or 100.0
    return ms * scale / 1000.0


def mesh_spec(cfg: DemoConfig) -> LocalFleetSpec:
    """The demo's fleet: every region the same, no in-region delay, routers on LAN gossip."""
    return LocalFleetSpec(
        regions=REGIONS,
        replicas=dict.fromkeys(REGIONS, cfg.engines_per_region),
        profile=DEFAULT_PROFILE,
        speedup=cfg.speedup,
        intra=Link(0.0, 0.0),
        inter_rtt_s={(a, b): rtt_s(a, b, cfg.rtt_scale)
                     for a in REGIONS for b in REGIONS if a != b},
        seed=cfg.seed,
        gossip_profile="lan",
        model=MODEL,
    )


def policy_params(cfg: DemoConfig, policy: str) -> dict[str, object]:
    """The cost models are told the engines' prefill rate at this speedup."""
    if policy in {"kvmesh", "gorgo"}:
        return {"prefill_rate": round(prefill_rate(DEFAULT_PROFILE, cfg.speedup), 1)}
    return {}


# -- the workload -------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass(slots=True)
class Sample:
    region: str
    policy: str
    ttft: float
    latency: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    replica: str
    served_region: str
    ok: bool


@dataclass(slots=True)
class RunState:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0
    stop_at: float = 0.0


async def chat_turn(
    session: aiohttp.ClientSession, router: str, messages: list[dict[str, str]], user: str,
    max_tokens: int, region: str, policy: str,
) -> tuple[Sample, str]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = math.nan
    parts: list[str] = []
    usage: dict[str, Any] = {}
    async with session.post(f"{router}/v1/chat/completions", json=body,
                            headers={"x-session-id": user}) as resp:
        replica = resp.headers.get("x-kvmesh-replica", "?")
        served = resp.headers.get("x-kvmesh-region", "?")
        if resp.status != 200:
            await resp.read()
            return Sample(region, policy, math.nan, math.nan, 0, 0, 0, replica, served,
                          False), ""
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: ") or event == b"data: [DONE]":
                    continue
                data = json.loads(event[6:])
                for ch in data.get("choices") or []:
                    text = (ch.get("delta") or {}).get("content") or ""
                    if text:
                        if math.isnan(ttft):
                            ttft = time.perf_counter() - t0
                        parts.append(text)
                if data.get("usage"):
                    usage = data["usage"]
    latency = time.perf_counter() - t0
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0
    sample = Sample(region, policy, ttft, latency, int(usage.get("prompt_tokens", 0)),
                    int(cached), int(usage.get("completion_tokens", 0)), replica, served,
                    not math.isnan(ttft))
    return sample, "".join(parts)


async def client_loop(
    session: aiohttp.ClientSession, router: str, region: str, cid: int, policy: str,
    cfg: DemoConfig, state: RunState,
) -> None:
    rng = random.Random(f"{cfg.seed}/{region}/{cid}")
    user = f"{region}-user-{cid}"
    system = f"You are assistant {cid} of {region}. " + words(rng, rng.randint(150, 350))
    conv = 0
    await asyncio.sleep(rng.uniform(0, 0.5))
    while time.monotonic() < state.stop_at:
        conv += 1
        messages = [{"role": "system", "content": system}]
        for _turn in range(rng.randint(3, 6)):
            if time.monotonic() >= state.stop_at:
                return
            messages.append({"role": "user", "content": words(rng, rng.randint(20, 90))})
            try:
                sample, reply = await chat_turn(session, router, messages, user,
                                                cfg.max_tokens, region, policy)
            except (aiohttp.ClientError, TimeoutError, ValueError):
                state.errors += 1
                break
            if not sample.ok:
                state.errors += 1
                break
            state.samples.append(sample)
            messages.append({"role": "assistant", "content": reply})


# -- reporting ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    requests: int
    errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    throughput_rps: float
    output_tokens_per_s: float
    prefix_hit_rate: float
    cross_region_forwards: int
    served_elsewhere: float
    """Share of requests served outside the client's region."""
    converged: bool


def summarize(policy: str, state: RunState, duration: float, forwards: float,
              converged: bool) -> PolicyResult:
    ok = [s for s in state.samples if s.ok]
    ttfts = [s.ttft for s in ok]
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached_tokens for s in ok)
    away = sum(1 for s in ok if s.served_region not in {s.region, "?"})
    return PolicyResult(
        policy=policy,
        requests=len(ok),
        errors=state.errors,
        ttft_p50_ms=percentile(ttfts, 50) * 1000,
        ttft_p90_ms=percentile(ttfts, 90) * 1000,
        throughput_rps=len(ok) / duration,
        output_tokens_per_s=sum(s.output_tokens for s in ok) / duration,
        prefix_hit_rate=cached / prompt if prompt else 0.0,
        cross_region_forwards=int(forwards),
        served_elsewhere=away / len(ok) if ok else 0.0,
        converged=converged,
    )


def table(results: Sequence[PolicyResult], cfg: DemoConfig) -> Table:
    t = Table(
        title=f"3 regions x {cfg.engines_per_region} simulated engines, {cfg.duration:.0f} s "
        f"per policy, speedup {cfg.speedup:g}",
        caption="TTFT measured at the clients; cache hit: share of prompt tokens the engines "
        "found cached; forwards: requests sent one hop to another region's router",
    )
    t.add_column("policy", no_wrap=True)
    for col in ("requests", "TTFT p50", "TTFT p90", "req/s", "cache hit", "forwards",
                "errors"):
        t.add_column(col, justify="right", no_wrap=True)
    best = min((r.ttft_p50_ms for r in results if r.requests), default=math.nan)
    for r in results:
        style = "bold green" if r.ttft_p50_ms == best else ""
        t.add_row(r.policy, str(r.requests), f"{r.ttft_p50_ms:.0f} ms",
                  f"{r.ttft_p90_ms:.0f} ms", f"{r.throughput_rps:.1f}",
                  f"{r.prefix_hit_rate:.1%}", str(r.cross_region_forwards), str(r.errors),
                  style=style)
    return t


def write_results(results: Sequence[PolicyResult], cfg: DemoConfig, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.json"
    path.write_text(json.dumps({"config": {k: v for k, v in asdict(cfg).items()},
                                "results": [asdict(r) for r in results]}, indent=1,
                               default=str))
    lines = ["| policy | requests | TTFT p50 ms | TTFT p90 ms | req/s | prefix hit | forwards |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.policy} | {r.requests} | {r.ttft_p50_ms:.0f} | {r.ttft_p90_ms:.0f}"
                     f" | {r.throughput_rps:.1f} | {r.prefix_hit_rate:.1%} |"
                     f" {r.cross_region_forwards} |")
    (out_dir / "demo.md").write_text("\n".join(lines) + "\n")
    return path


# -- main ---------------------------------------------------------------------------------


async def run_policy(mesh: LocalMesh, session: aiohttp.ClientSession, policy: str, cfg: DemoConfig,
                     progress: Progress | None) -> PolicyResult:
    await mesh.reset_engines(session)
    await mesh.start_routers(session, policy, policy_params(cfg, policy), policy)
    converged = await mesh.wait_converged(session, timeout=0.1)
    state = RunState(stop_at=time.monotonic() + cfg.duration)
    task_id = progress.add_task(f"{policy:12s}", total=cfg.duration) if progress else None
    clients = [
        asyncio.create_task(client_loop(session, mesh.router_urls[region], region, i, policy,
                                        cfg, state))
        for region in REGIONS for i in range(cfg.clients.get(region, 0))
    ]
    started = time.monotonic()
    try:
        while any(not c.done() for c in clients):
            await asyncio.sleep(0.25)
            if progress is not None and task_id is not None:
                ok = [s.ttft for s in state.samples if s.ok]
                p50 = percentile(ok, 50) * 1000 if ok else math.nan
                progress.update(task_id, completed=min(cfg.duration, time.monotonic() - started),
                                description=f"{policy:12s} {len(ok):4d} req  p50 TTFT "
                                            f"{p50:5.0f} ms")
        for c in clients:
            c.result()
    finally:
        for c in clients:
            c.cancel()
        forwards = await mesh.router_metric(session, "kvmesh_router_forwards_total")
        await mesh.stop_routers()
    if progress is not None and task_id is not None:
        progress.update(task_id, completed=cfg.duration)
    return summarize(policy, state, time.monotonic() - started, forwards, converged)


async def run(cfg: DemoConfig, console: Console | None = None) -> list[PolicyResult]:
    console = console or Console()
    workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="kvmesh-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = LocalMesh(mesh_spec(cfg), workdir)
    results: list[PolicyResult] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    failed = False
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            console.print(f"[bold]kvmesh demo[/bold]: starting {len(REGIONS)} regions x "
                          f"{cfg.engines_per_region} simulated engines (logs in {workdir})")
            await mesh.start_engines(session)
            progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                TimeElapsedColumn(), console=console,
                                disable=not cfg.progress)
            with progress:
                for policy in cfg.policies:
                    results.append(await run_policy(mesh, session, policy, cfg, progress))
        except BaseException:
            failed = True
            raise
        finally:
            await mesh.stop()
            if (cfg.keep_workdir or failed) and not cfg.workdir:
                console.print(f"logs kept in {workdir}")
            elif not cfg.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
    console.print(table(results, cfg))
    for r in results:
        if not r.converged:
            console.print(f"[yellow]note: under {r.policy} the routers had not all seen every "
                          "replica when traffic started[/yellow]")
    return results


def main(cfg: DemoConfig) -> int:
    # A pipe or a CI log has no width: give the table room instead of truncating it.
    console = Console() if sys.stdout.isatty() else Console(width=110)
    try:
        results = asyncio.run(run(cfg, console))
    except KeyboardInterrupt:
        console.print("interrupted; everything was stopped")
        return 130
    except RuntimeError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    path = write_results(results, cfg, Path(os.environ.get("KVMESH_RESULTS", "results")))
    console.print(f"results written to {path}")
    return 0 if all(r.requests > 0 for r in results) else 1


__all__ = ["DemoConfig", "PolicyResult", "main", "run"]
