"""User-space network delay: a TCP proxy that holds every chunk for a one-way time.

The kernels kvmesh is tested on have no netem, so the round trip between two regions is
injected here instead: a region's gateway runs one listener per remote endpoint and forwards
each connection to it, holding the bytes of both directions for half the link's round trip.
Order within a connection is kept (a chunk is never released before the one read before it),
so HTTP keep-alive, SSE streams and ZMQ all work through it unchanged.

A partition is not this tool's job: disconnect the gateway from a Docker network and the
connect to the target fails, which the proxy turns into a closed client connection.

    kvmesh netdelay --route 8101=router-us-1:8101@40 --route 8102=router-us-2:8102@40
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import re
import signal
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvmesh.netdelay")

_ROUTE = re.compile(
    r"^(?P<listen>\d+)=(?P<host>[^:@\s]+):(?P<port>\d+)(?:@(?P<rtt>\d+(?:\.\d+)?))?$"
)
CHUNK = 65536
QUEUE_CHUNKS = 256
"""Chunks held per direction before the reader waits: bounds memory at 16 MiB per direction."""


@dataclass(frozen=True, slots=True)
class Route:
    """One listener: connections to ``listen_port`` go to ``host:port`` with ``rtt_ms``."""

    listen_port: int
    host: str
    port: int
    rtt_ms: float

    @classmethod
    def parse(cls, spec: str, default_rtt_ms: float = 0.0) -> Route:
        """``LISTEN=HOST:PORT[@RTT_MS]``, e.g. ``8101=router-us-1:8101@40``."""
        match = _ROUTE.match(spec.strip())
        if match is None:
            raise ValueError(f"route {spec!r} is not LISTEN=HOST:PORT[@RTT_MS]")
        listen, port = int(match["listen"]), int(match["port"])
        for value in (listen, port):
            if not 0 < value < 65536:
                raise ValueError(f"route {spec!r}: port {value} is out of range")
        rtt = float(match["rtt"]) if match["rtt"] is not None else default_rtt_ms
        return cls(listen, match["host"], port, rtt)

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0


@dataclass(slots=True)
class DelaySchedule:
    """When each chunk of one direction may be released: ``one_way`` plus jitter, in order.

    Jitter is drawn per chunk from ``[0, jitter_s]``; a chunk is never due before the chunk
    read before it, so jitter delays but never reorders a byte stream.
    """

    one_way_s: float
    jitter_s: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    _last_due: float = float("-inf")

    def due(self, now: float) -> float:
        jitter = self.rng.uniform(0.0, self.jitter_s) if self.jitter_s > 0 else 0.0
        self._last_due = max(now + self.one_way_s + jitter, self._last_due)
        return self._last_due


@dataclass(slots=True)
class RouteStats:
    """Counters of one listener; logged at shutdown and on SIGUSR1."""

    accepted: int = 0
    connect_failures: int = 0
    bytes_forwarded: int = 0
    open_connections: int = 0


class DelayProxy:
    """The asyncio shell: one server per route, two delayed pumps per connection."""

    def __init__(
        self,
        routes: list[Route],
        *,
        listen_host: str = "0.0.0.0",
        jitter_ms: float = 0.0,
        connect_timeout_s: float = 3.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        ports = [r.listen_port for r in routes]
        if len(set(ports)) != len(ports):
            raise ValueError(f"listen ports must be distinct, got {sorted(ports)}")
        self.routes = routes
        self.listen_host = listen_host
        self.jitter_s = jitter_ms / 1000.0
        self.connect_timeout_s = connect_timeout_s
        self.rng = rng or random.Random()
        self._clock = clock
        self.stats: dict[int, RouteStats] = {r.listen_port: RouteStats() for r in routes}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def start(self) -> None:
        for route in self.routes:
            server = await asyncio.start_server(
                self._on_connect(route),
                self.listen_host,
                route.listen_port,
            )
            self._servers.append(server)
            log.info(
                "listening on %s:%d -> %s:%d (rtt %.1f ms)",
                self.listen_host,
                route.listen_port,
                route.host,
                route.port,
                route.rtt_ms,
            )

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def _on_connect(
        self, route: Route
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._spawn(self._serve(route, reader, writer))

        return accept

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, route: Route, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        stats = self.stats[route.listen_port]
        stats.accepted += 1
        try:
            target_r, target_w = await asyncio.wait_for(
                asyncio.open_connection(route.host, route.port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            stats.connect_failures += 1
            log.info(
                "route %d: connect to %s:%d failed: %s",
                route.listen_port,
                route.host,
                route.port,
                exc or type(exc).__name__,
            )
            await _close(client_w)
            return
        stats.open_connections += 1
        try:
            await asyncio.gather(
                self._pump(route, client_r, target_w, stats),
                self._pump(route, target_r, client_w, stats),
            )
        finally:
            stats.open_connections -= 1
            await _close(target_w)
            await _close(client_w)

    async def _pump(
        self,
        route: Route,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        stats: RouteStats,
    ) -> None:
        """Read as fast as the source sends, release each chunk when it is due."""
        schedule = DelaySchedule(route.one_way_s, self.jitter_s, self.rng)
        held: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        room = asyncio.Event()
        room.set()
        eof_due: list[float] = []

        async def read() -> None:
            try:
                while True:
                    await room.wait()
                    chunk = await source.read(CHUNK)
                    if not chunk:
                        break
                    held.append((schedule.due(self._now()), chunk))
                    if len(held) >= QUEUE_CHUNKS:
                        room.clear()
                    arrived.set()
            except (ConnectionError, OSError):
                pass
            eof_due.append(schedule.due(self._now()))
            arrived.set()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                if not held:
                    if eof_due:
                        await _sleep_until(eof_due[0], self._now)
                        with contextlib.suppress(OSError, RuntimeError):
                            if sink.can_write_eof():
                                sink.write_eof()
                        return
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, chunk = held[0]
                await _sleep_until(due, self._now)
                held.popleft()
                if len(held) < QUEUE_CHUNKS:
                    room.set()
                sink.write(chunk)
                stats.bytes_forwarded += len(chunk)
                await sink.drain()
        except (ConnectionError, OSError):
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _sleep_until(due: float, now: Callable[[], float]) -> None:
    delay = due - now()
    if delay > 0:
        await asyncio.sleep(delay)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ConnectionError):
        await writer.wait_closed()


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--route",
        action="append",
        required=True,
        metavar="LISTEN=HOST:PORT[@RTT_MS]",
        help="forward LISTEN to HOST:PORT, holding each direction RTT/2 (repeatable)",
    )
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="RTT for routes without @RTT_MS")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="extra one-way delay, uniform")
    parser.add_argument("--listen-host", default="0.0.0.0")
    parser.add_argument("--connect-timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--seed", type=int, default=None, help="seed for the jitter RNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s netdelay %(message)s")
    try:
        routes = [Route.parse(spec, args.rtt_ms) for spec in args.route]
        proxy = DelayProxy(
            routes,
            listen_host=args.listen_host,
            jitter_ms=args.jitter_ms,
            connect_timeout_s=args.connect_timeout,
            rng=random.Random(args.seed),
        )
    except ValueError as exc:
        print(f"kvmesh netdelay: {exc}")
        return 2
    return asyncio.run(_serve_forever(proxy))


async def _serve_forever(proxy: DelayProxy) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: _log_stats(proxy))
    await proxy.start()
    await stop.wait()
    _log_stats(proxy)
    await proxy.close()
    return 0


def _log_stats(proxy: DelayProxy) -> None:
    for port, s in sorted(proxy.stats.items()):
        log.info(
            "route %d: accepted %d, connect failures %d, open %d, bytes %d",
            port,
            s.accepted,
            s.connect_failures,
            s.open_connections,
            s.bytes_forwarded,
        )
