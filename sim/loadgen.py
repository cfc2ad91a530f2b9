"""Drive a workload's clients against real routers over HTTP, recording every request.

The same :class:`~sim.workloads.base.Client` objects the discrete-event simulator drives
(:class:`sim.fleet.Fleet`), driven the same way but in real time: a request leaves at its
``sent_at`` (seconds since the run started), ``on_sent`` runs as it leaves (open-loop
sources chain their next arrival there), ``on_complete`` when its last token arrived
(closed-loop clients send their next turn from there), and nothing new leaves after the
workload's horizon. Requests in flight then get ``drain_s`` more seconds.

Each request is a streamed ``/v1/completions`` call whose ``prompt`` is the workload's token
ids and whose ``max_tokens`` is the reply length the workload planned, so the engine sees
exactly the simulator's prompt and produces a reply of exactly that length. Its text is not
the workload's planned reply, so a chat client records the reply the engine actually
produced (re-tokenized, it is the very ids the engine cached): the next turn then hits the
engine's cache as the simulated one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from kvevents.tokenizers.base import BuiltinTokenizer
from sim.fleet import CLIENTS_START_S
from sim.metrics import RequestRecord
from sim.workloads.base import Client, SimRequest, Workload

UNFINISHED = "unfinished at the end of the drain"


@dataclass(frozen=True, slots=True)
class Entry:
    """Where a client sends its requests: a router (possibly through a delay gateway)."""

    url: str
    router: str
    region: str


@dataclass(slots=True)
class Observation:
    """One request as the client saw it; ``record`` is in the simulator's format."""

    record: RequestRecord
    max_tokens: int
    replica_url: str = ""
    route: str = ""
    status: int = 0
    error: str = ""
    lag: float = 0.0
    """How late it left, against its schedule (the load generator's own delay)."""

    @property
    def ok(self) -> bool:
        return not self.error and self.record.done is not None

    def to_dict(self) -> dict[str, object]:
        r = self.record
        return {
            "rid": r.rid,
            "client": r.client,
            "region": r.region,
            "user": r.user,
            "kind": r.kind,
            "sent": round(r.sent, 6),
            "ttft": _finite(r.ttft),
            "e2e": _finite(r.e2e),
            "prompt_tokens": r.prompt_tokens,
            "cached_tokens": r.cached_tokens,
            "output_tokens": r.output_tokens,
            "max_tokens": self.max_tokens,
            "router": r.router,
            "replica": r.replica,
            "replica_region": r.replica_region,
            "replica_url": self.replica_url,
            "forwards": r.forwards,
            "route": self.route,
            "status": self.status,
            "error": self.error,
            "lag": round(self.lag, 6),
        }


def _finite(x: float) -> float | None:
    return round(x, 6) if math.isfinite(x) else None


Progress = Callable[[float, int, int], None]
"""``progress(seconds since start, requests sent, requests finished)``."""


class LoadGenerator:
    """One run of one workload. ``entry`` says which router each client talks to;
    ``replica_names`` maps the replica URLs routers report to the simulator's names."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        workload: Workload,
        entry: Callable[[Client], Entry],
        *,
        model: str,
        replica_names: Mapping[str, str] | None = None,
        start_s: float = CLIENTS_START_S,
    ) -> None:
        self.session = session
        self.workload = workload
        self.entry = entry
        self.model = model
        self.replica_names = dict(replica_names or {})
        self.start_s = start_s
        self.observations: list[Observation] = []
        self._tokenizer = BuiltinTokenizer()
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0 = 0.0
        self._finished = 0

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def run(self, drain_s: float, progress: Progress | None = None) -> list[Observation]:
        """Send until the horizon, wait up to ``drain_s`` for the rest, return every request."""
        self._t0 = asyncio.get_running_loop().time()
        horizon = self.workload.horizon_s
        for client in self.workload.clients:
            self._schedule(client, client.start(self.start_s))
        end = horizon + drain_s
        try:
            while self.now() < end:
                if self.now() >= horizon and not self._tasks:
                    break
                await asyncio.sleep(min(1.0, max(0.01, end - self.now())))
                if progress is not None:
                    progress(self.now(), len(self.observations), self._finished)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for obs in self.observations:
            if obs.record.done is None and not obs.error:
                obs.error = UNFINISHED
        return self.observations

    def _schedule(self, client: Client, reqs: Iterable[SimRequest]) -> None:
        for req in reqs:
            if req.sent_at < self.workload.horizon_s:
                task = asyncio.create_task(self._send_at(client, req))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send_at(self, client: Client, req: SimRequest) -> None:
        delay = req.sent_at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        now = self.now()
        target = self.entry(client)
        rec = RequestRecord(
            rid=req.rid,
            client=req.client,
            region=req.region,
            user=req.user,
            kind=req.kind,
            sent=now,
            prompt_tokens=req.prompt_len,
            output_tokens=req.output_len,
            router=target.router,
            router_region=target.region,
        )
        obs = Observation(rec, req.output_len, lag=max(0.0, now - req.sent_at))
        self.observations.append(obs)
        self._schedule(client, client.on_sent(req, now))
        reply: tuple[int, ...] | None = None
        try:
            reply = await self._request(target, req, obs)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            obs.error = f"{type(exc).__name__}: {exc}"[:300]
        if obs.error:
            rec.done = None
        else:
            self._finished += 1
        # A failed request still ends its turn: the client moves on, as in the simulator.
        done = replace(req, output=reply) if reply else req
        self._schedule(client, client.on_complete(done, self.now()))

    async def _request(
        self, target: Entry, req: SimRequest, obs: Observation
    ) -> tuple[int, ...] | None:
        rec = obs.record
        body = {
            "model": self.model,
            "prompt": list(req.prompt),
            "max_tokens": req.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"x-session-id": req.user, "x-request-id": f"emu-{req.rid:x}"}
        parts: list[str] = []
        usage: Mapping[str, Any] = {}
        finished = False
        async with self.session.post(
            f"{target.url}/v1/completions", json=body, headers=headers
        ) as resp:
            obs.status = resp.status
            obs.replica_url = resp.headers.get("x-kvmesh-replica", "")
            obs.route = resp.headers.get("x-kvmesh-route", "")
            rec.replica = self.replica_names.get(obs.replica_url, obs.replica_url)
            rec.replica_region = resp.headers.get("x-kvmesh-region", "")
            rec.forwards = 1 if "| via " in obs.route else 0
            predicted = resp.headers.get("x-kvmesh-predicted-ttft")
            with contextlib.suppress(ValueError):
                rec.predicted_ttft = float(predicted) if predicted else None
            if resp.status != 200:
                text = (await resp.text())[:300]
                obs.error = f"HTTP {resp.status}: {text}"
                return None
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    finished = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    obs.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return None
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") or ""
                    if text:
                        if rec.first_token is None:
                            rec.first_token = self.now()
                        parts.append(text)
                if chunk.get("usage"):
                    usage = chunk["usage"]
        rec.done = self.now()
        if not finished:
            obs.error = "stream ended without [DONE]"
            return None
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens") or 0)
        rec.output_tokens = int(usage.get("completion_tokens", len(parts)))
        if usage.get("prompt_tokens") is not None:
            rec.prompt_tokens = int(usage["prompt_tokens"])
        return tuple(self._tokenizer.encode("".join(parts)))


__all__ = ["UNFINISHED", "Entry", "LoadGenerator", "Observation", "Progress"]
