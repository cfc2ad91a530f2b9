"""Predicted KV headroom: whether a replica can take one more request without preempting.

An engine admits a queued request as soon as its prompt's blocks fit, then every running
sequence grows by a block every ``block_size`` decode steps; when the cache is full the
engine preempts the newest sequence, which recomputes from scratch (vLLM's default). An
engine whose sequences will outgrow its KV cache therefore wastes work exactly when it is
busiest. A router that knows each request's predicted output can see it coming::

    demand(r)   = min(r.work, inflight(r) * mean_output_tokens)  (predicted outputs in
                  + inflight(r) * mean_prompt_tokens          flight, at most the mean
                  + inflight(r) * (block - 1) / 2             each, + prompts, + their
                                                              last blocks' empty slots)
    reported(r) = r.kv_usage * kv_tokens                      (the engine's blocks in use,
                  + (r.waiting + r.fresh) * (mean_prompt_tokens + (block - 1) / 2)
                                                              + what its queue will claim)
    need        = prompt + min(predicted output, mean output) + (block - 1) / 2
    fits(r)     = max(demand(r), reported(r)) + need <= fill * kv_tokens
                  (or r has nothing in flight)

``r.work`` is the predicted output tokens of this router's requests in flight to ``r`` (the
dispatch ledger): ``demand`` is the ledger's prediction of the KV they will take together.
The engine allocates KV in whole blocks of ``block`` tokens (paged attention), so a sequence
of ``n`` tokens holds ``ceil(n / block)`` blocks: its last block is partly empty. Which slot a
sequence's length ends on is as good as uniform (its output length is a prediction, and it
grows a token a step), so each sequence holds ``(block - 1) / 2`` tokens of KV beyond its
length on average (7.5 with vLLM's 16-token blocks). The simulated engine, like vLLM's v1
scheduler, keeps no free-block watermark, so none is modelled.

``reported`` is what the engine itself says it has committed (its last load record, plus
this router's dispatches since): the blocks its running sequences hold now, and the prompts
of the requests queued there, which it admits first-come first-served, so before anything
sent now. Each figure misses what the other sees: the ledger's prediction misses the
sequences that outgrew their predicted output and the requests other routers sent; the
report misses the growth still to come, so the larger of the two counts. A replica that
has just preempted reports the preempted sequences' blocks as free but their requests as
queued, so the queue's prompts keep it from looking empty.

When no replica fits, the request is held at the router (the Intelligent Router's "hold"
action) and decided again when a request completes or after ``hold_retry``; a request held
``max_hold`` seconds since its arrival goes to the best replica regardless, so holding never
starves anyone.
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.policies.base import ReplicaView, Request, View


def slack(block: float) -> float:
    """Expected KV tokens a sequence holds beyond its length: its last block's empty slots,
    any of 0..``block - 1`` alike."""
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


def reported(r: ReplicaView, view: View, kv_tokens: float, block: float = 1.0) -> float:
    """KV (tokens) the engine has committed by its own report: the blocks in use in its last
    load record, plus a prompt of the mean size (and its last block's empty slots) for each
    request queued there or sent by this router since the record (the engine admits them
    before anything sent now)."""
    return r.kv_usage * kv_tokens + (r.waiting + r.fresh) * (view.mean_prompt_tokens
                                                             + slack(block))


def occupancy(r: ReplicaView, view: View, kv_tokens: float, block: float = 1.0) -> float:
    """The KV ``r``'s requests in flight take, the larger of the ledger's prediction and the
    engine's report (each misses something the other sees; see the module docstring)."""
    d = kv_demand(r, view, block)
    e = reported(r, view, kv_tokens, block)
    return d if d >= e else e


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
            if occupancy(r, view, kv_tokens, block) + need <= room
            or (r.inflight == 0 and r.running == 0)]


def headroom(request: Request, r: ReplicaView, view: View, kv_tokens: float,
             block: float = 1.0) -> float:
    """Tokens of KV capacity left on ``r`` after ``request`` (negative: predicted overflow)."""
    return (kv_tokens - occupancy(r, view, kv_tokens, block)
            - request_footprint(request, view, block))
