"""Real kvmesh processes for one fleet on 127.0.0.1: engines, delay gateways, routers.

The emulation (``sim/emulation.py``) runs a scenario's fleet as the processes a deployment
would run: one ``kvmesh sim-engine`` per replica (the scenario's profile at ``--speedup``),
one ``kvmesh router`` per region, and ``kvmesh netdelay`` gateways that hold every byte of
a path for half its round trip. Which hops are delayed, and how:

- router -> own engines (HTTP, KV events, replay) through one gateway with the region's
  in-region round trip, when that is at least ``min_delay_ms`` (below it, a direct loopback
  hop is nearer the link than a gateway: see :data:`MIN_DELAY_MS`);
- router -> router forwards by the routers' own ``emulate_rtt`` (the router a forward goes
  to holds it for the round trip before deciding): a router has one advertised address, so
  a per-pair proxy cannot sit on that path. Gossip between routers is not delayed;
- client -> router through gateways the load generator opens (``open_gateway``).

Process handling is :mod:`sim.procs`; ``kvmesh demo`` (:mod:`sim.demo`) is one scenario on
this module. Every process started here is stopped by ``stop``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from sim.procs import Proc, free_ports, kvmesh_argv, wait_http, wait_listening
from sim.profiles import get_profile
from sim.topology import Link

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MIN_DELAY_MS = 2.0
"""Round trips below this go direct, not through a ``kvmesh netdelay`` gateway. A gateway's
pass costs more than such a link: its timers wake on whole milliseconds and the pass adds a
process wake-up, so at 1.5 ms (region-sweep, in region) a router -> engine hop took 2.4 ms
one way at the median in an emulated run (0.75 ms configured), and 0.7 ms without it."""
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class LocalFleetSpec:
    """What to start. Times are real seconds (already divided by any speedup)."""

    regions: tuple[str, ...]
    replicas: Mapping[str, int]
    profile: str
    speedup: float
    intra: Link
    """In-region round trip (ms): router -> engine hops."""
    inter_rtt_s: Mapping[tuple[str, str], float]
    """Mean round trip between two regions, both orders present (router forwards)."""
    seed: int = 0
    min_delay_ms: float = MIN_DELAY_MS
    gossip_profile: str = "wan"
    model: str = MODEL

    def rtt_s(self, a: str, b: str) -> float:
        return 0.0 if a == b else self.inter_rtt_s[(a, b)]


@dataclass(frozen=True, slots=True)
class LocalEngine:
    name: str
    """``<region>-e<i>``, the simulator's replica name."""
    region: str
    url: str
    """The address routers use (the gateway's when the in-region hop is delayed); the
    replica id routers report in ``x-kvmesh-replica``."""
    direct_url: str
    kv_events: str
    replay: str


@dataclass(frozen=True, slots=True)
class Gateway:
    """One ``kvmesh netdelay`` process: every route has the same link."""

    name: str
    link: Link
    routes: tuple[tuple[int, int], ...]
    """(listen port, target port) on 127.0.0.1."""
    proc: Proc


def link_rtt_ms(link: Link) -> float:
    """The round trip a gateway holds for ``link``: its mean, without jitter.

    The simulator draws one delay per message in ``[lo, hi]``; netdelay draws its jitter per
    chunk and never releases a chunk before the one read before it, so a request or a
    stream cut into several chunks would wait for the largest of several draws, a delay
    biased towards ``hi``. A fixed mean keeps every mean right (only the spread is lost).
    """
    return link.mean_ms


