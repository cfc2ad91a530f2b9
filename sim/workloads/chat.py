"""Multi-turn chat: ChatBot-Arena-like and WildChat-like clients with per-user prefixes.

A client is a closed loop, like SkyWalker's benchmark clients: it sends one turn, waits for
the whole reply, optionally thinks, and sends the next turn, whose prompt is the previous
prompt plus the reply plus the new user message. So follow-up turns share a growing prefix.
Every conversation of a user opens with that user's system prompt (some users' system
prompts start with one of a few regional templates), so conversations of the same user share
a prefix too, and users of one region share a little. Shapes (turns, lengths) follow the
public summaries of the two datasets; see ``docs/evaluation.md`` for the numbers and their
sources.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from sim.workloads.base import (
    ASSISTANT,
    END,
    HEADER_TOKENS,
    SYSTEM,
    USER,
    LogNormal,
    RidSpace,
    SimRequest,
    Turns,
    Workload,
    content_tokens,
    exp_delay,
    frame,
    rng_for,
    template_header,
)

_TEMPLATE_TOKENS = LogNormal(median=200, sigma=0.4, lo=32, hi=2048)


@dataclass(frozen=True, slots=True)
class ChatProfile:
    name: str
    turns: Turns
    user_tokens: LogNormal
    output_tokens: LogNormal
    system_tokens: LogNormal
    think_time_s: float = 0.0
    """Mean of an exponential pause between a reply and the next turn (0: send at once)."""
    conversation_gap_s: float = 0.0
    """Mean pause between the end of one conversation and the next."""
    users_per_client: int = 1
    """How many distinct users (affinity keys) one client replays conversations of."""
    shared_prefix_p: float = 0.0
    """Probability that a user's system prompt starts with one of the region's templates."""
    templates_per_region: int = 8
    template_tokens: LogNormal = _TEMPLATE_TOKENS
    max_context: int = 8192
    """A conversation that would outgrow this ends; the user starts a new one."""
    start_spread_s: float = 5.0
    """Clients start uniformly within this window so they do not fire in lockstep."""
    header_tokens: int = HEADER_TOKENS
    """The chat template's preamble, identical for every user (0: none)."""


ARENA = ChatProfile(
    name="arena",
    turns=Turns(minimum=2, mean=3.0, maximum=16),
    user_tokens=LogNormal(median=35, sigma=1.2, lo=2, hi=4096),
    output_tokens=LogNormal(median=170, sigma=0.75, lo=4, hi=512),
    system_tokens=LogNormal(median=120, sigma=0.6, lo=16, hi=1024),
    shared_prefix_p=0.3,
)
"""ChatBot-Arena-like: multi-turn conversations only (as SkyWalker's benchmark keeps them),
short prompts (mean ~70 tokens), replies capped at max_tokens=512, one user per client."""

WILDCHAT = ChatProfile(
    name="wildchat",
    turns=Turns(minimum=2, mean=4.0, maximum=32),
    user_tokens=LogNormal(median=80, sigma=1.5, lo=2, hi=4096),
    output_tokens=LogNormal(median=380, sigma=0.55, lo=4, hi=512),
    system_tokens=LogNormal(median=60, sigma=0.6, lo=8, hi=1024),
    users_per_client=3,
    shared_prefix_p=0.15,
)
"""WildChat-like: at least two turns (the benchmark's filter), longer and heavier-tailed
prompts (mean ~250 tokens), long replies that often hit max_tokens=512, and each client
replaying the conversations of a few hashed IPs."""


class UserPrefixes:
    """System prompts per user and templates per region, each from its own seeded RNG."""

    def __init__(self, profile: ChatProfile, seed: int) -> None:
        self.profile = profile
        self.seed = seed
        self._templates: dict[tuple[str, int], list[int]] = {}
        self._systems: dict[str, tuple[int, ...]] = {}
        self._header = template_header(seed, profile.header_tokens)

    def template(self, region: str, k: int) -> list[int]:
        key = (region, k)
        tpl = self._templates.get(key)
        if tpl is None:
            rng = rng_for(self.seed, self.profile.name, "template", region, k)
            tpl = content_tokens(rng, self.profile.template_tokens.sample(rng))
            self._templates[key] = tpl
        return tpl

    def system_prompt(self, user: str, region: str) -> tuple[int, ...]:
        found = self._systems.get(user)
        if found is not None:
            return found
        rng = rng_for(self.seed, self.profile.name, "user", user)
        body: list[int] = []
        if rng.random() < self.profile.shared_prefix_p:
            body.extend(self.template(region, rng.randrange(self.profile.templates_per_region)))
        body.extend(content_tokens(rng, self.profile.system_tokens.sample(rng)))
        system = tuple(self._header + frame(SYSTEM, body))
        self._systems[user] = system
        return system


