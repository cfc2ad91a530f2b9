"""Predicted KV headroom: whether a replica can take one more request without preempting.

An engine admits a queued request as soon as its prompt's blocks fit, then every running
sequence grows by a block every ``block_size`` decode steps; when the cache is full the
engine preempts the newest sequence, which recomputes from scratch (vLLM's default). An
engine whose sequences will outgrow its KV cache therefore wastes work exactly when it is
busiest. A router that knows each request's predicted output can see it coming::

    demand(r) = min(r.work, inflight(r) * mean_output_tokens)  (predicted outputs in flight,
                + inflight(r) * mean_prompt_tokens          at most the mean each, + prompts)
                + inflight(r) * (block - 1) / 2             (their last blocks' empty slots)
    need      = prompt + min(predicted output, mean output) + (block - 1) / 2
    fits(r)   = demand(r) + need <= fill * kv_tokens          (or r has nothing in flight)

``r.work`` is the predicted output tokens of this router's requests in flight to ``r`` (the
dispatch ledger). The engine allocates KV in whole blocks of ``block`` tokens (paged
attention), so a sequence of ``n`` tokens holds ``ceil(n / block)`` blocks: its last block is
partly empty. Which slot a sequence's length ends on is as good as uniform (its output length
is a prediction, and it grows a token a step), so each sequence holds ``(block - 1) / 2``
tokens of KV beyond its length on average (7.5 with vLLM's 16-token blocks). The simulated
engine, like vLLM's v1 scheduler, keeps no free-block watermark, so none is modelled.

Requests other routers sent to ``r`` count at the mean output size only if the ledger holds
no prediction at all, so with several routers per replica the demand is understated (set
``fill`` lower). When no replica fits, the request is held at the router (the Intelligent
Router's "hold" action) and decided again when a request completes or after ``hold_retry``; a
request held ``max_hold`` seconds since its arrival goes to the best replica regardless, so
holding never starves anyone.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.policies.base import ReplicaView, Request, View


def slack(block: float) -> float:
    """Expected KV tokens a sequence holds beyond its length: its last block's empty slots
    (``block - 1`` at most, as likely as not any of 0..block-1)."""
    return (block - 1.0) * 0.5 if block > 1.0 else 0.0


def kv_demand(r: ReplicaView, view: View, block: float = 1.0) -> float:
    """Predicted KV (tokens) of the requests in flight to ``r`` while they share it: their
    predicted outputs from the ledger, at most the mean output per request (a long reply
    outgrows the mean only after its neighbours have finished; without the bound, a few
    long replies in flight would hold everything back), plus their prompts at the mean
    prompt size, plus each one's partly empty last block of ``block`` tokens. Without
    predictions in the ledger: the mean output per request."""
    cap = r.inflight * view.mean_output_tokens
    out = r.work if 0.0 < r.work < cap else cap
    return out + r.inflight * (view.mean_prompt_tokens + slack(block))


def request_footprint(request: Request, view: View, block: float = 1.0) -> float:
    """What this request adds to the replica's KV while the sequences in flight there now
    are still running: its prompt and its predicted output, the output counted up to the
    mean output length (a long reply grows one token a step; by the time it has outgrown
    the mean, most of what it shares the replica with has finished), and its last block's
    expected empty slots."""
    guess = request.predicted
    out = guess.tokens if guess is not None else view.mean_output_tokens
    mean = view.mean_output_tokens
    return request.num_tokens + (out if out < mean else mean) + slack(block)


def fitting(request: Request, reps: Sequence[ReplicaView], view: View, kv_tokens: float,
            fill: float, block: float = 1.0) -> list[int]:
    """Indices of the replicas whose predicted KV demand leaves room for ``request``; an
    idle replica always has room (a request larger than the fill would otherwise wait for
    nothing)."""
    room = fill * kv_tokens
    need = request_footprint(request, view, block)
    return [i for i, r in enumerate(reps)
            if kv_demand(r, view, block) + need <= room
            or (r.inflight == 0 and r.running == 0)]


def headroom(request: Request, r: ReplicaView, view: View, kv_tokens: float,
             block: float = 1.0) -> float:
    """Tokens of KV capacity left on ``r`` after ``request`` (negative: predicted overflow)."""
    return kv_tokens - kv_demand(r, view, block) - request_footprint(request, view, block)
