"""The user-space delay proxy: route parsing, in-order jittered schedule, and a real
loopback connection through it (bytes intact, round trip held at least the RTT, EOF passed
on, a dead target closes the client)."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from sim.netdelay import DelayProxy, DelaySchedule, Route


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_route_parse() -> None:
    assert Route.parse("8101=router-us-1:8101@40") == Route(8101, "router-us-1", 8101, 40.0)
    assert Route.parse("9000=h:1", default_rtt_ms=12.5).rtt_ms == 12.5
    assert Route.parse("9000=h:1@7.5").one_way_s == pytest.approx(0.00375)
    for bad in ("8101", "8101=host", "x=h:1", "0=h:1", "1=h:70000", "1=h:1@-3"):
        with pytest.raises(ValueError):
            Route.parse(bad)


def test_schedule_never_reorders_under_jitter() -> None:
    schedule = DelaySchedule(0.02, jitter_s=0.05, rng=random.Random(7))
    dues = [schedule.due(now=i * 0.001) for i in range(500)]
    assert dues == sorted(dues)
    assert all(due >= i * 0.001 + 0.02 for i, due in enumerate(dues))


def test_proxy_rejects_duplicate_listen_ports() -> None:
    with pytest.raises(ValueError):
        DelayProxy([Route(1, "a", 2, 0), Route(1, "b", 3, 0)])


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    writer.close()


async def test_bytes_delay_and_eof_through_the_proxy() -> None:
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]
    listen = _free_port()
    proxy = DelayProxy([Route(listen, "127.0.0.1", echo_port, 80.0)], listen_host="127.0.0.1")
    await proxy.start()
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        t0 = loop.time()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert loop.time() - t0 >= 0.08  # both directions held RTT/2

        payload = random.Random(1).randbytes(3_000_000)
        writer.write(payload)
        writer.write_eof()
        echoed = await asyncio.wait_for(reader.read(-1), 20)  # read to EOF: EOF came back
        assert echoed == payload
        writer.close()
        stats = proxy.stats[listen]
        assert stats.accepted == 1 and stats.connect_failures == 0
        assert stats.bytes_forwarded == 2 * (4 + len(payload))
    finally:
        await proxy.close()
        echo.close()
        await echo.wait_closed()


async def test_unreachable_target_closes_the_client() -> None:
    dead = _free_port()  # nothing listens here
    listen = _free_port()
    proxy = DelayProxy([Route(listen, "127.0.0.1", dead, 10.0)], listen_host="127.0.0.1")
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert proxy.stats[listen].connect_failures == 1
    finally:
        await proxy.close()
