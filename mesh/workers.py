"""Several processes serving one router node's port: one primary, the rest workers.

A node with ``workers: N`` runs N processes on one listening port (SO_REUSEPORT; the kernel
spreads connections over them). The **primary** is the node as it is with one process: it
holds the replicated state (prefix index, load vector, membership, gossip), the engine monitor,
the policy, the FCFS queue and the dispatch ledger, and serves requests itself too. A
**worker** parses, validates, tokenizes and keys the requests its connections bring, asks the
primary where each goes (``place``: the primary decides and counts the dispatch in flight),
relays the answer and tells the primary when it has ended (``done``). So the mesh sees one
router: one index in memory, one gossip stream, one set of in-flight counts, one writer of
each fact. What a worker cannot answer from its own state (``/mesh/*`` incl. gossip from
peers, ``/metrics``, ``/ready``, ``/v1/models``, the dashboard) it relays over HTTP to the
primary's private Unix socket.

The seam is :meth:`mesh.router.Router.place` (a link call in a worker) and the ledger's
``start`` / ``done`` (:class:`RelayDispatcher`); the rest of the request path is the
single-process code.
Why one deciding process rather than workers deciding from a shared snapshot, measured:
docs/architecture.md ("Several processes on one host").

:class:`WorkerPool` (primary side) spawns the workers, restarts one that dies (releasing what
it held in flight), answers their calls and merges their counters into the node's
``/metrics``. :func:`worker_main` is a worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from kvevents.block_sizes import SizedKeys, sized_request_keys
from mesh import forward_auth, upstream
from mesh.api import ApiError, Inference, error_response
from mesh.config import RouterConfig
from mesh.decision_log import DecisionEntry
from mesh.dispatch import Ask, Dispatcher, Placement, Target
from mesh.heap import settle
from mesh.metrics import gauge
from mesh.policies.base import Decision, Request
from mesh.precision import Check, Precision, has_media
from mesh.proxy import Forwarder
from mesh.router import Router
from mesh.selfcheck import UsageTap
from mesh.state import LocalOnly
from mesh.tls import client_context
from mesh.view import Ticket
from mesh.worker_link import Link, LinkError, LinkServer, connect

log = logging.getLogger("kvmesh.workers")

_TOKEN = "I" if array("I").itemsize == 4 else "L"
_KEY = "Q"
RESTART_DELAY = (0.2, 5.0)
"""First and longest wait before restarting a worker that died (doubling; reset after a
worker lived ``STABLE`` seconds)."""
STABLE = 30.0
OBSERVED_DELAY = 0.002
"""Seconds an engine's answer waits for a ``done`` note to ride on before it is sent alone."""
ENDED = 1024
"""Ended local dispatches of one worker kept for their engine's answer (it follows within a
few of the worker's dispatches; one that never comes is dropped oldest first)."""
FORWARD_REFUSED = "forward refused: "


# -- the wire form of a placement (sans-I/O) -------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyConfig:
    """What request keys depend on besides the request: the block sizes of the fleet and the
    models that are adapters (their names are key namespaces). The primary learns both; a
    worker keys with the last it was told, and the primary checks each request's."""

    sizes: tuple[int, ...] = (16,)
    adapters: frozenset[str] = frozenset()

    def wire(self) -> list[Any]:
        return [list(self.sizes), sorted(self.adapters)]

    @classmethod
    def of(cls, body: Any) -> KeyConfig:
        return cls(tuple(int(s) for s in body[0]), frozenset(str(a) for a in body[1]))


class WorkerKeys(SizedKeys):
    """A worker's request keys, with what they were computed from (``KeyConfig.sizes``, the
    adapter namespace) and what of the body the primary needs to key the request again when
    its configuration has moved on. ``given``: keys a preparing process already chained (a
    large body), at ``unit``, in the request's namespace. ``hint``: the primary's prediction
    for a local target and its ticket for that dispatch."""

    __slots__ = ("given", "hint", "lora", "lora_path", "salt", "sizes")

    def __init__(self, keys: SizedKeys, sizes: tuple[int, ...], lora: str | None,
                 lora_path: str | None, salt: str | None,
                 given: Sequence[int] | None = None) -> None:
        super().__init__(keys, unit=keys.unit, by_size=keys.by_size,
                         num_tokens=keys.num_tokens, unmatched=keys.unmatched)
        self.sizes = sizes
        self.lora = lora
        self.lora_path = lora_path
        self.salt = salt
        self.given = given
        self.hint: tuple[str, int, int, bool, int | None] | None = None


