"""The overhead benchmark's wrk parsing and summary (the bench itself runs processes)."""

from __future__ import annotations

import pytest

from bench.overhead import Case, WrkResult, parse_wrk, summarise, wrk_script

WRK = """Running 2s test @ http://127.0.0.1:18002/v1/chat/completions
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.90ms    4.01ms  37.48ms   88.18%
    Req/Sec   591.55    429.75     1.05k    45.00%
  Latency Distribution
     50%  337.00us
     75%    3.34ms
     90%    7.68ms
     99%    1.05s
  1183 requests in 2.03s, 847.97KB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:    582.96
Transfer/sec:    417.87KB
"""


def test_parse_wrk_reads_every_figure_in_seconds() -> None:
    r = parse_wrk(WRK)
    assert r.rps == pytest.approx(582.96)
    assert r.p50 == pytest.approx(337e-6)
    assert r.p90 == pytest.approx(7.68e-3)
    assert r.p99 == pytest.approx(1.05)
    assert r.requests == 1183
    assert r.errors == 4 + 2 + 1


def test_parse_wrk_rejects_output_without_latency_distribution() -> None:
    with pytest.raises(ValueError, match="not wrk --latency output"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_script_posts_valid_json_body() -> None:
    import json

    line = next(x for x in wrk_script(True, 5).splitlines() if x.startswith("wrk.body"))
    body = json.loads(json.loads(line.split("=", 1)[1]))
    assert body["stream"] is True and body["max_tokens"] == 4
    assert len(body["messages"][0]["content"].split()) == 5


def test_summary_pairs_rounds_and_compares_with_the_best_peer() -> None:
    def w(rps: float, p50: float) -> WrkResult:
        return WrkResult(rps, p50, p50 * 2, p50 * 3, 100, 0)

    case = Case(False, 32, {
        "engine direct": [w(3000, 0.010), w(3000, 0.012)],
        "kvmesh": [w(1500, 0.014), w(1500, 0.018)],
        "peer a": [w(2000, 0.012), w(2000, 0.014)],
        "peer b": [w(1000, 0.020), w(1000, 0.022)],
    })
    rows = {r["target"]: r for r in summarise(case, "engine direct")}
    assert rows["engine direct"]["added_p50_ms"] is None
    assert rows["kvmesh"]["added_p50_ms"] == pytest.approx(5.0)  # median of 4 and 6
    assert rows["peer a"]["added_p50_ms"] == pytest.approx(2.0)
    assert rows["kvmesh"]["rps_vs_best_peer"] == pytest.approx(0.75)
    assert rows["kvmesh"]["added_p50_vs_best_peer"] == pytest.approx(2.5)


def test_tree_cpu_counts_a_busy_child() -> None:
    import os
    import subprocess
    import sys
    import time

    from bench.overhead import tree_cpu

    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        before = tree_cpu(os.getpid())
        assert before is not None
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            after = tree_cpu(os.getpid())
            assert after is not None
            if after - before >= 0.1:  # the child's CPU is the parent's tree's
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the busy child's CPU never showed in the tree")
    finally:
        child.kill()
        child.wait()
    assert tree_cpu(-1) is None


def test_the_floor_is_a_reference_not_a_peer() -> None:
    from bench.overhead import FLOOR

    def w(rps: float, p50: float) -> WrkResult:
        return WrkResult(rps, p50, p50 * 2, p50 * 3, 100, 0)

    case = Case(False, 1, {
        "engine direct": [w(3000, 0.010)],
        "kvmesh": [w(1500, 0.014)],
        FLOOR: [w(2900, 0.0105)],
        "peer a": [w(2000, 0.012)],
    })
    rows = {r["target"]: r for r in summarise(case, "engine direct")}
    assert rows[FLOOR]["added_p50_ms"] == pytest.approx(0.5)
    assert rows["kvmesh"]["added_p50_vs_best_peer"] == pytest.approx(2.0)  # peer a, not floor
    assert rows["kvmesh"]["rps_vs_best_peer"] == pytest.approx(0.75)


@pytest.mark.asyncio
async def test_floor_proxy_relays_whole_and_chunked_answers_on_one_connection() -> None:
    import asyncio

    import aiohttp
    from aiohttp import web

    from bench.floor_proxy import serve
    from sim.procs import free_ports

    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"echo": (await request.json())["n"]})

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.add_routes([web.post("/whole", whole), web.post("/stream", chunked)])
    runner = web.AppRunner(app)
    await runner.setup()
    engine_port, port = free_ports(2)
    await web.TCPSite(runner, "127.0.0.1", engine_port).start()
    proxy = asyncio.ensure_future(serve(port, f"http://127.0.0.1:{engine_port}"))
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1)) as session:
            for _ in range(50):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
            for n in range(3):
                async with session.post(f"http://127.0.0.1:{port}/whole", json={"n": n}) as r:
                    assert r.status == 200 and await r.json() == {"echo": n}
                async with session.post(f"http://127.0.0.1:{port}/stream", json={}) as r:
                    assert await r.text() == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    finally:
        proxy.cancel()
        await runner.cleanup()
