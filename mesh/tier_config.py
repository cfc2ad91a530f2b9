"""The ``tiers`` section of a router's configuration (see docs/router.md, "Service tiers").

::

    tiers:
      default: standard            # the tier of a request that names none (nor its key)
      interactive: {ttft: 1.0}
      standard: {ttft: 10.0, sheddable: false}
      batch: {deadline: 86400, promote_before: 8640, kv_below: 0.5, running_below: 64,
              recheck: 0.25, sheddable: true}
      shed_window: 2.0             # a missed higher-tier SLO sheds sheddable tiers this long
      queue_risk: 0.5              # ... as does one queued this share of its target
      keys: {nightly-jobs: batch}  # API key name -> default tier (or the key's ``tier``)

``tiers: false`` (or ``enabled: false``) serves every request alike, first come first served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from mesh.tiers import BATCH, INTERACTIVE, STANDARD, TIERS, TierConfig


class TierConfigError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


_PER_TIER = {
    INTERACTIVE: {"ttft", "sheddable"},
    STANDARD: {"ttft", "sheddable"},
    BATCH: {"deadline", "sheddable", "promote_before", "kv_below", "running_below", "recheck"},
}
_TOP = {"enabled", "default", "shed_window", "queue_risk", "keys", *TIERS}


def _num(value: object, key: str, minimum: float = 0.0, *, above: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise TierConfigError(key, f"expected a number, got {value!r}")
    if value < minimum or (above and value == minimum):
        cmp = ">" if above else ">="
        raise TierConfigError(key, f"expected a number {cmp} {minimum:g}, got {value!r}")
    return float(value)


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise TierConfigError(key, f"expected true or false, got {value!r}")
    return value


def tier_name(value: object, key: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in TIERS:
        raise TierConfigError(key, f"expected one of {', '.join(TIERS)}, got {value!r}")
    return value.strip().lower()


def parse(value: object, key_tiers: Mapping[str, str] | None = None,
          key: str = "tiers") -> TierConfig:
    """``None``/``true``: the defaults; ``false``: tiers off; else a mapping as above.
    ``key_tiers``: API key name -> tier, from the keys' own ``tier`` fields."""
    d = TierConfig()
    if value is None or value is True:
        value = {}
    if value is False:
        value = {"enabled": False}
    if not isinstance(value, Mapping):
        raise TierConfigError(key, f"expected a mapping, got {value!r}")
    unknown = sorted(set(value) - _TOP)
    if unknown:
        raise TierConfigError(f"{key}.{unknown[0]}",
                              f"unknown key (known: {', '.join(sorted(_TOP))})")
    per: dict[str, Mapping[str, object]] = {}
    for t in TIERS:
        sub = value.get(t, {})
        if not isinstance(sub, Mapping):
            raise TierConfigError(f"{key}.{t}", f"expected a mapping, got {sub!r}")
        bad = sorted(set(sub) - _PER_TIER[t])
        if bad:
            raise TierConfigError(f"{key}.{t}.{bad[0]}",
                                  f"unknown key (known: {', '.join(sorted(_PER_TIER[t]))})")
        per[t] = sub
    sheddable = set(d.sheddable)
    for t in TIERS:
        if "sheddable" in per[t]:
            if _bool(per[t]["sheddable"], f"{key}.{t}.sheddable"):
                sheddable.add(t)
            else:
                sheddable.discard(t)
    if INTERACTIVE in sheddable:
        raise TierConfigError(f"{key}.interactive.sheddable",
                              "the most important tier is never shed")
    b = per[BATCH]
    keys: dict[str, str] = dict(key_tiers or {})
    raw_keys = value.get("keys", {})
    if not isinstance(raw_keys, Mapping):
        raise TierConfigError(f"{key}.keys", f"expected a mapping of key name -> tier, "
                                             f"got {raw_keys!r}")
    for name, t in raw_keys.items():
        keys[str(name)] = tier_name(t, f"{key}.keys.{name}")
    running = b.get("running_below", d.batch_running_below)
    return TierConfig(
        enabled=_bool(value.get("enabled", True), f"{key}.enabled"),
        default=tier_name(value.get("default", d.default), f"{key}.default"),
        interactive_ttft=_num(per[INTERACTIVE].get("ttft", d.interactive_ttft),
                              f"{key}.interactive.ttft", above=True),
        standard_ttft=_num(per[STANDARD].get("ttft", d.standard_ttft),
                           f"{key}.standard.ttft", above=True),
        batch_deadline=_num(b.get("deadline", d.batch_deadline), f"{key}.batch.deadline",
                            above=True),
        sheddable=frozenset(sheddable),
        promote_before=(None if b.get("promote_before") is None else
                        _num(b.get("promote_before"), f"{key}.batch.promote_before")),
        batch_kv_below=_num(b.get("kv_below", d.batch_kv_below), f"{key}.batch.kv_below",
                            above=True),
        batch_running_below=(math.inf if running is None else
                             _num(running, f"{key}.batch.running_below", above=True)),
        batch_recheck=_num(b.get("recheck", d.batch_recheck), f"{key}.batch.recheck",
                           0.001),
        shed_window=_num(value.get("shed_window", d.shed_window), f"{key}.shed_window",
                         0.001),
        queue_risk=_num(value.get("queue_risk", d.queue_risk), f"{key}.queue_risk",
                        above=True),
        keys=keys,
    )