def prefill_rate(profile: str, speedup: float) -> float:
    """Prefill tokens/s of the profile at this speedup (what routers' cost models are told)."""
    p = get_profile(profile)
    return 1024 / p.prefill_time(1024) * speedup


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU seconds a live process has used (0 once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


class LocalMesh:
    """Engines (started once), gateways and, per variant, routers."""

    def __init__(self, spec: LocalFleetSpec, workdir: Path) -> None:
        self.spec = spec
        self.workdir = workdir
        self.engines: list[LocalEngine] = []
        self.engine_procs: list[Proc] = []
        self.gateways: list[Gateway] = []
        self.router_procs: dict[str, Proc] = {}
        self.router_urls: dict[str, str] = {}
        self.mesh_key = "emu-" + "".join(random.Random(spec.seed).choices("abcdef0123456789", k=32))
        self._engine_gateway: Gateway | None = None

    # -- engines ----------------------------------------------------------------------------
    async def start_engines(self, session: aiohttp.ClientSession) -> None:
        spec = self.spec
        names = [
            (region, i) for region in spec.regions for i in range(spec.replicas.get(region, 0))
        ]
        ports = free_ports(3 * len(names))
        delayed = spec.intra.mean_ms >= spec.min_delay_ms
        gw_ports = free_ports(3 * len(names)) if delayed else []
        routes: list[tuple[int, int]] = []
        for k, (region, i) in enumerate(names):
            http, pub, rep = ports[3 * k : 3 * k + 3]
            direct = f"http://127.0.0.1:{http}"
            url, ev, rp = direct, f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}"
            if delayed:
                g_http, g_pub, g_rep = gw_ports[3 * k : 3 * k + 3]
                routes += [(g_http, http), (g_pub, pub), (g_rep, rep)]
                url = f"http://127.0.0.1:{g_http}"
                ev, rp = f"tcp://127.0.0.1:{g_pub}", f"tcp://127.0.0.1:{g_rep}"
            name = f"{region}-e{i}"
            self.engines.append(LocalEngine(name, region, url, direct, ev, rp))
            self.engine_procs.append(
                Proc(
                    f"engine {name}",
                    kvmesh_argv(
                        "sim-engine",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(http),
                        "--model",
                        spec.model,
                        "--profile",
                        spec.profile,
                        "--speedup",
                        f"{spec.speedup:g}",
                        "--seed",
                        str(spec.seed + k),
                        "--kv-events-endpoint",
                        f"tcp://127.0.0.1:{pub}",
                        "--replay-endpoint",
                        f"tcp://127.0.0.1:{rep}",
                        "--kv-events-mode",
                        "bind",
                        "--log-level",
                        "WARNING",
                    ),
                    self.workdir / f"engine-{name}.log",
                )
            )
        await asyncio.gather(*(p.start() for p in self.engine_procs))
        await asyncio.gather(
            *(
                wait_http(session, f"{e.direct_url}/health", p, timeout=60)
                for e, p in zip(self.engines, self.engine_procs, strict=True)
            )
        )
        if delayed:
            self._engine_gateway = await self.open_gateway("engines", spec.intra, routes)
            await asyncio.gather(
                *(
                    wait_http(session, f"{e.url}/health", self._engine_gateway.proc)
                    for e in self.engines
                )
            )

    async def reset_engines(self, session: aiohttp.ClientSession) -> None:
        """Start every engine afresh (``restart_engine``: an empty cache, KV-event seqs from 0,
        as a new process), so each variant starts cold, as in the simulator.

        A cache reset alone is not enough: the engines keep one KV-event stream across
        variants, and once it is longer than their replay buffer (10,000 batches, a few
        minutes of a busy engine) a fresh router joining it cannot replay it from seq 0,
        flags the engine ``partial`` (``mesh.selfcheck``) and serves it by load, without
        its prefix cache: later variants of a sweep ran with a blind index."""
        for e in self.engines:
            async with session.post(f"{e.direct_url}/debug/fault",
                                    json={"restart_engine": True}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{e.name}: engine restart answered {resp.status}")

    def engine_by_url(self) -> dict[str, LocalEngine]:
        return {e.url: e for e in self.engines}

    # -- gateways ---------------------------------------------------------------------------
    async def open_gateway(
        self, name: str, link: Link, routes: Sequence[tuple[int, int]]
    ) -> Gateway:
        """A netdelay process forwarding each ``(listen, target)`` port with ``link``."""
        rtt = link_rtt_ms(link)
        argv = kvmesh_argv(
            "netdelay",
            "--listen-host",
            "127.0.0.1",
            *[a for lp, tp in routes for a in ("--route", f"{lp}=127.0.0.1:{tp}@{rtt:g}")],
        )
        proc = Proc(f"netdelay {name}", argv, self.workdir / f"netdelay-{name}.log")
        await proc.start()
        gw = Gateway(name, link, tuple(routes), proc)
        self.gateways.append(gw)
        await wait_listening([lp for lp, _ in routes], proc)
        return gw

    async def close_gateway(self, gw: Gateway) -> None:
        await gw.proc.stop()
        with contextlib.suppress(ValueError):
            self.gateways.remove(gw)

    # -- routers ----------------------------------------------------------------------------
    async def start_routers(
        self,
        session: aiohttp.ClientSession,
        policy: str,
        params: Mapping[str, object],
        label: str,
        *,
        peers: bool = True,
        set_prefill_rate: bool = True,
    ) -> None:
        """One router per region of the fleet, all peers of each other (``peers``; else each
        alone with its region's engines), then wait until every router sees every replica it
        can use healthy. ``set_prefill_rate`` False leaves the engines' rates to the policy's
        default and to calibration."""
        spec = self.spec
        ports = free_ports(len(spec.regions))
        self.router_urls = {
            r: f"http://127.0.0.1:{p}" for r, p in zip(spec.regions, ports, strict=True)
        }
        rate = round(prefill_rate(spec.profile, spec.speedup), 1)
        procs: dict[str, Proc] = {}
        for region, port in zip(spec.regions, ports, strict=True):
            conf: dict[str, Any] = {
                "node_id": f"{region}-lb0",
                "region": region,
                "listen": f"127.0.0.1:{port}",
                "engines": [
                    {
                        "url": e.url,
                        "kv_events": e.kv_events,
                        "replay": e.replay,
                        **({"prefill_rate": rate} if set_prefill_rate else {}),
                    }
                    for e in self.engines
                    if e.region == region
                ],
                "peers": list(self.router_urls.values()) if peers else [],
                "mesh_key": self.mesh_key,
                "policy": policy,
                "policy_params": dict(params),
                "emulate_rtt": {r: spec.rtt_s(region, r) for r in spec.regions if r != region},
                "gossip": {"profile": spec.gossip_profile},
                "seed": spec.seed,
                "log_level": "warning",
            }
            path = self.workdir / f"router-{region}-{label}.yaml"
            path.write_text(yaml.safe_dump(conf, sort_keys=False))
            procs[region] = Proc(
                f"router {region} ({label})",
                kvmesh_argv("router", "--config", str(path)),
                self.workdir / f"router-{region}-{label}.log",
            )
        self.router_procs = procs
        await asyncio.gather(*(p.start() for p in procs.values()))
        await asyncio.gather(
            *(wait_http(session, f"{self.router_urls[r]}/health", p) for r, p in procs.items())
        )
        if not await self.wait_converged(session, alone=not peers):
            raise RuntimeError(
                f"routers did not all see every replica healthy within 30 s; logs in {self.workdir}"
            )

    async def wait_converged(self, session: aiohttp.ClientSession, timeout: float = 30.0,
                             alone: bool = False) -> bool:
        """Every router sees every replica healthy (``alone``: its own region's)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen, wants = [], []
            for region, url in self.router_urls.items():
                wants.append(sum(1 for e in self.engines if not alone or e.region == region))
                try:
                    async with session.get(f"{url}/mesh/status") as resp:
                        status = await resp.json(content_type=None)
                except (aiohttp.ClientError, ValueError):
                    status = {}
                routing = status.get("routing", {}) if isinstance(status, dict) else {}
                reps = routing.get("replicas", []) if isinstance(routing, dict) else []
                seen.append(sum(1 for r in reps if r.get("healthy")))
            if seen and all(n >= w for n, w in zip(seen, wants, strict=True)):
                return True
            await asyncio.sleep(0.1)
        return False

    async def router_metric(
        self, session: aiohttp.ClientSession, name: str, label: str = ""
    ) -> float:
        """Sum of one metric over every router (samples whose labels contain ``label``)."""
        return await scrape_sum(session, list(self.router_urls.values()), name, label)

    async def engine_metric(self, session: aiohttp.ClientSession, name: str) -> float:
        """Sum of one metric over every engine (read directly, not through a gateway)."""
        return await scrape_sum(session, [e.direct_url for e in self.engines], name)

    async def engine_pace(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """Every engine's pace counters (``sim.engine_runner.Pace``) and profile-busy
        seconds, summed (read directly from ``/debug/engine``; an engine that does not
        answer counts nothing)."""
        total: dict[str, float] = {}
        for e in self.engines:
            try:
                async with session.get(f"{e.direct_url}/debug/engine") as resp:
                    doc = await resp.json()
            except (aiohttp.ClientError, ValueError):
                continue
            pace = doc.get("pace") if isinstance(doc, dict) else None
            busy = doc.get("engine", {}).get("busy_time") if isinstance(doc, dict) else None
            for k, v in [*(pace.items() if isinstance(pace, dict) else ()), ("busy_s", busy)]:
                if isinstance(v, int | float):
                    total[k] = total.get(k, 0.0) + float(v)
        return total

    async def stop_routers(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.router_procs.values()))
        self.router_procs = {}

    async def stop(self) -> None:
        await self.stop_routers()
        await asyncio.gather(*(g.proc.stop() for g in self.gateways))
        self.gateways = []
        await asyncio.gather(*(p.stop() for p in self.engine_procs))

    # -- accounting -------------------------------------------------------------------------
    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each kind of process (engines, routers, gateways)."""
        out = {"engines": 0.0, "routers": 0.0, "netdelay": 0.0}
        kinds = (
            ("engines", self.engine_procs),
            ("routers", list(self.router_procs.values())),
            ("netdelay", [g.proc for g in self.gateways]),
        )
        for kind, procs in kinds:
            for p in procs:
                if p.proc is not None and p.alive:
                    out[kind] += cpu_seconds_of(p.proc.pid)
        return out

    def pids(self) -> list[int]:
        procs = [*self.engine_procs, *self.router_procs.values(), *(g.proc for g in self.gateways)]
        return [p.proc.pid for p in procs if p.proc is not None]


async def scrape_sum(
    session: aiohttp.ClientSession, urls: Sequence[str], name: str, label: str = ""
) -> float:
    """Sum of the samples of ``name`` (labels containing ``label``) on every ``/metrics``."""
    total = 0.0
    for url in urls:
        try:
            async with session.get(f"{url}/metrics") as resp:
                text = await resp.text()
        except aiohttp.ClientError:
            continue
        for line in text.splitlines():
            if line.startswith("#") or label not in line:
                continue
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] == name:
                with contextlib.suppress(ValueError):
                    total += float(value)
    return total


__all__ = [
    "MODEL",
    "Gateway",
    "LocalEngine",
    "LocalFleetSpec",
    "LocalMesh",
    "cpu_seconds_of",
    "link_rtt_ms",
    "prefill_rate",
    "scrape_sum",
]