def ask_wire(ask: Ask) -> list[Any]:
    req = ask.request
    keys = req.keys
    if not isinstance(keys, WorkerKeys):
        raise TypeError("a worker's request carries WorkerKeys")
    ids = req.token_ids if isinstance(req.token_ids, array) else array(_TOKEN, req.token_ids)
    given = None if keys.given is None else array(_KEY, keys.given).tobytes()
    chains = [[s, list(k)] for s, k in keys.by_size.items()]
    return [req.request_id, ids.tobytes(), req.session, req.max_tokens, req.arrival, req.model,
            [keys.unit, list(keys), chains, list(keys.sizes), keys.lora, keys.unmatched],
            keys.lora_path, keys.salt, given,
            ask.forwarded, ask.pinned, ask.origin, sorted(ask.excluded_replicas),
            sorted(ask.excluded_regions), ask.attempt, req.tier, req.deadline]


def worker_keys(wire: Any, num_tokens: int) -> tuple[SizedKeys, tuple[int, ...], str | None]:
    """The keys a worker sent, with the sizes and namespace it used."""
    unit, unit_keys, chains, sizes, lora, unmatched = wire
    keys = SizedKeys(unit_keys, unit=int(unit), by_size={int(s): k for s, k in chains},
                     num_tokens=num_tokens, unmatched=bool(unmatched))
    return keys, tuple(int(s) for s in sizes), lora


def tokens_of(raw: bytes) -> array[int]:
    ids = array(_TOKEN)
    ids.frombytes(raw)
    return ids


def placement_wire(p: Placement, unit: int, worker_unit: int,
                   predicted: tuple[int, int, bool] | None, ticket: int | None = None,
                   config: KeyConfig | None = None) -> list[Any]:
    """``matched_blocks`` in the worker's unit (its request computes cached tokens with it);
    ``ticket``: the dispatch the primary started for it; ``config``: keys were recomputed,
    key with this from now on."""
    d, t = p.decision, p.target
    matched = d.matched_blocks * unit // worker_unit if worker_unit else d.matched_blocks
    return [[d.replica, d.region, d.reason, d.policy, d.wait, d.retry_after, matched,
             d.total_blocks],
            None if t is None else [t.url, t.replica, t.region, t.local, t.delay],
            p.outcome, p.load_age, None if predicted is None else list(predicted), ticket,
            None if config is None else config.wire()]


def placement_of(body: Any) -> tuple[Placement, list[Any] | None, int | None, KeyConfig | None]:
    d, t, outcome, age, predicted, ticket, config = body
    decision = Decision(d[0], d[1], d[2], d[3], bool(d[4]), float(d[5]), int(d[6]), int(d[7]))
    target = None if t is None else Target(t[0], t[1], t[2], bool(t[3]), float(t[4]))
    return (Placement(decision, target, outcome, age), predicted,
            None if ticket is None else int(ticket),
            None if config is None else KeyConfig.of(config))


# -- metrics: the node's totals from every process's counters ----------------------------------

def samples_wire(families: Iterable[Metric]) -> list[Any]:
    """Counters and histograms of one process (gauges mirror the primary's state: its own)."""
    out = []
    for fam in families:
        if fam.type not in ("counter", "histogram"):
            continue
        out.append([fam.name, fam.type, fam.documentation,
                    [[s.name, dict(s.labels), s.value] for s in fam.samples
                     if not s.name.endswith("_created")]])
    return out


Key = tuple[str, tuple[tuple[str, str], ...]]


def add_samples(total: dict[str, tuple[str, str, dict[Key, float]]], wire: Any) -> None:
    for name, typ, doc, samples in wire:
        fam = total.setdefault(name, (typ, doc, {}))
        for sname, labels, value in samples:
            key = (sname, tuple(sorted(labels.items())))
            fam[2][key] = fam[2].get(key, 0.0) + float(value)


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merged(own: Iterable[Metric], others: dict[str, tuple[str, str, dict[Key, float]]]
           ) -> list[Metric]:
    """``own`` families with ``others``' counter and histogram samples added in."""
    out: list[Metric] = []
    seen = set()
    for fam in own:
        extra = others.get(fam.name)
        if extra is None or fam.type != extra[0]:
            out.append(fam)
            continue
        seen.add(fam.name)
        m = Metric(fam.name, fam.documentation, fam.type)
        left = dict(extra[2])
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            m.add_sample(s.name, s.labels, s.value + left.pop(key, 0.0), s.timestamp)
        for (sname, labels), value in left.items():
            m.add_sample(sname, dict(labels), value)
        out.append(m)
    for name, (typ, doc, samples) in others.items():
        if name in seen:
            continue
        m = Metric(name, doc, typ)
        for (sname, labels), value in samples.items():
            m.add_sample(sname, dict(labels), value)
        out.append(m)
    return out


