"""A steady, bounded load generator that records the outcome of every request.

Runs on the host in its own thread and event loop (the scenario's thread is busy breaking
containers meanwhile). Each client belongs to a region and talks to that region's routers
through their published ports: it sends a chat-style completion, and on a connection error,
a timeout or a 5xx it retries on the region's next router, as a real client with two
router addresses would. A request is *lost* when every attempt failed.

The workload shares prefixes across clients and regions (a few "documents", each with a
growing conversation), so the routers' prefix maps have something to say, and keeps
``max_tokens`` small so a 2-core machine is not flooded. Each region also has a long "home"
document its own clients use; now and then a client asks about another region's, whose
prefix only that region's engines hold: the kind of request worth forwarding one hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from chaos_support import wait_until

Targets = Callable[[str], list[tuple[str, str]]]
"""region -> [(router alias, base URL)] in preference order, read at each attempt."""

_DOCS = [
    " ".join(f"{topic}{i}" for i in range(160))
    for topic in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot")
]
HOME_WORDS = 600
"""About 1200 prompt tokens: prefilling that costs more than a round trip between regions."""
HOME_SHARE, FOREIGN_SHARE = 0.2, 0.1
"""Fractions of a client's requests on its own region's home document and on another's."""


def home_doc(region: str) -> str:
    return " ".join(f"{region}-manual-{i}" for i in range(HOME_WORDS))


@dataclass(frozen=True, slots=True)
class Attempt:
    router: str
    t_start: float
    t_end: float
    status: int  # HTTP status; 0 when no answer (refused, reset, timeout)
    error: str
    replica: str
    replica_region: str
    route: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens the engine served from its prefix cache (its ``usage``): real hits."""


@dataclass(frozen=True, slots=True)
class Outcome:
    client: str
    region: str
    seq: int
    t_start: float
    t_end: float
    attempts: tuple[Attempt, ...]

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].status == 200

    @property
    def served_by(self) -> Attempt | None:
        return self.attempts[-1] if self.ok else None

    def describe(self, origin: float = 0.0) -> str:
        """The request and every attempt, times in seconds since ``origin`` (for asserts)."""
        tries = "; ".join(
            f"#{i + 1} {a.router} {a.t_start - origin:+.2f}..{a.t_end - origin:+.2f}s "
            f"status {a.status}" + (f" ({a.error[:80]})" if a.error else "")
            + (f" via {a.replica_region}" if a.replica_region else "")
            for i, a in enumerate(self.attempts))
        return (f"request {self.client}#{self.seq} {self.t_start - origin:+.2f}.."
                f"{self.t_end - origin:+.2f}s: {tries or 'no attempt'}")


@dataclass(slots=True)
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return len(self.outcomes)

    @property
    def lost(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def retried(self) -> list[Outcome]:
        return [o for o in self.outcomes if len(o.attempts) > 1]

    def between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        """Requests that started in ``[start, end)`` (monotonic seconds)."""
        return [o for o in self.outcomes if start <= o.t_start < end]

    def hit_rate(self, router: str, start: float, end: float = float("inf")
                 ) -> tuple[float | None, int]:
        """(cached / prompt tokens, requests) of the requests ``router`` served that started
        in ``[start, end)``: the engines' real prefix-cache hits."""
        served = [o.served_by for o in self.between(start, end)]
        mine = [a for a in served if a is not None and a.router == router]
        prompt = sum(a.prompt_tokens for a in mine)
        return (sum(a.cached_tokens for a in mine) / prompt if prompt else None), len(mine)

    def summary(self) -> str:
        errors: dict[str, int] = {}
        for o in self.outcomes:
            for a in o.attempts:
                if a.status != 200:
                    key = f"{a.router}:{a.status}:{a.error[:60]}"
                    errors[key] = errors.get(key, 0) + 1
        top = sorted(errors.items(), key=lambda kv: -kv[1])[:8]
        return (
            f"sent {self.sent}, lost {len(self.lost)}, retried {len(self.retried)}; "
            f"failed attempts: {top}"
        )


