"""Three mesh nodes in three processes on loopback, gossiping a real PrefixIndex over HTTP.

Run as a script, this file is the node: ``python test_mesh_gossip_loopback.py --id a
--region us [--seed URL ...]`` serves a ``MeshNode`` on an aiohttp app bound to a free
127.0.0.1 port (printed as ``READY <port>``), plus two test routes: ``POST /test/put``
stores blocks for this node's own replica, ``GET /test/state`` shows the merged index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
KEY = "integration mesh key, 32 bytes!!"

pytestmark = pytest.mark.integration


# ---- the node (script mode) -------------------------------------------------------------


async def serve(node_id: str, region: str, seeds: list[str]) -> None:
    from crdt.prefix_index import PrefixIndex
    from mesh.node import MeshConfig, MeshNode

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    prefix = PrefixIndex()
    config = MeshConfig.from_options(
        node_id=node_id,
        region=region,
        advertise=f"http://127.0.0.1:{port}",
        keys=[KEY],
        seeds=seeds,
        options={"profile": "local"},
    )
    node = MeshNode(config, {"prefix": prefix})
    replica = f"http://engine-{node_id}"
    writes = 0

    async def put(request: web.Request) -> web.Response:
        nonlocal writes
        writes += 1
        n = int(request.query.get("blocks", "10"))
        prefix.store(replica, (1, writes), [writes * 1000 + i for i in range(n)])
        return web.json_response({"replica": replica, "seq": writes})

    async def state(_request: web.Request) -> web.Response:
        content = {
            r: [info.version[0], info.version[1], sorted(prefix.keys(r))]
            for r in prefix.replicas()
            if (info := prefix.slice_info(r)) is not None
        }
        return web.json_response(content)

    app = web.Application()
    node.attach(app)
    app.add_routes([web.post("/test/put", put), web.get("/test/state", state)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    print(f"READY {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--id", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--seed", action="append", default=[])
    args = p.parse_args(argv)
    asyncio.run(serve(args.id, args.region, args.seed))
    return 0


# ---- the test ---------------------------------------------------------------------------


@dataclass
class Proc:
    node_id: str
    proc: asyncio.subprocess.Process
    url: str


async def spawn(node_id: str, region: str, seeds: list[str]) -> Proc:
    args = [sys.executable, __file__, "--id", node_id, "--region", region]
    for s in seeds:
        args += ["--seed", s]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert line.startswith(b"READY "), line
    return Proc(node_id, proc, f"http://127.0.0.1:{int(line.split()[1])}")


async def stop(p: Proc) -> None:
    if p.proc.returncode is None:
        p.proc.terminate()
        try:
            await asyncio.wait_for(p.proc.wait(), 10)
        except TimeoutError:
            p.proc.kill()
            await p.proc.wait()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        yield s


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def wait_for(
    what: str, cond: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.1
) -> float:
    start = time.monotonic()
    while True:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if await cond():
                return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def peer_states(status: dict[str, Any]) -> dict[str, str]:
    return {p["id"]: p["state"] for p in status["peers"]}


async def test_three_regions_converge_and_a_killed_node_is_detected(
    session: aiohttp.ClientSession,
) -> None:
    procs: list[Proc] = []
    try:
        a = await spawn("a", "us", [])
        procs.append(a)
        procs.append(await spawn("b", "eu", [a.url]))
        procs.append(await spawn("c", "ap", [a.url]))

        async def all_joined() -> bool:
            for p in procs:
                st = await get_json(session, p.url + "/mesh/status")
                others = {q.node_id for q in procs} - {p.node_id}
                if peer_states(st) != dict.fromkeys(others, "alive"):
                    return False
            return True

        await wait_for("membership", all_joined, 20)

        for p in procs:
            for _ in range(3):
                async with session.post(p.url + "/test/put?blocks=20") as resp:
                    assert resp.status == 200

        async def converged() -> bool:
            states = [await get_json(session, p.url + "/test/state") for p in procs]
            return len(states[0]) == 3 and all(s == states[0] for s in states)

        await wait_for("state convergence", converged, 20)
        state = await get_json(session, a.url + "/test/state")
        assert {r: v[:2] for r, v in state.items()} == {f"http://engine-{n}": [1, 3] for n in "abc"}
        assert all(len(v[2]) == 60 for v in state.values())

        async def rtts_measured() -> bool:
            st = await get_json(session, a.url + "/mesh/status")
            return set(st["region_rtt_ms"]) == {"eu", "ap"}

        await wait_for("round-trip measurements", rtts_measured, 20)

        # a forged frame is refused, counted, and named in the answer
        from mesh.auth import Authenticator
        from mesh.transport import CONTENT_TYPE, REJECTED_HEADER, pack_frames

        forged = Authenticator([b"not the mesh key, but 32 bytes.."]).seal(b"\x93\x01\x02\x03")
        async with session.post(
            a.url + "/mesh/gossip",
            data=pack_frames([forged]),
            headers={"Content-Type": CONTENT_TYPE},
        ) as resp:
            assert resp.status == 200
            assert resp.headers[REJECTED_HEADER] == "unknown_key"
        async with session.post(a.url + "/mesh/gossip", data=b"\xc1garbage") as resp:
            assert resp.status == 400
        st = await get_json(session, a.url + "/mesh/status")
        assert st["counters"]["rx.rejected.unknown_key"] >= 1
        assert st["counters"]["rx.rejected.bad_packet"] >= 1

        # kill c without a goodbye: a and b must declare it dead
        c = procs[2]
        c.proc.kill()
        await c.proc.wait()

        async def c_dead() -> bool:
            for p in procs[:2]:
                st = await get_json(session, p.url + "/mesh/status")
                if peer_states(st).get("c") != "dead":
                    return False
            return True

        took = await wait_for("failure detection", c_dead, 40)
        print(f"c declared dead by a and b after {took:.1f} s")
        for p in procs[:2]:
            st = await get_json(session, p.url + "/mesh/status")
            others = {"a", "b"} - {p.node_id}
            assert {k: v for k, v in peer_states(st).items() if k != "c"} == dict.fromkeys(
                others, "alive"
            )
    finally:
        await asyncio.gather(*(stop(p) for p in procs))
    assert all(p.proc.returncode is not None for p in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