def requests_served(wire: Any) -> float:
    """Answers one process gave (its ``kvmesh_router_requests`` summed over labels)."""
    for name, _typ, _doc, samples in wire:
        if name == "kvmesh_router_requests":
            return sum(float(v) for sname, _, v in samples if sname.endswith("_total"))
    return 0.0


# -- the primary's side ----------------------------------------------------------------------

@dataclass(slots=True)
class WorkerProc:
    """One worker slot (index 1..N-1; the primary is 0) and its current process."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    link: Link | None = None
    started_at: float = 0.0
    restarts: int = 0
    tickets: dict[int, Ticket] = field(default_factory=dict)
    """Dispatches this process has in flight, by the id of the ``place`` call that placed
    them (the worker's)."""
    placing: dict[int, asyncio.Task[Any]] = field(default_factory=dict)
    """``place`` calls being answered (maybe waiting in the queue), by id."""
    requests: dict[int, Request] = field(default_factory=dict)
    """The placed requests of ``tickets`` sent to a local engine, with their predicted
    lengths (learned from when the engine's answer is reported)."""
    ended: OrderedDict[int, Request] = field(default_factory=OrderedDict)
    """Those whose dispatch has ended and whose answer (from the worker's deferred
    bookkeeping, ``mesh.deferred``: on a later ``done`` note or an ``observed`` note) has not
    come yet; at most ``ENDED``."""
    abandoned: set[int] = field(default_factory=set)
    """Ids the worker gave up on before their call was being answered."""
    samples: Any = None
    """Its counters at the last scrape (kept when it dies, so node totals never go back)."""


class WorkerPool:
    """Runs and supervises a primary's workers; answers their link calls."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.count = router.config.workers
        self.dir = tempfile.mkdtemp(prefix="kvmesh-workers-")
        os.chmod(self.dir, 0o700)
        self.link_path = os.path.join(self.dir, "link.sock")
        self.http_path = os.path.join(self.dir, "http.sock")
        self.slots = [WorkerProc(i) for i in range(1, self.count)]
        self.retired: dict[str, tuple[str, str, dict[Key, float]]] = {}
        """Counters of processes that have exited (their last scrape)."""
        self.retired_requests: dict[int, float] = {}
        self._server = LinkServer(self.link_path, self._handle, self._note, self._closed)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        r = self.router
        assert r._runner is not None and r.port is not None
        site = web.UnixSite(r._runner, self.http_path)
        await site.start()
        os.chmod(self.http_path, 0o600)
        await self._server.start()
        r.node_metrics = self.render_metrics
        r.status_sections["workers"] = self.status
        r.metrics.add_provider(self._metrics)
        for slot in self.slots:
            self._tasks.append(asyncio.create_task(self._supervise(slot),
                                                   name=f"worker {slot.index}"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await asyncio.gather(*(self._terminate(s) for s in self.slots))
        await self._server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- supervision ---------------------------------------------------------------------
    def _argv(self, slot: WorkerProc) -> list[str]:
        code = "import sys; from mesh.workers import worker_main; sys.exit(worker_main())"
        return [sys.executable, "-c", code, self.link_path, str(slot.index)]

    async def _supervise(self, slot: WorkerProc) -> None:
        delay = RESTART_DELAY[0]
        while not self._stopping:
            slot.started_at = time.monotonic()
            try:
                slot.proc = await asyncio.create_subprocess_exec(*self._argv(slot),
                                                                 stdin=asyncio.subprocess.DEVNULL)
            except OSError as exc:
                log.error("cannot start worker %d: %s", slot.index, exc)
            else:
                code = await slot.proc.wait()
                if self._stopping:
                    return
                log.warning("worker %d (pid %d) exited with %s; restarting", slot.index,
                            slot.proc.pid, code)
            self._release(slot)
            slot.restarts += 1
            if time.monotonic() - slot.started_at > STABLE:
                delay = RESTART_DELAY[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAY[1])

    async def _terminate(self, slot: WorkerProc) -> None:
        p = slot.proc
        if p is None or p.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(p.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()

    def _release(self, slot: WorkerProc) -> None:
        """A worker is gone: what it had in flight is no longer, its counters are kept."""
        tickets, slot.tickets = slot.tickets, {}
        slot.requests.clear()
        slot.ended.clear()
        slot.abandoned.clear()
        for ticket in tickets.values():
            self._done(ticket)
        if tickets:
            log.warning("released %d dispatches of worker %d", len(tickets), slot.index)
        if slot.samples is not None:
            add_samples(self.retired, slot.samples)
            self.retired_requests[slot.index] = (self.retired_requests.get(slot.index, 0.0)
                                                 + requests_served(slot.samples))
            slot.samples = None
        slot.link = None

    # -- the ledger, for workers' dispatches -------------------------------------------------
    def _hold(self, target: Target, tokens: int, work: float = 0.0) -> Ticket:
        r = self.router
        ticket = r.dispatcher.start(target, tokens, r.clock(), work)
        if ticket.publish:
            self.router._publish_soon()  # once per loop turn, with the node's own
        return ticket

    def _done(self, ticket: Ticket) -> None:
        r = self.router
        r.dispatcher.done(ticket)
        r.kick()  # a completion: re-evaluate a waiting head
        if ticket.publish:
            self.router._publish_soon()  # once per loop turn, with the node's own

    def _slot(self, link: Link) -> WorkerProc | None:
        i = link.info.get("index")
        return self.slots[i - 1] if isinstance(i, int) and 1 <= i < self.count else None

    def _closed(self, link: Link) -> None:
        slot = self._slot(link)
        if slot is not None and slot.link is link:
            self._release(slot)

    # -- calls from workers --------------------------------------------------------------
    async def _handle(self, link: Link, op: str, body: Any) -> Any:
        if op == "place":
            return await self._place(link, body)
        if op == "hello":
            index, pid = int(body[0]), int(body[1])
            if not 1 <= index < self.count:
                raise ValueError(f"no worker slot {index}")
            slot = self.slots[index - 1]
            if slot.proc is None or slot.proc.pid != pid:
                raise ValueError(f"pid {pid} is not worker {index}'s process")
            if slot.link is not None and slot.link is not link:
                self._release(slot)
            link.info = {"index": index, "pid": pid}
            slot.link = link
            r = self.router
            config = replace(r.config, listen=f"{r.config.host}:{r.port}",
                             endpoint_picker=None)
            return [pickle.dumps(config), self.http_path, self.key_config().wire()]
        raise ValueError(f"unknown call {op!r}")

    def key_config(self) -> KeyConfig:
        p = self.router.precision
        adapters = frozenset(m for names in self.router._adapters().values() for m in names)
        return KeyConfig(tuple(sorted(p.sizes.sizes(p._listening))), adapters)

    async def _place(self, link: Link, body: Any) -> Any:
        r = self.router
        slot = self._slot(link)
        if slot is None or slot.link is not link:
            raise ValueError("place before hello")
        pid = int(body[0])
        if pid in slot.abandoned:
            slot.abandoned.discard(pid)
            raise ValueError("abandoned")
        (rid, tok, session, max_tokens, arrival, model, sent, lora_path, salt, given,
         forwarded, pinned, origin, ex_replicas, ex_regions, attempt, tier,
         deadline) = body[1]
        ids = tokens_of(tok)
        now = r.clock()
        keys, w_sizes, w_lora = worker_keys(sent, len(ids))
        w_unit = keys.unit
        config = None
        if given is not None:
            gk = array(_KEY)
            gk.frombytes(given)
            keys = SizedKeys(gk.tolist(), unit=w_unit, by_size={w_unit: gk.tolist()},
                             num_tokens=len(ids))
        else:
            prec = r.precision
            prec.refresh(now)
            if (w_sizes != tuple(sorted(prec.sizes.sizes(prec._listening)))
                    or w_lora != (lora_path or prec.lora_for(model, {}))):
                keys = prec.keys_in(ids, model, lora_path, salt, keys.unmatched, now)
                config = self.key_config()
        req = r.dispatcher.annotate(
            Request(rid, ids, keys, keys.unit, session, max_tokens, arrival, model,
                    tier=str(tier), deadline=float(deadline)))
        if forwarded and attempt == 1:
            # Each process verified the signature; the replay table is the node's, here.
            wall_ms = r.edge.wall() * 1000
            try:
                r.edge.verifier.record(str(origin), rid, int(wall_ms), wall_ms)
            except forward_auth.ForwardRejected as exc:
                r.edge.forward_rejected[exc.reason] += 1
                raise ValueError(f"{FORWARD_REFUSED}{exc.reason}") from None
        if not forwarded and attempt == 1:
            r.demand.observe(model, req.num_tokens, max_tokens, arrival)
        ask = Ask(req, bool(forwarded), pinned, origin, frozenset(ex_replicas),
                  frozenset(ex_regions), attempt)
        task = asyncio.current_task()
        if task is not None:
            slot.placing[pid] = task
        try:
            p = await r.place(ask)
        finally:
            slot.placing.pop(pid, None)
        d, t = p.decision, p.target
        r.decision_log.add(DecisionEntry(
            r.clock(), rid, p.outcome, d.replica, d.region, d.reason,
            d.policy or r.policy.name, req.num_tokens, d.matched_blocks, attempt))
        predicted = None
        held = None
        if t is not None:
            if attempt == 1:
                r.metrics.note_hit(min(d.matched_blocks * keys.unit, max(0, len(ids) - 1)),
                                   len(ids))
            if t.local:
                n = r.precision.lookup.predicted_tokens(keys, t.replica, keys.unit)
                size = r.precision.sizes.size_of(t.replica) or r.precision.sizes.fallback()
                predicted = (n, max(0, len(ids) // size - n // size),
                             r.dispatches.inflight(t.replica) > 0)
            if slot.link is link:
                # The worker dispatches as soon as it has the answer (no await between):
                # counted from here, as the one-process path counts it at dispatch; its
                # ``done`` note names the call.
                slot.tickets[pid] = self._hold(
                    t, len(ids), req.predicted.tokens if req.predicted else 0.0)
                if t.local:
                    slot.requests[pid] = req
                held = pid
        return placement_wire(p, keys.unit, w_unit, predicted, held, config)

    def _note(self, link: Link, op: str, body: Any) -> None:
        slot = self._slot(link)
        if slot is None or slot.link is not link:
            return
        r = self.router
        if op == "done":
            # The dispatch has ended, or the worker gave up on the placement (its client left
            # while it waited in the queue). What the engine said of the prediction comes
            # later (the worker's bookkeeping runs after its next dispatch), with the answers
            # to earlier dispatches this note carries.
            pid = int(body[0])
            for ticket, observed in (body[1] if len(body) > 1 and body[1] else ()):
                self._observed(slot, int(ticket), observed)
            ended = slot.requests.pop(pid, None)
            if ended is not None:
                # A placeholder of the prompt's length: all that length learning reads.
                slot.ended[pid] = replace(ended, token_ids=range(ended.num_tokens), keys=())
                while len(slot.ended) > ENDED:  # an answer that never came (failed early)
                    slot.ended.popitem(last=False)
            ticket = slot.tickets.pop(pid, None)
            task = slot.placing.pop(pid, None)
            if ticket is not None:
                self._done(ticket)
            elif task is not None:
                task.cancel()
            else:
                slot.abandoned.add(pid)  # its call has not started being answered yet
        elif op == "observed":
            for ticket, observed in body[0]:
                self._observed(slot, int(ticket), observed)
        elif op == "mark_down" and r.engines is not None:
            r.report_failure(str(body[0]), str(body[1]))

    def _observed(self, slot: WorkerProc, pid: int, observed: Any) -> None:
        """A local engine's answer to a dispatch placed here: how the prediction fared, and
        the answer's length for the request's own prediction."""
        r = self.router
        replica, predicted, new, concurrent, comparable, status, completed, usage = observed
        tap = UsageTap(False)
        tap.usage = usage if isinstance(usage, dict) else None
        check = Check(replica, int(predicted), int(new), tap, b"", bool(concurrent),
                      bool(comparable))
        r.precision.observe(check, int(status), bool(completed), r.clock())
        done_req = slot.ended.pop(pid, None) or slot.requests.get(pid)
        if done_req is not None and completed and int(status) == 200:
            r._learn_length(done_req, tap.usage)

    # -- the node's metrics and status ---------------------------------------------------
    async def render_metrics(self) -> bytes:
        others: dict[str, tuple[str, str, dict[Key, float]]] = {
            k: (t, d, dict(s)) for k, (t, d, s) in self.retired.items()}

        async def scrape(slot: WorkerProc) -> None:
            if slot.link is None:
                return
            try:
                slot.samples = await asyncio.wait_for(slot.link.call("samples", None), 2.0)
            except (LinkError, ValueError, TimeoutError) as exc:
                log.info("worker %d's metrics not read: %s", slot.index, exc)

        await asyncio.gather(*(scrape(s) for s in self.slots))
        for slot in self.slots:
            if slot.samples is not None:
                add_samples(others, slot.samples)
        registry = CollectorRegistry(auto_describe=False)
        own = list(self.router.metrics.registry.collect())
        registry.register(_Families(merged(own, others)))
        return generate_latest(registry)

    def _metrics(self) -> Iterable[Any]:
        own = self.router.metrics.registry
        served = [(["0"], sum(s.value for fam in own.collect()
                              if fam.name == "kvmesh_router_requests"
                              for s in fam.samples if s.name.endswith("_total")))]
        for slot in self.slots:
            n = self.retired_requests.get(slot.index, 0.0)
            if slot.samples is not None:
                n += requests_served(slot.samples)
            served.append(([str(slot.index)], n))
        c = CounterMetricFamily("kvmesh_router_worker_requests",
                                "Inference requests answered by each process of this node "
                                "(0: the primary; as of this scrape)", labels=["worker"])
        for labels, v in served:
            c.add_metric(labels, v)
        yield c
        yield gauge("kvmesh_router_workers", "Processes serving this node's port, alive", [],
                    [([], 1.0 + sum(1 for s in self.slots if s.link is not None))])
        restarts = CounterMetricFamily("kvmesh_router_worker_restarts",
                                       "Worker processes restarted after they exited")
        restarts.add_metric([], sum(s.restarts for s in self.slots))
        yield restarts

    def status(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "primary": {"index": 0, "pid": os.getpid()},
            "workers": [
                {"index": s.index, "pid": s.proc.pid if s.proc else None,
                 "alive": s.link is not None, "restarts": s.restarts,
                 "inflight": len(s.tickets)}
                for s in self.slots
            ],
        }


# -- the worker's side -----------------------------------------------------------------------

class WorkerPrecision(Precision):
    """A worker keys nothing itself (see :class:`DeferredKeys`) and scores nothing: the
    primary predicts for a local target and records the engine's answer."""

    link: Link | None = None
    key_config: KeyConfig = KeyConfig()
    pending: list[list[Any]] | None = None
    """Answers observed, ``[ticket, observation]``, not sent yet: they ride on the next
    ``done`` note, or go on their own ``OBSERVED_DELAY`` seconds after the first."""
    _flush: asyncio.TimerHandle | None = None

    def keys_for(self, inf: Inference, now: float) -> SizedKeys:
        body = inf.body
        cfg = self.key_config
        if not body and inf.keys:
            unit = self.sizes.fallback()
            given = SizedKeys(inf.keys, unit=unit, by_size={unit: inf.keys},
                              num_tokens=len(inf.token_ids))
            return WorkerKeys(given, cfg.sizes, None, None, None, inf.keys)
        salt, path = body.get("cache_salt"), body.get("lora_path")
        path = path if isinstance(path, str) and path else None
        salt = salt if isinstance(salt, str) else None
        model = inf.model
        lora = path or (model if model in cfg.adapters else None)
        media = has_media(body)
        size = self.sizes.fallback()
        if (inf.keys and cfg.sizes == (size,) and lora is None and not media
                and len(inf.keys) == len(inf.token_ids) // size):
            # Chained while preparing, at the one size the fleet uses (as Precision.keys_for).
            keys = SizedKeys(inf.keys, unit=size, by_size={size: inf.keys},
                             num_tokens=len(inf.token_ids))
        else:
            keys = sized_request_keys(inf.token_ids, cfg.sizes, lora_name=lora, salt=salt,
                                      unmatched=media)
        return WorkerKeys(keys, cfg.sizes, lora, path, salt)

    def prepare(self, inf: Inference, replica: str, keys: Sequence[int],
                block_size: int, concurrent: bool = False, body: bytes | None = None) -> Check:
        c = Precision.prepare(self, inf, replica, keys, block_size, concurrent, body)
        check = WorkerCheck(c.replica, c.predicted, c.new_blocks, c.tap, c.body, c.concurrent,
                            c.comparable)
        hint = keys.hint if isinstance(keys, WorkerKeys) else None
        if hint is not None and hint[0] == replica:  # the primary's prediction
            _, check.predicted, check.new_blocks, check.concurrent, check.ticket = hint
        return check

    def observe(self, check: Check, status: int, completed: bool, now: float) -> str | None:
        """The answer has been relayed: the primary scores it, under the dispatch's ticket
        (this runs after the dispatch's ``done``, and maybe after other dispatches')."""
        ticket = check.ticket if isinstance(check, WorkerCheck) else None
        if self.link is None or ticket is None:
            return None
        if self.pending is None:
            self.pending = []
        self.pending.append([ticket, [check.replica, check.predicted, check.new_blocks,
                                      check.concurrent, check.comparable, status, completed,
                                      check.tap.usage]])
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(OBSERVED_DELAY, self.flush)
        return None

    def take(self) -> list[list[Any]] | None:
        """The answers not sent yet (for a frame going to the primary anyway)."""
        pending, self.pending = self.pending, None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        return pending

    def flush(self) -> None:
        """Send the answers not sent yet on a note of their own."""
        pending = self.take()
        if pending and self.link is not None:
            with contextlib.suppress(LinkError):
                self.link.notify("observed", [pending])


@dataclass(slots=True)
class WorkerCheck(Check):
    """A local dispatch under observation, with the primary's ticket for it."""

    ticket: int | None = None


@dataclass(slots=True)
class RelayDispatcher(Dispatcher):
    """The worker's ledger: a dispatch is counted at the primary when it answers ``place``
    (the dispatch follows at once); ``done`` tells it the dispatch has ended."""

    link: Link | None = None
    precision: WorkerPrecision | None = None
    held: tuple[Target, int] | None = None
    """The last placement's target and the primary's ticket for it, not yet dispatched."""
    remote: dict[int, int] = field(default_factory=dict)
    """Our ticket id -> the primary's."""

    def start(self, target: Target, tokens: int, now: float, work: float = 0.0) -> Ticket:
        ticket = Dispatcher.start(self, target, tokens, now, work)
        held, self.held = self.held, None
        if held is not None and held[0] == target:
            self.remote[ticket.id] = held[1]
        else:  # never expected: the dispatch follows its placement at once
            log.error("dispatch to %s without its placement: not counted at the primary",
                      target.url)
        return ticket

    def done(self, ticket: Ticket) -> None:
        Dispatcher.done(self, ticket)
        tid = self.remote.pop(ticket.id, None)
        if self.link is not None and tid is not None:
            # Earlier dispatches' answers ride along (one frame per request, not two).
            observed = self.precision.take() if self.precision is not None else None
            with contextlib.suppress(LinkError):
                self.link.notify("done", [tid, observed])


@dataclass(slots=True)
class _EngineNotes:
    """What the request path tells the engine monitor, sent to the primary's."""

    link: Link
    states: Mapping[str, Any] = field(default_factory=dict)
    adapters: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def mark_down(self, replica: str, reason: str) -> None:
        with contextlib.suppress(LinkError):
            self.link.notify("mark_down", [replica, reason])

    def healthy(self, replica: str) -> bool:
        return True


_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                          "host", "upgrade"})


