"""Real processes on loopback for the router integration tests: engines, routers, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sim.procs import free_ports

ROOT = Path(__file__).resolve().parents[2]
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESH_KEY = "router integration key, 32 bytes"


async def wait_until(
    cond: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            if await cond():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout:.0f}s")
        await asyncio.sleep(0.05)


@dataclass
class Engine:
    url: str
    kv_events: str
    replay: str


@dataclass
class Procs:
    """Every process a test starts; ``close`` stops them all (SIGTERM, then SIGKILL)."""

    workdir: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen([sys.executable, "-m", "cli", *argv], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             cwd=ROOT, start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        for n, p in self.procs:
            if n == name and p.poll() is None:
                p.send_signal(sig)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()

    def close(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        for _, p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def engine(self, name: str, speedup: float = 20.0, *extra: str) -> Engine:
        http, pub, replay = free_ports(3)
        eng = Engine(f"http://127.0.0.1:{http}", f"tcp://127.0.0.1:{pub}",
                     f"tcp://127.0.0.1:{replay}")
        self.start(name, ["sim-engine", "--port", str(http), "--model", MODEL,
                          "--speedup", str(speedup), "--kv-events-endpoint", eng.kv_events,
                          "--replay-endpoint", eng.replay, "--kv-events-mode", "bind",
                          "--log-level", "WARNING", *extra])
        return eng

    def router(self, name: str, config: dict[str, Any]) -> str:
        listen = config.get("listen") or f"127.0.0.1:{free_ports(1)[0]}"
        conf = {"node_id": name, "log_level": "info", "health_interval": 0.05, "seed": 1,
                **config, "listen": listen}
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(conf))
        self.start(name, ["router", "--config", str(path)])
        return f"http://{listen}"


@contextlib.contextmanager
def processes(workdir: Path) -> Iterator[Procs]:
    procs = Procs(workdir)
    try:
        yield procs
    finally:
        procs.close()


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
        return await resp.json(content_type=None)


async def healthy(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
        return resp.status == 200


async def sees_replicas(session: aiohttp.ClientSession, router: str, n: int) -> bool:
    status = await get_json(session, f"{router}/mesh/status")
    reps = status["routing"]["replicas"]
    return sum(1 for r in reps if r["healthy"]) >= n


async def index_blocks(session: aiohttp.ClientSession, router: str) -> dict[str, float]:
    """Blocks per replica in the router's merged prefix index (from /metrics)."""
    async with session.get(f"{router}/metrics") as resp:
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvmesh_index_blocks{"):
            labels, value = line.rsplit(" ", 1)
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
            out[replica] = float(value)
    return out


async def chat(
    session: aiohttp.ClientSession, base: str, messages: list[dict[str, str]],
    max_tokens: int = 16, stream: bool = False, headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], str]:
    """(status, response headers, reply text)."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    async with session.post(f"{base}/v1/chat/completions", json=body,
                            headers=headers or {}) as resp:
        raw = await resp.read()
        hdrs = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status != 200:
            return resp.status, hdrs, raw.decode(errors="replace")
    if not stream:
        import json

        return 200, hdrs, json.loads(raw)["choices"][0]["message"]["content"]
    text = []
    import json

    for event in raw.split(b"\n\n"):
        if event.startswith(b"data: {"):
            for ch in json.loads(event[6:]).get("choices") or []:
                text.append((ch.get("delta") or {}).get("content") or "")
    return 200, hdrs, "".join(text)


GOSSIP_LOCAL = {"profile": "local", "gossip_interval": 0.05}


def mesh_of(procs: Procs, replicas: dict[str, int], policy: str = "kvmesh",
            **extra: Any) -> tuple[dict[str, list[Engine]], dict[str, str]]:
    """One router per region over ``replicas[region]`` simulated engines, all peers of each
    other: (engines by region, router URL by region). Router ``router-<region>``, engine
    ``engine-<region>-<i>``."""
    ports = dict(zip(replicas, free_ports(len(replicas)), strict=True))
    peers = [f"http://127.0.0.1:{p}" for p in ports.values()]
    engines = {r: [procs.engine(f"engine-{r}-{i}") for i in range(n)]
               for r, n in replicas.items()}
    routers = {}
    for region, engs in engines.items():
        routers[region] = procs.router(f"router-{region}", {
            "region": region, "policy": policy, "peers": peers, "mesh_key": MESH_KEY,
            "gossip": GOSSIP_LOCAL, "listen": f"127.0.0.1:{ports[region]}",
            "engines": [{"url": e.url, "kv_events": e.kv_events, "replay": e.replay}
                        for e in engs], **extra})
    return engines, routers


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=2)) as resp:
        return resp.status == 200