class LoadGenerator:
    """``start()``, break things, ``stop()`` -> :class:`LoadReport`. Bounded in count and time."""

    def __init__(
        self,
        targets: Targets,
        regions: tuple[str, ...],
        *,
        clients_per_region: int = 2,
        think_s: float = 0.05,
        max_requests: int = 4000,
        max_duration_s: float = 120.0,
        attempt_timeout_s: float = 4.0,
        max_attempts: int = 3,
        max_tokens: int = 8,
        seed: int = 0,
    ) -> None:
        self.targets = targets
        self.regions = regions
        self.clients_per_region = clients_per_region
        self.think_s = think_s
        self.max_requests = max_requests
        self.max_duration_s = max_duration_s
        self.attempt_timeout_s = attempt_timeout_s
        self.max_attempts = max_attempts
        self.max_tokens = max_tokens
        self.seed = seed
        self.report = LoadReport()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._issued = 0

    # ---- control from the scenario's thread ------------------------------------------
    def start(self) -> LoadGenerator:
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self._thread.start()
        return self

    def mark(self, name: str) -> float:
        """Record a named instant (monotonic) in the report, e.g. ``mark("kill")``."""
        now = time.monotonic()
        with self._lock:
            self.report.marks[name] = now
        return now

    def count(self) -> int:
        with self._lock:
            return len(self.report.outcomes)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.report.outcomes)

    def wait_for(self, n: int, timeout: float) -> None:
        """Wait until ``n`` more requests have completed (progress under the fault)."""
        target = self.count() + n
        wait_until(lambda: self.count() >= target, timeout=timeout, what=f"{n} more requests")

    def stop(self) -> LoadReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.attempt_timeout_s * self.max_attempts + 10)
            if self._thread.is_alive():
                raise RuntimeError("load generator did not stop")
        return self.report

    def __enter__(self) -> LoadGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the event loop --------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_duration_s
        timeout = aiohttp.ClientTimeout(total=self.attempt_timeout_s, connect=2.0)
        connector = aiohttp.TCPConnector(limit=64, force_close=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            clients = [
                self._client(session, region, k, deadline)
                for region in self.regions
                for k in range(self.clients_per_region)
            ]
            await asyncio.gather(*clients)

    def _take_ticket(self) -> int | None:
        with self._lock:
            if self._issued >= self.max_requests:
                return None
            self._issued += 1
            return self._issued

    async def _client(
        self, session: aiohttp.ClientSession, region: str, k: int, deadline: float
    ) -> None:
        name = f"{region}-{k}"
        rng = random.Random(f"{self.seed}-{name}")
        turns: dict[str, list[str]] = {}
        while not self._stop.is_set() and time.monotonic() < deadline:
            seq = self._take_ticket()
            if seq is None:
                return
            doc = self._pick_doc(rng, region)
            history = turns.setdefault(doc, [])
            history.append(f"question {name} {len(history)}: {rng.random():.6f}")
            if len(history) > 6:
                history.clear()
            prompt = doc + "\n" + "\n".join(history)
            outcome = await self._request(session, name, k, region, seq, prompt)
            with self._lock:
                self.report.outcomes.append(outcome)
            await asyncio.sleep(self.think_s)

    def _pick_doc(self, rng: random.Random, region: str) -> str:
        draw = rng.random()
        others = [r for r in self.regions if r != region]
        if draw < FOREIGN_SHARE and others:
            return home_doc(rng.choice(others))
        if draw < FOREIGN_SHARE + HOME_SHARE:
            return home_doc(region)
        return rng.choice(_DOCS)

    async def _request(
        self,
        session: aiohttp.ClientSession,
        name: str,
        k: int,
        region: str,
        seq: int,
        prompt: str,
    ) -> Outcome:
        """Client ``k`` prefers router ``k``; each retry moves to the next router."""
        t0 = time.monotonic()
        attempts: list[Attempt] = []
        body = {"model": "sim", "prompt": prompt, "max_tokens": self.max_tokens}
        for n in range(self.max_attempts):
            routers = self.targets(region)
            if not routers:
                break
            alias, base = routers[(k + n) % len(routers)]
            attempt = await self._attempt(session, alias, base, body)
            attempts.append(attempt)
            if attempt.status == 200 or 400 <= attempt.status < 500:
                break
            if self._stop.is_set() and n >= 1:
                break
        return Outcome(name, region, seq, t0, time.monotonic(), tuple(attempts))

    async def _attempt(
        self, session: aiohttp.ClientSession, alias: str, base: str, body: dict[str, object]
    ) -> Attempt:
        t0 = time.monotonic()
        status, error, headers = 0, "", {}
        prompt_tokens = cached_tokens = 0
        try:
            async with session.post(f"{base}/v1/completions", json=body) as resp:
                status = resp.status
                headers = dict(resp.headers)
                text = await resp.text()
                if status != 200:
                    error = text[:200]
                else:
                    with contextlib.suppress(ValueError):
                        data = await resp.json(content_type=None)
                        if not data.get("choices"):
                            status, error = 0, f"answer without choices: {text[:120]}"
                        usage = data.get("usage") or {}
                        prompt_tokens = int(usage.get("prompt_tokens") or 0)
                        details = usage.get("prompt_tokens_details") or {}
                        cached_tokens = int(details.get("cached_tokens") or 0)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, error = 0, f"{type(exc).__name__}: {exc}"[:200]
        return Attempt(
            router=alias,
            t_start=t0,
            t_end=time.monotonic(),
            status=status,
            error=error,
            replica=headers.get("x-kvmesh-replica", ""),
            replica_region=headers.get("x-kvmesh-region", ""),
            route=headers.get("x-kvmesh-route", ""),
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
        )