class WorkerRouter(Router):
    """A worker process's router: the request path of :class:`Router`, deciding through the
    primary and relaying to it every route about the node."""

    def __init__(self, config: RouterConfig, link: Link, http_path: str,
                 keys: KeyConfig) -> None:
        super().__init__(config, backend=LocalOnly())
        self.link = link
        self.http_path = http_path
        d = self.dispatcher
        self.dispatcher = RelayDispatcher(
            region=d.region, policy=d.policy, views=d.views, local=d.local,
            healthy=d.healthy, rng=d.rng, max_queue=d.max_queue, emulated_rtt=d.emulated_rtt,
            link=link)
        precision = WorkerPrecision(config, self.backend, self._adapters)
        precision.link = link
        precision.key_config = keys
        self.precision = precision
        self.dispatcher.precision = precision
        self._relay_session: aiohttp.ClientSession | None = None
        self._place_ids = itertools.count()

    def _routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/{tail:.*}", self.relay)]

    async def start(self) -> None:
        tls = client_context(self.config)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300,
                                         ssl=tls if tls is not None else True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self._relay_session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(self.http_path), auto_decompress=False)
        self.forwarder = Forwarder(
            upstream.Pool(tls, self.config.connect_timeout),
            request_timeout=self.config.request_timeout,
            first_byte_timeout=self.config.first_byte_timeout)
        self.engines = _EngineNotes(self.link)  # type: ignore[assignment]
        self._runner = self.edge.runner(self.app)
        await self._runner.setup()
        self.port = await self.edge.listen(self._runner, self.config.host, self.config.port,
                                           reuse_port=True)

    async def stop(self) -> None:
        await self.edge.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.tokenizer.aclose()
        if self.forwarder is not None:
            self.forwarder.pool.close()
        for s in (self._session, self._relay_session):
            if s is not None:
                await s.close()
        self.deferred.close()  # the last answers' bookkeeping, sent before the link closes
        if isinstance(self.precision, WorkerPrecision):
            self.precision.flush()
        await self.link.close()

    async def place(self, ask: Ask) -> Placement:
        keys = ask.request.keys
        pid = next(self._place_ids)
        try:
            answer = await self.link.call("place", [pid, ask_wire(ask)])
        except asyncio.CancelledError:
            with contextlib.suppress(LinkError):  # the client went away: let go of it
                self.link.notify("done", [pid])
            raise
        except ValueError as exc:
            reason = str(exc)
            if not reason.startswith(FORWARD_REFUSED):
                raise
            raise ApiError(403, f"forwarded request refused: {reason[len(FORWARD_REFUSED):]}",
                           type="permission_error", code="bad_forward_signature") from None
        except LinkError as exc:
            raise ApiError(503, f"this node's primary process is not reachable: {exc}",
                           type="server_error", code="primary_unavailable") from None
        p, predicted, ticket, config = placement_of(answer)
        if config is not None and isinstance(self.precision, WorkerPrecision):
            self.precision.key_config = config
        if isinstance(keys, WorkerKeys):
            keys.hint = None if predicted is None or p.target is None else (
                p.target.replica, int(predicted[0]), int(predicted[1]), bool(predicted[2]),
                ticket)
        if p.target is not None and ticket is not None and isinstance(
                self.dispatcher, RelayDispatcher):
            self.dispatcher.held = (p.target, ticket)
        return p

    def kick(self) -> None:
        return None

    def _publish(self) -> None:
        return None

    def _publish_soon(self) -> None:
        return None

    async def relay(self, request: web.Request) -> web.StreamResponse:
        """A route about the node: answered by the primary, through its private socket."""
        assert self._relay_session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        body = await request.read() if request.can_read_body else None
        try:
            async with self._relay_session.request(
                    request.method, f"http://primary{request.path_qs}", headers=headers,
                    data=body, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=30)) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in _HOP_HEADERS:
                        resp.headers.add(k, v)
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            return error_response(503, f"this node's primary process did not answer: {exc}",
                                  type="server_error", code="primary_unavailable")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return await self.relay(request)  # type: ignore[return-value]

    async def status_page(self, request: web.Request) -> web.Response:
        return await self.relay(request)  # type: ignore[return-value]

    async def ready_page(self, request: web.Request) -> web.Response:
        return await self.relay(request)  # type: ignore[return-value]

    async def models_page(self, request: web.Request) -> web.Response:
        return await self.relay(request)  # type: ignore[return-value]

    async def samples(self, link: Link, op: str, body: Any) -> Any:
        if op == "samples":
            # A reader sees every answer relayed before it asked (as the primary's own
            # /metrics does): this process's pending bookkeeping first (mesh.deferred).
            self.deferred.run()
            if isinstance(self.precision, WorkerPrecision):
                self.precision.flush()  # (sent before this answer: the primary has it first)
            return samples_wire(self.metrics.registry.collect())
        raise ValueError(f"unknown call {op!r}")


