"""``kvmesh sim-engine`` as a real process: serves HTTP and KV events, exits cleanly on
SIGTERM and SIGINT."""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import msgpack  # type: ignore[import-untyped,unused-ignore]
import pytest
import zmq

pytestmark = pytest.mark.integration

READY = re.compile(r"serving http://127\.0\.0\.1:(\d+); kv events (\S+) replay (\S+)")


@pytest.fixture
def engine_process() -> Iterator[tuple[subprocess.Popen[str], int, str, str]]:
    cmd = [
        sys.executable, "-m", "cli", "sim-engine",
        "--port", "0", "--model", "m", "--speedup", "50", "--num-gpu-blocks", "64",
        "--kv-events-endpoint", "tcp://127.0.0.1:*", "--replay-endpoint", "tcp://127.0.0.1:*",
        "--topic", "kv@cli@m", "--event-format", "array", "--max-model-len", "512",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        match = None
        while match is None:
            ready, _, _ = select.select(
                [proc.stderr], [], [], max(0.0, deadline - time.monotonic())
            )
            assert ready, "sim-engine did not start in time"
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "sim-engine exited before serving"
            assert time.monotonic() < deadline, "sim-engine did not start in time"
            match = READY.search(line)
        yield proc, int(match.group(1)), match.group(2), match.group(3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


def post(port: int, path: str, body: object) -> object:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_and_publishes_then_stops_on_signal(
    engine_process: tuple[subprocess.Popen[str], int, str, str], sig: signal.Signals
) -> None:
    proc, port, endpoint, replay_endpoint = engine_process
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        assert r.status == 200
    reply = post(port, "/v1/completions", {"prompt": list(range(40)), "max_tokens": 2})
    assert isinstance(reply, dict) and reply["usage"]["completion_tokens"] == 2

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        assert dealer.poll(10_000)
        _, topic, seq, payload = dealer.recv_multipart()
        assert (topic, seq) == (b"kv@cli@m", bytes(8))
        stored = msgpack.unpackb(payload, raw=False)[1][0]
        assert stored[0] == "BlockStored" and stored[3] == list(range(32))
        assert endpoint.startswith("tcp://127.0.0.1:")
    finally:
        ctx.destroy(linger=0)

    proc.send_signal(sig)
    assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    assert "sim-engine stopped" in proc.stderr.read()


def test_bad_configuration_exits_with_an_error() -> None:
    cmd = [sys.executable, "-m", "cli", "sim-engine", "--port", "0",
           "--num-gpu-blocks", "4", "--max-model-len", "1000"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "larger than the KV cache" in done.stderr
