"""The KV usage a replica will have once its queue is admitted, for the cost model's barrier.

An engine reports the share of its KV blocks in use (``kv_usage``); a request waiting in
its queue holds none yet. It takes its prompt's blocks when admitted, first come first
served, so before anything this router sends now. Near a full cache the report therefore
lags what a new request meets by everything queued since: the requests waiting at the last
report, this router's dispatches since (``fresh``), and other routers' requests in flight
the report does not explain yet. The expected-TTFT model's KV barrier (``k / (1 - k)`` and
the decode-bound queue from ``kv_knee``) reads ``k`` where that lag, 0.1-0.3 s of a busy
engine's arrivals, is worth seconds. With the engine's KV capacity in tokens known
(``ReplicaView.kv_capacity``, :mod:`mesh.kv_capacity`) the queue is counted in it::

    queued = fresh_tokens + (waiting - fresh) * mean_prompt_kv + waiting * (block - 1) / 2
    k      = kv_usage + queued / kv_capacity

``waiting`` is the cost model's own queue estimate (the record's queue, age-discounted, plus
this router's ``fresh`` dispatches since it, plus the requests in flight it does not
explain). This router knows the prompt of each of its own dispatches (``fresh_tokens``);
any other queued prompt is priced at the mean whole prompt (``View.mean_prompt_kv``: cached
tokens included, since a cached prefix nothing running holds sits in the free pool and is
claimed again at admission), each with its last block's expected empty slots
(:func:`mesh.policies.headroom.slack`). A replica whose capacity nobody knows keeps
``k = kv_usage``.
"""

from __future__ import annotations


def queued_usage(kv_usage: float, waiting: float, fresh: float, fresh_tokens: float,
                 mean_prompt_kv: float, kv_capacity: float | None, slack: float) -> float:
    """``kv_usage`` plus the share of ``kv_capacity`` tokens the ``waiting`` requests' prompts
    will take: this router's ``fresh`` dispatches at their own size (``fresh_tokens``), the
    rest at ``mean_prompt_kv``, each with ``slack`` (``kv_usage`` unchanged when the capacity
    is unknown or nothing waits)."""
    if not kv_capacity or kv_capacity <= 0.0 or waiting <= 0.0:
        return kv_usage
    return kv_usage + ((waiting - fresh) * (mean_prompt_kv + slack) + fresh_tokens
                       + fresh * slack) / kv_capacity
