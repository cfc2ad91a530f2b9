"""Tree-of-Thoughts-like branching requests (SkyWalker's ToT-on-GSM8K workload, shaped).

A tree has ``depth`` levels of fixed instructions (propose a plan, execute it, reflect,
answer). The root asks the first instruction about a question; every finished node spawns
``branches`` children, each of whose prompt is the parent's prompt + the parent's reply +
the next instruction. Siblings share their whole prompt, a subtree shares its root's
history: depth 4 with 2 branches is 1 + 2 + 4 + 8 = 15 requests per tree (4 branches: 85),
as the paper counts them. A client runs one tree at a time, back to back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sim.workloads.base import (
    ASSISTANT,
    END,
    USER,
    LogNormal,
    RidSpace,
    SimRequest,
    Workload,
    content_tokens,
    frame,
    rng_for,
    template_header,
)

_QUESTION_TOKENS = LogNormal(median=60, sigma=0.35, lo=15, hi=300)
_OUTPUT_TOKENS = LogNormal(median=110, sigma=0.5, lo=8, hi=256)


@dataclass(frozen=True, slots=True)
class TreeProfile:
    name: str = "tot"
    depth: int = 4
    branches: int = 2
    question_tokens: LogNormal = _QUESTION_TOKENS
    instruction_tokens: tuple[int, ...] = (48, 36, 30, 28)
    """Lengths of the fixed per-level instructions (shared by every tree of every user)."""
    output_tokens: LogNormal = _OUTPUT_TOKENS
    """Replies; the benchmark caps them at max_tokens=256."""
    start_spread_s: float = 5.0

    def __post_init__(self) -> None:
        if self.depth < 1 or self.branches < 1:
            raise ValueError("a tree needs depth >= 1 and branches >= 1")
        if len(self.instruction_tokens) < self.depth:
            raise ValueError("one instruction length per level is needed")

    @property
    def requests_per_tree(self) -> int:
        return sum(self.branches**level for level in range(self.depth))


TOT = TreeProfile()
MIXED_TREE_US = TreeProfile(name="tot4", branches=4)


class _Tree:
    __slots__ = ("done", "k", "nodes")

    def __init__(self, k: int) -> None:
        self.k = k
        self.done = 0
        self.nodes: dict[int, str] = {}
        """rid -> node path ("0", "0.1", ...), for the requests still outstanding."""


class TreeClient:
    """Runs trees one after another; every node's content comes from the node's own RNG."""

    def __init__(self, cid: str, index: int, region: str, profile: TreeProfile, seed: int) -> None:
        self.cid = cid
        self.region = region
        self.profile = profile
        self._seed = seed
        self._rids = RidSpace(index)
        self._user = f"{cid}/u0"
        self._n_trees = 0
        self._tree: _Tree | None = None
        self._header = template_header(seed)
        self._instructions = [
            content_tokens(rng_for(seed, "tot-instruction", level), n)
            for level, n in enumerate(profile.instruction_tokens)
        ]

    def start(self, now: float) -> list[SimRequest]:
        spread = rng_for(self._seed, self.cid, "start").uniform(0, self.profile.start_spread_s)
        return [self._open(now + spread)]

    def on_sent(self, req: SimRequest, now: float) -> list[SimRequest]:
        return []

    def on_complete(self, req: SimRequest, now: float) -> list[SimRequest]:
        tree = self._tree
        if tree is None:
            return []
        path = tree.nodes.pop(req.rid, None)
        if path is None:
            return []
        tree.done += 1
        out: list[SimRequest] = []
        level = req.turn
        if level + 1 < self.profile.depth:
            prompt = list(req.prompt)
            prompt.extend(req.output)
            prompt.append(END)
            prompt.extend(frame(USER, self._instructions[level + 1]))
            prompt.append(ASSISTANT)
            shared = tuple(prompt)
            for b in range(self.profile.branches):
                out.append(self._node(tree, f"{path}.{b}", level + 1, shared, now, req.session))
        elif tree.done == self.profile.requests_per_tree:
            out.append(self._open(now))
        return out

    def _open(self, at: float) -> SimRequest:
        k = self._n_trees
        self._n_trees += 1
        tree = _Tree(k)
        self._tree = tree
        rng = rng_for(self._seed, self.profile.name, self.cid, "tree", k)
        question = content_tokens(rng, self.profile.question_tokens.sample(rng))
        prompt = self._header + frame(USER, self._instructions[0] + question)
        prompt.append(ASSISTANT)
        return self._node(tree, "0", 0, tuple(prompt), at, f"{self.cid}/t{k}")

    def _node(
        self, tree: _Tree, path: str, level: int, prompt: tuple[int, ...], at: float, sid: str
    ) -> SimRequest:
        rng = rng_for(self._seed, self.profile.name, self.cid, "tree", tree.k, path)
        reply = tuple(content_tokens(rng, self.profile.output_tokens.sample(rng)))
        req = SimRequest(
            rid=self._rids.next(),
            client=self.cid,
            region=self.region,
            user=self._user,
            session=sid,
            prompt=prompt,
            output=reply,
            sent_at=at,
            kind=self.profile.name,
            turn=level,
        )
        tree.nodes[req.rid] = path
        return req


def tree_workload(
    clients_per_region: Mapping[str, int],
    *,
    seed: int,
    horizon_s: float,
    profile: TreeProfile = TOT,
    profiles: Mapping[str, TreeProfile] | None = None,
    first_index: int = 0,
) -> Workload:
    """Tree clients per region; ``profiles`` overrides the tree shape per region (Mixed Tree)."""
    clients: list[TreeClient] = []
    index = first_index
    for region in sorted(clients_per_region):
        prof = (profiles or {}).get(region, profile)
        for i in range(clients_per_region[region]):
            clients.append(TreeClient(f"{region}/{prof.name}{i}", index, region, prof, seed))
            index += 1
    return Workload(
        name=profile.name,
        clients=list(clients),
        horizon_s=horizon_s,
        description=f"Tree-of-Thoughts-like, depth {profile.depth}, {profile.branches} branches",
        params={"clients_per_region": dict(clients_per_region), "seed": seed},
    )
