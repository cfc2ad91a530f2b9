"""What a workload hands the simulator: requests with token ids, and clients that react.

Token ids are generated directly as integer lists (no text, no tokenizer): ids below 1000
are the chat-template markers below, the same range ``kvevents.tokenizers.base.BuiltinTokenizer``
reserves for special tokens, and content ids are drawn from ``[1000, VOCAB)``. Generating ids
directly is what lets a run hold millions of tokens in seconds; the block keys a router
computes from them are the same as for any other token stream.

Every random draw comes from an RNG seeded by ``(workload seed, client, conversation or
tree node)``, never from a shared stream, so a request's content does not depend on when
earlier requests completed: every policy sees the same prompts, only their timing differs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

VOCAB = 128_000
FIRST_CONTENT_ID = 1000

# Chat-template markers (ids below FIRST_CONTENT_ID).
SYSTEM, USER, ASSISTANT, END = 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request as a client sends it.

    ``output`` are the tokens the engine will produce (their count is the output length;
    the ids matter because a follow-up turn carries them in its prompt). ``user`` is the
    affinity key (user id, hashed IP) that hash-based policies key on.
    """

    rid: int
    client: str
    region: str
    user: str
    session: str
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    sent_at: float
    kind: str
    turn: int = 0
    max_tokens: int = 0
    """The client's cap on the reply (0: none sent); the reply's length is ``output``'s."""
    app: str | None = None
    """Application tag the client sends (``x-kvmesh-app``), None: none."""
    tier: str = ""
    """Service tier (``mesh.tiers``); empty: the fleet's default."""
    deadline_s: float = math.inf
    """SLO budget from sending, seconds; inf: the tier's configured SLO."""

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def output_len(self) -> int:
        return len(self.output)


class Client(Protocol):
    """A source of requests living in one region.

    ``start`` returns the first requests; ``on_sent`` runs when a request leaves the client
    (open-loop sources chain their next arrival there); ``on_complete`` runs when the last
    token of a request reaches the client (closed-loop sources send their next turn from
    there). Every returned request has ``sent_at >= now``.
    """

    cid: str
    region: str

    def start(self, now: float) -> list[SimRequest]: ...

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]: ...

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]: ...


class OpenLoop:
    """A :class:`Client` whose arrivals come on their own clock (Poisson, open loop): each
    request chains the next arrival when it leaves, and a completion starts nothing.
    Subclasses say what the next request is (``_next``)."""

    def start(self, now: float) -> list[SimRequest]:
        return [self._next(now)]

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return [self._next(now)]

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        return []

    def _next(self, now: float) -> SimRequest:
        raise NotImplementedError


@dataclass(slots=True)
class Workload:
    """Clients plus the time after which no new request is sent."""

    name: str
    clients: list[Client]
    horizon_s: float
    description: str = ""
    params: dict[str, object] = field(default_factory=dict)

    def regions(self) -> list[str]:
        return sorted({c.region for c in self.clients})


def rng_for(*parts: object) -> random.Random:
    """An RNG seeded by a path of names: stable across processes (str seeds hash with SHA-512)."""
    return random.Random("/".join(str(p) for p in parts))


HEADER_TOKENS = 26
"""Length of the chat template's fixed preamble (Llama 3.1 renders a dated system header of
about this many tokens before every conversation, whoever the user)."""


def template_header(seed: int, n: int = HEADER_TOKENS) -> list[int]:
    """The preamble every request of a run starts with: the same ids for every user."""
    return content_tokens(rng_for(seed, "chat-template-header"), n)


def content_tokens(rng: random.Random, n: int) -> list[int]:
    span = VOCAB - FIRST_CONTENT_ID
    rand = rng.random
    return [FIRST_CONTENT_ID + int(rand() * span) for _ in range(n)]


@dataclass(frozen=True, slots=True)
class LogNormal:
    """A token-count distribution: lognormal with this median and sigma, clipped to [lo, hi]."""

    median: float
    sigma: float
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: random.Random) -> int:
        x = rng.lognormvariate(math.log(self.median), self.sigma)
        return max(self.lo, min(self.hi, round(x)))

    @property
    def unclipped_mean(self) -> float:
        return self.median * math.exp(self.sigma**2 / 2)


@dataclass(frozen=True, slots=True)
class Turns:
    """Turns per conversation: ``minimum`` plus a geometric tail with the given mean, capped."""

    minimum: int
    mean: float
    maximum: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.mean <= self.maximum:
            raise ValueError(f"need 1 <= minimum <= mean <= maximum, got {self}")

    def sample(self, rng: random.Random) -> int:
        extra_mean = self.mean - self.minimum
        if extra_mean <= 0:
            return self.minimum
        p = 1.0 / (1.0 + extra_mean)  # geometric on {0, 1, ...} with this mean
        u = 1.0 - rng.random()
        extra = int(math.log(u) / math.log(1.0 - p))
        return min(self.maximum, self.minimum + extra)


def exp_delay(rng: random.Random, mean_s: float) -> float:
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0


def frame(role: int, body: Sequence[int]) -> list[int]:
    """One chat message as the template renders it: role marker, body, end marker."""
    out = [role]
    out.extend(body)
    out.append(END)
    return out


class RidSpace:
    """Request ids unique across clients: ``client index << 32 | per-client counter``."""

    __slots__ = ("_base", "_n")

    def __init__(self, client_index: int) -> None:
        self._base = client_index << 32
        self._n = 0

    def next(self) -> int:
        self._n += 1
        return self._base | self._n
