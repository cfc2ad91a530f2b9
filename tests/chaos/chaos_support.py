"""Small helpers every chaos scenario uses: waiting on conditions with deadlines, plain HTTP
from the host to a published port, and container health (restarts, memory)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ConditionTimeout(AssertionError):
    """A condition did not hold before its deadline; carries the last value seen."""


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``probe`` until it returns a truthy value; raise with context at the deadline.

    Exceptions from the probe count as "not yet" (a container that is still starting refuses
    connections), and the last one is reported if the deadline passes.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except Exception as exc:  # the probe's target may be down: that is "not yet"
            last = exc
        if time.monotonic() >= deadline:
            extra = f"; {describe()}" if describe else ""
            raise ConditionTimeout(
                f"{what} not reached within {timeout:.1f}s (last: {last!r}){extra}"
            )
        time.sleep(interval)


def each_until(
    probes: dict[str, Callable[[], object]],
    *,
    since: float,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> dict[str, float]:
    """Poll every probe in its own thread until it holds; ``name -> seconds since `since```.

    A probe's time is when the answer that first held arrived: an upper bound on when the
    watched node reached that state, late by one request at most (polling six routers in
    turn would add five more on a busy machine). Raises ``ConditionTimeout`` naming the
    probes that never held within ``timeout`` of ``since``.
    """
    deadline = since + timeout
    times: dict[str, float] = {}
    last: dict[str, object] = {}
    lock = threading.Lock()

    def watch(name: str, probe: Callable[[], object]) -> None:
        while time.monotonic() < deadline:
            try:
                value = probe()
            except Exception as exc:  # down or still starting: not yet
                value = exc
            if value and not isinstance(value, Exception):
                with lock:
                    times[name] = time.monotonic() - since
                return
            with lock:
                last[name] = value
            time.sleep(interval)

    threads = [threading.Thread(target=watch, args=item, daemon=True) for item in probes.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    missing = sorted(set(probes) - set(times))
    if missing:
        raise ConditionTimeout(
            f"{what}: {missing} not within {timeout:.1f}s (last: "
            + ", ".join(f"{m}={last.get(m)!r}" for m in missing)
            + ")"
        )
    return times


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes, dict[str, str]]:
    """GET returning (status, body, headers); HTTP errors are answers, not exceptions."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers.items())


def http_json(url: str, timeout: float = 2.0) -> Any:
    status, body, _ = http_get(url, timeout)
    if status != 200:
        raise RuntimeError(f"GET {url} -> {status}: {body[:200]!r}")
    return json.loads(body)


def http_post(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass(frozen=True, slots=True)
class ContainerHealth:
    name: str
    running: bool
    restart_count: int
    started_at: str
    oom_killed: bool
    rss_bytes: int
    peak_bytes: int
    limit_bytes: int


def container_health(container: Any) -> ContainerHealth:
    """State and memory of one container (docker SDK object), from one inspect + stats call."""
    container.reload()
    state = container.attrs["State"]
    rss = peak = limit = 0
    if state.get("Running"):
        mem = container.stats(stream=False, one_shot=True).get("memory_stats", {})
        stats = mem.get("stats", {})
        rss = int(stats.get("total_rss", stats.get("anon", 0)))
        peak = int(mem.get("max_usage", mem.get("usage", 0)))
        limit = int(mem.get("limit", 0))
    return ContainerHealth(
        name=container.name,
        running=bool(state.get("Running")) and not state.get("Paused"),
        restart_count=int(container.attrs.get("RestartCount", 0)),
        started_at=str(state.get("StartedAt", "")),
        oom_killed=bool(state.get("OOMKilled")),
        rss_bytes=rss,
        peak_bytes=peak,
        limit_bytes=limit,
    )