class Conversation:
    """One conversation's growing history and its own RNG."""

    __slots__ = ("history", "rng", "sid", "turn", "turns", "user")

    def __init__(
        self, sid: str, user: str, system: Sequence[int], turns: int, rng: random.Random
    ) -> None:
        self.sid = sid
        self.user = user
        self.history: list[int] = list(system)
        self.turns = turns
        self.turn = 0
        self.rng = rng

    def next_prompt(self, profile: ChatProfile) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Append the next user message; ``(prompt, reply)`` or None when the context is full."""
        rng = self.rng
        message = content_tokens(rng, profile.user_tokens.sample(rng))
        reply = tuple(content_tokens(rng, profile.output_tokens.sample(rng)))
        if len(self.history) + len(message) + 3 + len(reply) > profile.max_context:
            return None
        self.history.extend(frame(USER, message))
        self.history.append(ASSISTANT)
        return tuple(self.history), reply

    def record_reply(self, reply: Sequence[int]) -> None:
        self.history.extend(reply)
        self.history.append(END)
        self.turn += 1


class ChatClient:
    """A closed-loop chat client: one conversation at a time, one outstanding turn."""

    def __init__(
        self,
        cid: str,
        index: int,
        region: str,
        profile: ChatProfile,
        prefixes: UserPrefixes,
        users: Sequence[str],
        seed: int,
    ) -> None:
        if not users:
            raise ValueError("a chat client needs at least one user")
        self.cid = cid
        self.region = region
        self.profile = profile
        self._prefixes = prefixes
        self._users = list(users)
        self._seed = seed
        self._rids = RidSpace(index)
        self._n_conv = 0
        self._conv: Conversation | None = None

    def start(self, now: float) -> list[SimRequest]:
        spread = rng_for(self._seed, self.cid, "start").uniform(0, self.profile.start_spread_s)
        return [self._open(now + spread)]

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return []

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        conv = self._conv
        if conv is None or req.session != conv.sid:
            return []
        conv.record_reply(req.output)
        if conv.turn < conv.turns:
            nxt = self._turn(conv, now + exp_delay(conv.rng, self.profile.think_time_s))
            if nxt is not None:
                return [nxt]
        return [self._open(now + exp_delay(conv.rng, self.profile.conversation_gap_s))]

    def _open(self, at: float) -> SimRequest:
        for _ in range(8):
            k = self._n_conv
            self._n_conv += 1
            rng = rng_for(self._seed, self.profile.name, self.cid, "conv", k)
            user = self._users[rng.randrange(len(self._users))]
            system = self._prefixes.system_prompt(user, self.region)
            conv = Conversation(
                f"{self.cid}/c{k}", user, system, self.profile.turns.sample(rng), rng
            )
            self._conv = conv
            req = self._turn(conv, at)
            if req is not None:
                return req
        raise ValueError(
            f"profile {self.profile.name!r}: no first turn fits max_context="
            f"{self.profile.max_context}"
        )

    def _turn(self, conv: Conversation, at: float) -> SimRequest | None:
        nxt = conv.next_prompt(self.profile)
        if nxt is None:
            return None
        prompt, reply = nxt
        return SimRequest(
            rid=self._rids.next(),
            client=self.cid,
            region=self.region,
            user=conv.user,
            session=conv.sid,
            prompt=prompt,
            output=reply,
            sent_at=at,
            kind=self.profile.name,
            turn=conv.turn,
        )


def chat_workload(
    profile: ChatProfile,
    clients_per_region: Mapping[str, int],
    *,
    seed: int,
    horizon_s: float,
    first_index: int = 0,
    **overrides: object,
) -> Workload:
    """``clients_per_region`` closed-loop chat clients per region (e.g. SkyLB's 80/80/80)."""
    if overrides:
        profile = replace(profile, **overrides)  # type: ignore[arg-type]
    prefixes = UserPrefixes(profile, seed)
    clients: list[ChatClient] = []
    index = first_index
    for region in sorted(clients_per_region):
        for i in range(clients_per_region[region]):
            cid = f"{region}/{profile.name}{i}"
            users = [f"{cid}/u{u}" for u in range(profile.users_per_client)]
            clients.append(ChatClient(cid, index, region, profile, prefixes, users, seed))
            index += 1
    return Workload(
        name=profile.name,
        clients=list(clients),
        horizon_s=horizon_s,
        description=f"{profile.name}-like multi-turn chat, closed loop",
        params={"clients_per_region": dict(clients_per_region), "seed": seed},
    )
