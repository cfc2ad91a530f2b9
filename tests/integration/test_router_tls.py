"""TLS on the listener and mutual TLS between peers, from the configuration alone.

Two regions on loopback, certificates from a throwaway CA (``openssl``): gossip converges
over HTTPS with client certificates, a client needs no certificate (but must trust the
CA), and a caller without a peer certificate cannot gossip or forward.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import aiohttp
import pytest
from router_support import (
    MESH_KEY,
    MODEL,
    Procs,
    free_ports,
    healthy,
    processes,
    sees_replicas,
    wait_until,
)

pytestmark = pytest.mark.integration


def make_certs(d: Path) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=kvmesh test CA")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\n")
    run("req", *ec, "-keyout", "router.key", "-out", "router.csr", "-subj", "/CN=router")
    run("x509", "-req", "-in", "router.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "router.pem", "-days", "2", "-extfile", "ext.cnf")
    return {"ca": d / "ca.pem", "cert": d / "router.pem", "key": d / "router.key"}


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[Procs, list[str], ssl.SSLContext]]:
    certs = make_certs(tmp_path)
    with processes(tmp_path) as procs:
        ports = free_ports(2)
        peers = [f"https://127.0.0.1:{p}" for p in ports]
        routers = []
        for region, port in zip(("eu", "us"), ports, strict=True):
            eng = procs.engine(f"engine-{region}")
            procs.router(f"router-{region}", {
                "region": region, "listen": f"127.0.0.1:{port}", "advertise": peers[len(routers)],
                "peers": peers, "mesh_key": MESH_KEY,
                "engines": [{"url": eng.url, "kv_events": eng.kv_events, "replay": eng.replay}],
                "tls_cert": str(certs["cert"]), "tls_key": str(certs["key"]),
                "tls_ca": str(certs["ca"]), "tls_peer_mtls": True,
                "gossip": {"profile": "local"}})
            routers.append(peers[len(routers)])
        client = ssl.create_default_context(cafile=str(certs["ca"]))
        yield procs, routers, client


async def test_gossip_and_requests_over_tls_with_peer_certificates(
    mesh: tuple[Procs, list[str], ssl.SSLContext],
) -> None:
    procs, routers, client_tls = mesh
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as s:
        for r in routers:
            await wait_until(partial(healthy, s, r), timeout=30, what=f"{r} up")
        for r in routers:
            await wait_until(partial(sees_replicas, s, r, 2), timeout=40,
                             what=f"{r} sees both replicas over TLS gossip")
        body = {"model": MODEL, "messages": [{"role": "user", "content": "over tls"}],
                "max_tokens": 4}
        async with s.post(f"{routers[0]}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
        # A client without a peer certificate cannot talk the mesh protocol ...
        async with s.post(f"{routers[0]}/mesh/gossip", data=b"\x90") as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "peer_certificate_required"
        # ... nor pretend to be a forwarding peer.
        async with s.post(f"{routers[0]}/v1/chat/completions", json=body,
                          headers={"x-kvmesh-hop": "2"}) as resp:
            assert resp.status == 403
    # Plain HTTP to the TLS listener gets nowhere.
    plain = routers[0].replace("https://", "http://")
    status: int | None = None
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(f"{plain}/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = None
    assert status != 200
    for name in ("router-eu", "router-us"):
        assert "Traceback" not in procs.log(name)