async def run_worker(link_path: str, index: int) -> int:
    holder: list[WorkerRouter] = []

    async def handler(link: Link, op: str, body: Any) -> Any:
        if not holder:
            raise ValueError("starting")
        return await holder[0].samples(link, op, body)

    link = await connect(link_path, handler)
    raw, http_path, keys = await link.call("hello", [index, os.getpid()])
    config: RouterConfig = pickle.loads(raw)  # our own primary, over its private socket
    logging.getLogger().setLevel(config.log_level.upper())
    router = WorkerRouter(config, link, http_path, KeyConfig.of(keys))
    holder.append(router)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await router.start()
    settle()  # startup objects out of later garbage collections (mesh.heap)
    log.info("worker %d (pid %d) serving port %s", index, os.getpid(), router.port)
    closed = asyncio.create_task(link.closed.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
    for t in (closed, stopped):
        t.cancel()
    if link.closed.is_set() and not stop.is_set():
        log.warning("worker %d: the primary closed the link; exiting", index)
    await router.stop()
    return 0


def worker_main(argv: Sequence[str] | None = None) -> int:
    """A worker process: ``LINK_PATH INDEX`` (started by :class:`WorkerPool`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level="INFO",
                        format=f"%(asctime)s %(levelname)s %(name)s[w{args[1]}]: %(message)s")
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.run(run_worker(args[0], int(args[1])))
    result: int = uvloop.run(run_worker(args[0], int(args[1])))
    return result
