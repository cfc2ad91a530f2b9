"""Child processes on loopback: free ports, start/stop with a log file, wait until serving.

The one home of these helpers: the demo, the emulation, the router benchmark and the
integration tests start ``kvmesh`` processes through them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10000
_HANDED_OUT: set[int] = set()


def _ephemeral_floor() -> int | None:
    """The lowest port the kernel hands to outgoing connections (None: not known)."""
    try:
        lo = int(EPHEMERAL.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return lo if lo > LOWEST_PORT else None


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now, below the kernel's ephemeral range.

    A port is chosen here and bound later by a child process. A port from the ephemeral
    range can be taken in between by any outgoing connection, including a peer's retries
    to that very port before its listener is up (a TCP self-connect): the child then fails
    with "address already in use". Below the range only a listener can take it.

    Ports handed out earlier in this process are not handed out again: callers bind them
    later, so two calls (one engine's ports, then the next engine's) must not overlap.
    """
    socks: list[socket.socket] = []
    top = _ephemeral_floor()
    rng = random.Random()
    try:
        tries = 0
        while top is not None and len(socks) < n and tries < 64 * n:
            tries += 1
            port = rng.randrange(LOWEST_PORT, top)
            if port in _HANDED_OUT:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            socks.append(s)
        while len(socks) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        ports = [s.getsockname()[1] for s in socks]
        if top is not None and len(_HANDED_OUT) + n > (top - LOWEST_PORT) // 2:
            _HANDED_OUT.clear()  # a long-lived caller: forget the oldest rather than run dry
        _HANDED_OUT.update(ports)
        return ports
    finally:
        for s in socks:
            s.close()


@dataclass(slots=True)
class Proc:
    name: str
    argv: list[str]
    log: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdout=out, stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, grace: float = 5.0) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def kvmesh_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


async def wait_http(session: aiohttp.ClientSession, url: str, proc: Proc,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready at {url} after {timeout:.0f}s:\n{proc.tail()}")


async def wait_listening(ports: Sequence[int], proc: Proc, timeout: float = 30.0) -> None:
    """Until every port accepts a TCP connection (or ``proc`` died)."""
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if not proc.alive:
            raise RuntimeError(f"{proc.name} exited early:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: ports {pending} not listening:\n{proc.tail()}")
        port = pending[0]
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        pending.pop(0)
