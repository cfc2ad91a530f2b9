"""Health and load of this router's own engines, scraped over HTTP.

Every ``interval`` each engine's ``/health`` and ``/metrics`` are fetched; vLLM's gauges
(``vllm:num_requests_waiting``, ``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``,
with the older ``vllm:gpu_cache_usage_perc``) and SGLang's (``sglang:num_queue_reqs``,
``sglang:num_running_reqs``, ``sglang:token_usage``) become one :class:`EngineLoad`, summed
over label sets. A failed probe marks the engine down at once, and so does the proxy when
it cannot connect; one good probe brings it back. Every change is handed to ``on_update``,
which writes the load vector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import aiohttp

from mesh.config import EngineConfig

log = logging.getLogger("kvmesh.engines")

_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")


@dataclass(frozen=True, slots=True)
class EngineLoad:
    waiting: float
    running: float
    kv_usage: float


@dataclass(frozen=True, slots=True)
class EngineState:
    url: str
    healthy: bool = False
    load: EngineLoad | None = None
    measured_at: float = float("-inf")
    """Monotonic time of the last good scrape."""
    failures: int = 0
    reason: str = "not probed yet"
    models: tuple[str, ...] = ()


def parse_metrics(text: str) -> EngineLoad | None:
    """The three gauges from a Prometheus text page; None when the page has none of them."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end <= 0:
            continue
        name = line[:name_end]
        if name not in _WAITING and name not in _RUNNING and name not in _KV:
            continue
        rest = line[name_end:]
        if rest.startswith("{"):
            rest = rest[rest.find("}") + 1:] if "}" in rest else ""
        try:
            value = float(rest.split()[0])
        except (ValueError, IndexError):
            continue
        if value != value:  # NaN
            continue
        sums[name] = sums.get(name, 0.0) + value
    if not sums:
        return None

    def first(names: Iterable[str]) -> float:
        return next((sums[n] for n in names if n in sums), 0.0)

    kv = first(_KV)
    return EngineLoad(waiting=first(_WAITING), running=first(_RUNNING),
                      kv_usage=min(max(kv, 0.0), 1.0))


class EngineMonitor:
    """Probes the local engines; the single writer of their health and load."""

    def __init__(
        self,
        engines: Iterable[EngineConfig],
        session: aiohttp.ClientSession,
        *,
        interval: float = 0.1,
        timeout: float = 1.0,
        models_every: float = 5.0,
        on_update: Callable[[EngineState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engines = {e.url: e for e in engines}
        self.states: dict[str, EngineState] = {u: EngineState(u) for u in self.engines}
        self._session = session
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._models_every = models_every
        self._models_at: dict[str, float] = {}
        self.adapters: dict[str, frozenset[str]] = {}
        """Per engine: served model ids that are LoRA adapters (``parent`` set in /v1/models)."""
        self._on_update = on_update
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self.probes = 0
        self.probe_failures = 0

    def start(self) -> None:
        for url in self.engines:
            self._tasks.append(asyncio.create_task(self._loop(url), name=f"probe {url}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    def healthy(self, url: str) -> bool:
        s = self.states.get(url)
        return s is not None and s.healthy

    def mark_down(self, url: str, reason: str) -> None:
        """Stop sending new requests to ``url`` now (the proxy failed to reach it)."""
        s = self.states.get(url)
        if s is None or not s.healthy:
            return
        log.warning("engine %s down: %s", url, reason)
        self._set(replace(s, healthy=False, failures=s.failures + 1, reason=reason))

    def _set(self, state: EngineState) -> None:
        self.states[state.url] = state
        if self._on_update is not None:
            self._on_update(state)

    async def _loop(self, url: str) -> None:
        while True:
            started = self._clock()
            try:
                await self.probe(url)
            except asyncio.CancelledError:
                raise
            except Exception:  # a probe must never end the loop
                log.exception("probe of %s failed unexpectedly", url)
            await asyncio.sleep(max(0.0, self._interval - (self._clock() - started)))

    async def probe(self, url: str) -> EngineState:
        self.probes += 1
        prev = self.states[url]
        try:
            async with self._session.get(f"{url}/health", timeout=self._timeout) as resp:
                await resp.read()
                if resp.status != 200:
                    raise _ProbeError(f"/health answered {resp.status}")
            async with self._session.get(f"{url}/metrics", timeout=self._timeout) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise _ProbeError(f"/metrics answered {resp.status}")
            load = parse_metrics(text)
            if load is None:
                raise _ProbeError("/metrics has no vllm:/sglang: load gauges")
            models = prev.models
            now = self._clock()
            if now - self._models_at.get(url, float("-inf")) >= self._models_every:
                models = await self._models(url) or models
                self._models_at[url] = now
        except (aiohttp.ClientError, TimeoutError, _ProbeError, ValueError) as exc:
            self.probe_failures += 1
            reason = str(exc) or type(exc).__name__
            if prev.healthy:
                log.warning("engine %s down: %s", url, reason)
            state = replace(prev, healthy=False, failures=prev.failures + 1, reason=reason)
            self._set(state)
            return state
        if not prev.healthy:
            log.info("engine %s up", url)
        state = EngineState(url, True, load, self._clock(), 0, "ok", models)
        self._set(state)
        return state

    async def _models(self, url: str) -> tuple[str, ...]:
        try:
            async with self._session.get(f"{url}/v1/models", timeout=self._timeout) as resp:
                if resp.status != 200:
                    return ()
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return ()
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            return ()
        self.adapters[url] = frozenset(
            str(m["id"]) for m in data if isinstance(m, dict) and "id" in m and m.get("parent")
        )
        return tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)


class _ProbeError(Exception):
    pass
