"""A data-parallel engine (one publisher per rank on port + rank) is ingested whole."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from kvevents.block_sizes import sized_request_keys
from kvevents.events import BlockStored
from kvevents.publisher import ZmqEventPublisher
from mesh.config import EngineConfig, RouterConfig
from mesh.sized_lookup import SizedLookup
from mesh.state import MeshState

pytestmark = pytest.mark.integration

URL = "http://127.0.0.1:9"


def consecutive_ports(n: int) -> int:
    """A base port with ``n`` free ports from it (as vLLM's DP ranks need)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise AssertionError("no run of free ports")


async def test_every_rank_is_ingested_under_its_engine() -> None:
    ranks = 3
    pub_base, replay_base = consecutive_ports(ranks), consecutive_ports(ranks)
    pubs = [ZmqEventPublisher(f"tcp://127.0.0.1:{pub_base}", mode="bind",
                              replay_endpoint=f"tcp://127.0.0.1:{replay_base}",
                              data_parallel_rank=r) for r in range(ranks)]
    config = RouterConfig(region="us", node_id="r1", engines=(EngineConfig(
        URL, kv_events=f"tcp://127.0.0.1:{pub_base}", replay=f"tcp://127.0.0.1:{replay_base}",
        data_parallel_size=ranks),))
    mesh = MeshState(config)
    assert [s.replica for s in mesh.subscribers] == [URL, f"{URL}#dp1", f"{URL}#dp2"]
    tokens = [list(range(r * 1000, r * 1000 + 32 * (r + 2))) for r in range(ranks)]
    try:
        # Published before the router starts: the catch-up replay brings them in.
        for r, pub in enumerate(pubs):
            pub.publish([BlockStored([r * 100 + i for i in range(r + 2)], None, tokens[r], 32,
                                     medium="GPU")])
            assert pub.flush()
        for sub in mesh.subscribers:
            await sub.start()
        lookup = SizedLookup(mesh.index)
        deadline = time.monotonic() + 10
        want = {r: r + 2 for r in range(ranks)}
        while True:
            got = {r: lookup.match(sized_request_keys(tokens[r], {32})).get(URL, 0)
                   for r in range(ranks)}
            if got == {r: min(want[r], (len(tokens[r]) - 1) // 32) for r in range(ranks)}:
                break
            assert time.monotonic() < deadline, got
            await asyncio.sleep(0.05)
        assert all(s.stats().replays >= 1 and not s.stats().partial for s in mesh.subscribers)
    finally:
        await mesh.stop()
        for pub in pubs:
            pub.close()
