"""Mooncake-style JSONL traces: read, validate, synthesize, and replay as a workload.

One line per request: ``{"timestamp": ms, "input_length": n, "output_length": m,
"hash_ids": [..]}``. Each hash id names one ``block_tokens``-token block (512 by
convention) of prompt content; two requests whose ``hash_ids`` share a leading run share that
prefix. A request's prompt is materialised as token ids: block ``h`` is always the same
``block_tokens`` ids (derived from ``h`` and the seed), the last block is cut to
``input_length``, and tokens not covered by any hash id are unique to the request.

A malformed line is a ``TraceFormatError`` naming the file and line; with ``strict=False``
the reader skips it and records the reason in ``TraceIssues`` instead.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sim.workloads.base import (
    FIRST_CONTENT_ID,
    VOCAB,
    RidSpace,
    SimRequest,
    Workload,
    content_tokens,
    rng_for,
)

BLOCK_TOKENS = 512


class TraceFormatError(ValueError):
    """A trace line that cannot be a request; ``where`` is ``file:line``."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TraceRecord:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    line: int


@dataclass(slots=True)
class TraceIssues:
    """Lines skipped under ``strict=False``: how many, and the first few reasons."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, err: TraceFormatError) -> None:
        self.skipped += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))


def _int_field(obj: Mapping[str, object], name: str, minimum: int) -> int:
    if name not in obj:
        raise ValueError(f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name!r} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name!r} must be >= {minimum}, got {value}")
    return value


def parse_line(text: str, line: int, block_tokens: int = BLOCK_TOKENS) -> TraceRecord:
    """One JSONL line -> a record; ``ValueError`` with the reason (no location) otherwise."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("timestamp")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise ValueError(f"'timestamp' must be a number of milliseconds, got {ts!r}")
    if not math.isfinite(ts) or ts < 0:
        raise ValueError(f"'timestamp' must be finite and >= 0, got {ts!r}")
    input_length = _int_field(obj, "input_length", 1)
    output_length = _int_field(obj, "output_length", 1)
    raw = obj.get("hash_ids", [])
    if not isinstance(raw, list):
        raise ValueError(f"'hash_ids' must be a list of integers, got {type(raw).__name__}")
    hash_ids: list[int] = []
    for i, h in enumerate(raw):
        if isinstance(h, bool) or not isinstance(h, int) or h < 0:
            raise ValueError(f"'hash_ids'[{i}] must be a non-negative integer, got {h!r}")
        hash_ids.append(h)
    blocks = -(-input_length // block_tokens)
    if len(hash_ids) > blocks:
        raise ValueError(
            f"{len(hash_ids)} hash_ids cover more than input_length={input_length} tokens "
            f"({blocks} blocks of {block_tokens})"
        )
    return TraceRecord(float(ts), input_length, output_length, tuple(hash_ids), line)


def read_mooncake(
    source: str | os.PathLike[str] | Iterable[str],
    *,
    block_tokens: int = BLOCK_TOKENS,
    strict: bool = True,
    issues: TraceIssues | None = None,
) -> Iterator[TraceRecord]:
    """Records in file order; timestamps must not go backwards.

    ``source`` is a path or an iterable of lines (then named ``<lines>`` in errors). Blank
    lines are skipped. ``strict=False`` skips bad lines, counting them in ``issues``.
    """
    if isinstance(source, str | os.PathLike):
        name = os.fspath(source)
        with open(name, encoding="utf-8") as fh:
            yield from _records(fh, name, block_tokens, strict, issues)
    else:
        yield from _records(source, "<lines>", block_tokens, strict, issues)


def _records(
    lines: Iterable[str],
    name: str,
    block_tokens: int,
    strict: bool,
    issues: TraceIssues | None,
) -> Iterator[TraceRecord]:
    last_ts = -math.inf
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            rec = parse_line(text, lineno, block_tokens)
            if rec.timestamp_ms < last_ts:
                raise ValueError(
                    f"timestamp {rec.timestamp_ms:g} ms goes back from {last_ts:g} ms "
                    "(the trace must be sorted by time)"
                )
        except ValueError as exc:
            err = TraceFormatError(f"{name}:{lineno}", str(exc))
            if strict:
                raise err from None
            if issues is not None:
                issues.add(err)
            continue
        last_ts = rec.timestamp_ms
        yield rec


def write_mooncake(records: Iterable[TraceRecord], path: str | os.PathLike[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(to_json(rec), separators=(",", ":")) + "\n")
            n += 1
    return n


def to_json(rec: TraceRecord) -> dict[str, object]:
    ts: float | int = int(rec.timestamp_ms) if rec.timestamp_ms.is_integer() else rec.timestamp_ms
    return {
        "timestamp": ts,
        "input_length": rec.input_length,
        "output_length": rec.output_length,
        "hash_ids": list(rec.hash_ids),
    }


class BlockTokens:
    """Token ids for hash-id blocks: the same ids for the same hash id, cached (bounded)."""

    def __init__(self, seed: int, block_tokens: int = BLOCK_TOKENS, cache: int = 4096) -> None:
        self.seed = seed
        self.block_tokens = block_tokens
        self._cache: dict[int, list[int]] = {}
        self._cap = cache

    def block(self, hash_id: int) -> list[int]:
        found = self._cache.get(hash_id)
        if found is None:
            found = content_tokens(
                random.Random(self.seed * 1_000_003 + hash_id), self.block_tokens
            )
            if len(self._cache) >= self._cap:
                self._cache.pop(next(iter(self._cache)))
            self._cache[hash_id] = found
        return found

    def prompt(self, rec: TraceRecord, salt: object) -> tuple[int, ...]:
        out: list[int] = []
        for h in rec.hash_ids:
            out.extend(self.block(h))
        del out[rec.input_length :]
        if len(out) < rec.input_length:
            out.extend(
                content_tokens(rng_for(self.seed, "unique", salt), rec.input_length - len(out))
            )
        return tuple(out)


def output_tokens(seed: int, salt: object, n: int) -> tuple[int, ...]:
    return tuple(content_tokens(rng_for(seed, "out", salt), n))


RegionOf = Callable[[TraceRecord], str]


def session_block(rec: TraceRecord, user_block: int = 0) -> int | None:
    """The hash id that names a record's session: its ``user_block``-th (or last) one.

    Mooncake traces carry no user; a leading run of hash ids is a shared prefix, so the
    first hash id stands for the session unless every session starts with a common
    preamble, in which case ``user_block`` skips it.
    """
    if not rec.hash_ids:
        return None
    return rec.hash_ids[min(user_block, len(rec.hash_ids) - 1)]


def region_by_first_block(
    regions: Sequence[str], weights: Sequence[float] | None = None, user_block: int = 0
) -> RegionOf:
    """Assign a record to a region by its session's hash id: one session, one region."""
    if not regions:
        raise ValueError("need at least one region")
    w = list(weights) if weights is not None else [1.0] * len(regions)
    total = sum(w)
    cum: list[float] = []
    acc = 0.0
    for x in w:
        acc += x / total
        cum.append(acc)

    def pick(rec: TraceRecord) -> str:
        block = session_block(rec, user_block)
        key = rec.line if block is None else block
        u = random.Random(key * 7919 + 17).random()
        for region, edge in zip(regions, cum, strict=True):
            if u <= edge:
                return region
        return regions[-1]

    return pick


class TraceSource:
    """Open-loop replay of one region's records: each send schedules the next arrival."""

    def __init__(
        self,
        region: str,
        index: int,
        records: Iterator[TraceRecord],
        blocks: BlockTokens,
        *,
        speedup: float = 1.0,
        t0_ms: float = 0.0,
        max_output: int | None = None,
        max_input: int | None = None,
        name: str = "trace",
        user_block: int = 0,
    ) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self.cid = f"{region}/{name}"
        self.region = region
        self.name = name
        self._records = records
        self._blocks = blocks
        self._speedup = speedup
        self._t0_ms = t0_ms
        self._max_output = max_output
        self._max_input = max_input
        self._user_block = user_block
        self._rids = RidSpace(index)

    def start(self, now: float) -> list[SimRequest]:
        return self._next(now)

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return self._next(now)

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        return []

    def _next(self, now: float) -> list[SimRequest]:
        rec = next(self._records, None)
        if rec is None:
            return []
        if self._max_input is not None and rec.input_length > self._max_input:
            rec = TraceRecord(
                rec.timestamp_ms,
                self._max_input,
                rec.output_length,
                rec.hash_ids[: -(-self._max_input // self._blocks.block_tokens)],
                rec.line,
            )
        out_n = rec.output_length
        if self._max_output is not None:
            out_n = min(out_n, self._max_output)
        at = max(now, (rec.timestamp_ms - self._t0_ms) / 1000.0 / self._speedup)
        block = session_block(rec, self._user_block)
        user = f"line{rec.line}" if block is None else f"h{block}"
        return [
            SimRequest(
                rid=self._rids.next(),
                client=self.cid,
                region=self.region,
                user=user,
                session=user,
                prompt=self._blocks.prompt(rec, rec.line),
                output=output_tokens(self._blocks.seed, rec.line, out_n),
                sent_at=at,
                kind=self.name,
                turn=0,
            )
        ]


def trace_workload(
    source: str | os.PathLike[str] | Iterable[str],
    regions: Sequence[str],
    *,
    seed: int,
    horizon_s: float,
    region_of: RegionOf | None = None,
    speedup: float = 1.0,
    block_tokens: int = BLOCK_TOKENS,
    max_output: int | None = None,
    max_input: int | None = None,
    first_index: int = 0,
    name: str = "trace",
    user_block: int = 0,
) -> Workload:
    """Replay a Mooncake-style trace, split into one open-loop source per region.

    The trace is read once, validated strictly, and held as records (not tokens); prompts
    are materialised as each request is sent. ``user_block`` picks the hash id that names a
    session (region and affinity key): skip a preamble every session shares.
    """
    records = list(read_mooncake(source, block_tokens=block_tokens))
    pick = region_of or region_by_first_block(regions, user_block=user_block)
    per_region: dict[str, list[TraceRecord]] = {r: [] for r in regions}
    for rec in records:
        region = pick(rec)
        if region not in per_region:
            raise ValueError(f"region_of returned {region!r}, not one of {list(regions)}")
        per_region[region].append(rec)
    t0 = records[0].timestamp_ms if records else 0.0
    blocks = BlockTokens(seed, block_tokens)
    sources = [
        TraceSource(
            region,
            first_index + i,
            iter(per_region[region]),
            blocks,
            speedup=speedup,
            t0_ms=t0,
            max_output=max_output,
            max_input=max_input,
            name=name,
            user_block=user_block,
        )
        for i, region in enumerate(regions)
    ]
    return Workload(
        name=name,
        clients=list(sources),
        horizon_s=horizon_s,
        description=f"Mooncake-style trace replay ({len(records)} records, x{speedup:g} speed)",
        params={"records": len(records), "speedup": speedup, "seed": seed},
    )


@dataclass(frozen=True, slots=True)
class SessionTraceSpec:
    """A synthetic long-context, high-reuse trace (shaped after GORGO's ART-Chat setting).

    Each user's session grows: a request re-sends the user's context (all earlier blocks)
    plus new blocks, so the leading hash ids repeat; with probability ``reset_p`` the
    session restarts from the user's system prefix.
    """

    users: int = 64
    requests_per_user: int = 20
    system_blocks: int = 2
    shared_system_blocks: int = 1
    """Blocks at the head of every user's context that all users share (a common preamble)."""
    new_tokens_mean: int = 900
    max_input: int = 24_000
    output_mean: int = 96
    max_output: int = 128
    rate_per_s: float = 4.0
    reset_p: float = 0.1
    block_tokens: int = BLOCK_TOKENS


def synthesize_sessions(spec: SessionTraceSpec, seed: int) -> list[TraceRecord]:
    rng = rng_for(seed, "sessions")
    next_block = 1_000_000
    shared = list(range(spec.shared_system_blocks))
    contexts: dict[int, list[int]] = {}
    lengths: dict[int, int] = {}
    systems: dict[int, list[int]] = {}
    remaining = {u: spec.requests_per_user for u in range(spec.users)}
    out: list[TraceRecord] = []
    t_ms = 0.0
    line = 0
    while remaining:
        t_ms += rng.expovariate(spec.rate_per_s) * 1000.0
        user = rng.choice(sorted(remaining))
        remaining[user] -= 1
        if remaining[user] == 0:
            del remaining[user]
        if user not in systems:
            own = list(range(next_block, next_block + spec.system_blocks))
            next_block += spec.system_blocks
            systems[user] = shared + own
        ctx = contexts.get(user)
        if ctx is None or rng.random() < spec.reset_p:
            ctx = list(systems[user])
            lengths[user] = len(ctx) * spec.block_tokens
        new = max(1, round(rng.expovariate(1.0 / spec.new_tokens_mean)))
        length = min(spec.max_input, lengths[user] + new)
        blocks = -(-length // spec.block_tokens)
        while len(ctx) < blocks:
            ctx.append(next_block)
            next_block += 1
        ctx = ctx[:blocks]
        contexts[user] = ctx
        lengths[user] = length
        out_n = max(1, min(spec.max_output, round(rng.expovariate(1.0 / spec.output_mean))))
        line += 1
        out.append(TraceRecord(round(t_ms, 3), length, out_n, tuple(ctx), line))
    return out


def records_to_lines(records: Iterable[TraceRecord]) -> list[str]:
    buf = io.StringIO()
    for rec in records:
        buf.write(json.dumps(to_json(rec), separators=(",", ":")) + "\n")
    return buf.getvalue().splitlines()


def load_or_synthesize(path: str | None, spec: SessionTraceSpec, seed: int) -> list[str]:
    """The lines of ``path`` if given (a real trace), else of a synthetic one."""
    if path:
        return Path(path).read_text(encoding="utf-8").splitlines()
    return records_to_lines(synthesize_sessions(spec, seed))


__all__ = [
    "BLOCK_TOKENS",
    "FIRST_CONTENT_ID",
    "VOCAB",
    "BlockTokens",
    "SessionTraceSpec",
    "TraceFormatError",
    "TraceIssues",
    "TraceRecord",
    "TraceSource",
    "load_or_synthesize",
    "parse_line",
    "read_mooncake",
    "region_by_first_block",
    "synthesize_sessions",
    "trace_workload",
    "write_mooncake",
]
