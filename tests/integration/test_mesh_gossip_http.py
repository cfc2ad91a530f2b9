"""MeshNodes in one process over real HTTP on loopback: DNS seeds naming several routers
(a headless service, emulated with 127.0.0.x addresses sharing one port), voluntary leave,
packet limits, and TLS with a private CA and a name-resolved seed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from crdt.prefix_index import PrefixIndex
from mesh.node import MeshConfig, MeshNode
from mesh.transport import CONTENT_TYPE, GOSSIP_PATH

pytestmark = pytest.mark.integration

KEY = "http test mesh key of 32 bytes.."


def free_port_on(hosts: list[str]) -> int:
    """A port free on every one of ``hosts`` (tried a few times)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for h in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise RuntimeError("no common free port")


async def wait_for(what: str, cond: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Served:
    def __init__(self, node: MeshNode, index: PrefixIndex, runner: web.AppRunner) -> None:
        self.node, self.index, self.runner = node, index, runner


@contextlib.asynccontextmanager
async def serve(
    host: str,
    port: int,
    node_id: str,
    region: str,
    seeds: list[str],
    *,
    scheme: str = "http",
    server_ssl: ssl.SSLContext | None = None,
    client_ssl: ssl.SSLContext | None = None,
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
) -> AsyncIterator[Served]:
    index = PrefixIndex()
    config = MeshConfig.from_options(
        node_id=node_id,
        region=region,
        advertise=f"{scheme}://{host}:{port}",
        keys=[KEY],
        seeds=seeds,
        options={"profile": "local", "max_message_bytes": 64 * 1024},
        ssl_context=client_ssl,
    )
    node = MeshNode(config, {"prefix": index}, resolver=resolver)
    app = web.Application()
    app.add_routes(node.routes())
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=server_ssl).start()
    await node.start()
    try:
        yield Served(node, index, runner)
    finally:
        await node.aclose()
        await runner.cleanup()


async def test_dns_seed_naming_several_routers_then_a_voluntary_leave() -> None:
    hosts = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    port = free_port_on(hosts)
    lookups: list[str] = []

    async def resolver(name: str, _port: int) -> list[str]:
        lookups.append(name)
        if name != "routers.mesh.test":
            raise OSError(f"unknown name {name}")
        return hosts

    seeds = [f"http://routers.mesh.test:{port}"]
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                serve(h, port, f"r{i}", ("us", "eu", "ap")[i], seeds, resolver=resolver)
            )
            for i, h in enumerate(hosts)
        ]
        assert lookups and set(lookups) == {"routers.mesh.test"}
        await wait_for("membership", lambda: all(len(s.node.alive()) == 2 for s in nodes))
        for i, s in enumerate(nodes):
            s.index.reset(f"http://engine-{i}", 1)
            s.index.store(f"http://engine-{i}", (1, 1), list(range(i * 100, i * 100 + 50)))
        await wait_for(
            "index convergence",
            lambda: (
                all(len(s.index.replicas()) == 3 for s in nodes)
                and all(s.index.digest() == nodes[0].index.digest() for s in nodes)
            ),
        )
        status = nodes[0].node.status()
        assert {p["id"]: p["state"] for p in status["peers"]} == {"r1": "alive", "r2": "alive"}
        assert status["node"]["generation"] == nodes[0].node.generation
        assert nodes[0].node.routers_by_region() == {
            "us": [f"http://127.0.0.1:{port}"],
            "eu": [f"http://127.0.0.2:{port}"],
            "ap": [f"http://127.0.0.3:{port}"],
        }

        # a packet over the limit is refused before it is read whole
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{port}{GOSSIP_PATH}",
                data=b"\x00" * (200 * 1024),
                headers={"Content-Type": CONTENT_TYPE},
            ) as resp,
        ):
            assert resp.status == 413
        assert nodes[0].node.metrics()["rx.rejected.oversize_packet"] == 1

        # r2 leaves politely: the others see LEFT, not a failure
        await nodes[2].node.aclose()
        await wait_for("leave", lambda: all(s.node.left() == {"r2"} for s in nodes[:2]), 5)
        assert all(not s.node.suspect() and not s.node.dead() for s in nodes[:2])


def make_ca(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for mesh.test and 127.0.0.1."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=kvmesh test CA", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (tmp / "san.cnf").write_text("subjectAltName=DNS:mesh.test,IP:127.0.0.1\n")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=mesh.test",
        "-keyout", "node.key", "-out", "node.csr")  # fmt: skip
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "node.pem")  # fmt: skip
    return tmp / "ca.pem", tmp / "node.pem", tmp / "node.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not available")
async def test_tls_between_routers_with_a_name_resolved_seed(tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)
    client_ssl = ssl.create_default_context(cafile=str(ca))
    hosts = ["127.0.0.1"]
    port_a, port_b = free_port_on(hosts), free_port_on(hosts)

    async def resolver(name: str, _port: int) -> list[str]:
        assert name == "mesh.test"
        return ["127.0.0.1"]

    common = {"scheme": "https", "server_ssl": server_ssl, "client_ssl": client_ssl}
    async with (
        serve("127.0.0.1", port_a, "a", "us", [], **common) as a,  # type: ignore[arg-type]
        serve(
            "127.0.0.1",
            port_b,
            "b",
            "eu",
            [f"https://mesh.test:{port_a}"],
            resolver=resolver,
            **common,  # type: ignore[arg-type]
        ) as b,
    ):
        await wait_for("membership over TLS", lambda: a.node.alive() == {"b"})
        assert b.node.alive() == {"a"}
        a.index.reset("http://engine-a", 1)
        a.index.store("http://engine-a", (1, 1), [1, 2, 3])
        await wait_for("state over TLS", lambda: b.index.keys("http://engine-a") == {1, 2, 3})
        assert b.node.client.server_hostnames == {f"https://127.0.0.1:{port_a}": "mesh.test"}

        # a router that does not trust the CA cannot join: its posts fail, nothing merges
        async with serve(
            "127.0.0.1",
            free_port_on(hosts),
            "c",
            "ap",
            [f"https://127.0.0.1:{port_a}"],
            scheme="https",
            server_ssl=server_ssl,
            client_ssl=ssl.create_default_context(),
        ) as c:
            await wait_for(
                "failed TLS handshakes", lambda: c.node.metrics().get("tx.failed", 0) >= 2
            )
            assert c.node.alive() == set() and "c" not in a.node.alive()
