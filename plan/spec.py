"""What a plan is asked to satisfy: GPU types, regions, prices, the RTT bound.

Every check names what is wrong (``PlanInputError``), so a planning run stops at the input
that caused it instead of returning a silently infeasible or wrong plan.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

PRICE_KINDS = ("reserved", "on_demand", "spot")


class PlanInputError(ValueError):
    """An input a plan cannot be made from; the message names the cause."""


@dataclass(frozen=True, slots=True)
class Prices:
    """Dollars per instance-hour. ``reserved`` is the amortised hourly price of a long-term
    reservation (billed every hour of the day); ``spot`` None: no spot capacity there."""

    reserved: float
    on_demand: float
    spot: float | None = None


@dataclass(frozen=True, slots=True)
class GpuType:
    name: str
    throughput: Mapping[str, float]
    """Tokens/s (prompt + output) one instance of this type sustains for each model while
    meeting the SLO. A model missing here is one this GPU type cannot serve."""


@dataclass(frozen=True, slots=True)
class RegionSpec:
    name: str
    prices: Mapping[str, Prices]
    """GPU type -> prices: the GPU types this region offers."""
    max_instances: Mapping[str, int] = field(default_factory=dict)
    """GPU type -> most instances of it the region can hold (absent: unbounded)."""


@dataclass(frozen=True, slots=True)
class PlanSpec:
    gpus: Mapping[str, GpuType]
    regions: Mapping[str, RegionSpec]
    rtt_ms: Mapping[tuple[str, str], float]
    """Symmetric round trip between regions; a missing pair is treated as unreachable."""
    max_rtt_ms: float = 200.0
    """A request may be served in another region only if the round trip there is at most this."""
    startup_s: float = 155.0
    """Seconds a new instance is billed before it serves (model load)."""
    max_utilization: float = 1.0
    """Planned load as a share of an instance's throughput at the SLO (headroom)."""
    spot_max_share: float = 0.0
    """Most of a region's capacity for a model that may be spot (0: no spot)."""
    slo_ttft_s: float = 1.0
    """The TTFT the throughput figures were measured against (reported, not optimised)."""

    def rtt(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        got = self.rtt_ms.get((a, b), self.rtt_ms.get((b, a)))
        return math.inf if got is None else got

    def reachable(self, a: str, b: str, cross_region: bool = True) -> bool:
        """May demand arising in ``a`` be served in ``b``?"""
        if a == b:
            return True
        return cross_region and self.rtt(a, b) <= self.max_rtt_ms

    def models(self) -> set[str]:
        return {m for g in self.gpus.values() for m in g.throughput}

    def validate(self) -> None:
        if not self.regions:
            raise PlanInputError("no regions given")
        if not self.gpus:
            raise PlanInputError("no GPU types given")
        for g in self.gpus.values():
            for model, tps in g.throughput.items():
                if not (math.isfinite(tps) and tps > 0):
                    raise PlanInputError(
                        f"throughput of GPU type {g.name!r} for model {model!r} must be a "
                        f"positive number, got {tps}"
                    )
        for r in self.regions.values():
            if not r.prices:
                raise PlanInputError(f"region {r.name!r} has no GPU type")
            for gpu, p in r.prices.items():
                if gpu not in self.gpus:
                    raise PlanInputError(f"region {r.name!r} offers unknown GPU type {gpu!r}")
                for kind in PRICE_KINDS:
                    v = getattr(p, kind)
                    if v is None:
                        continue
                    if not math.isfinite(v) or v < 0:
                        raise PlanInputError(
                            f"negative or invalid price: {kind} price of {gpu!r} in region "
                            f"{r.name!r} is {v}"
                        )
            for gpu, n in r.max_instances.items():
                if gpu not in r.prices:
                    raise PlanInputError(
                        f"region {r.name!r} caps GPU type {gpu!r} that it does not offer"
                    )
                if n < 0:
                    raise PlanInputError(
                        f"region {r.name!r}: max_instances of {gpu!r} is negative ({n})"
                    )
        for (a, b), v in self.rtt_ms.items():
            for x in (a, b):
                if x not in self.regions:
                    raise PlanInputError(f"RTT given for unknown region {x!r}")
            if not math.isfinite(v) or v < 0:
                raise PlanInputError(f"RTT between {a!r} and {b!r} must be >= 0, got {v}")
        if not 0 < self.max_utilization <= 1:
            raise PlanInputError(f"max_utilization must be in (0, 1], got {self.max_utilization}")
        if not 0 <= self.spot_max_share <= 1:
            raise PlanInputError(f"spot_max_share must be in [0, 1], got {self.spot_max_share}")
        if self.startup_s < 0 or self.max_rtt_ms < 0:
            raise PlanInputError("startup_s and max_rtt_ms must be >= 0")


def spec_from_dict(doc: Mapping[str, object]) -> PlanSpec:
    """Build a spec from its YAML/JSON form (see docs/planning.md), checking types."""

    def mapping(x: object, where: str) -> Mapping[str, object]:
        if not isinstance(x, Mapping):
            raise PlanInputError(f"{where} must be a mapping, got {type(x).__name__}")
        return x

    def number(x: object, where: str) -> float:
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise PlanInputError(f"{where} must be a number, got {x!r}")
        return float(x)

    gpus: dict[str, GpuType] = {}
    for name, g in mapping(doc.get("gpus"), "gpus").items():
        tp = mapping(mapping(g, f"gpus.{name}").get("throughput"), f"gpus.{name}.throughput")
        gpus[name] = GpuType(
            name, {m: number(v, f"gpus.{name}.throughput.{m}") for m, v in tp.items()}
        )
    regions: dict[str, RegionSpec] = {}
    for name, r in mapping(doc.get("regions"), "regions").items():
        rd = mapping(r, f"regions.{name}")
        prices: dict[str, Prices] = {}
        for gpu, p in mapping(rd.get("prices", {}), f"regions.{name}.prices").items():
            pd = mapping(p, f"regions.{name}.prices.{gpu}")
            where = f"regions.{name}.prices.{gpu}"
            if "reserved" not in pd or "on_demand" not in pd:
                raise PlanInputError(f"{where} needs 'reserved' and 'on_demand'")
            spot = pd.get("spot")
            prices[gpu] = Prices(
                number(pd["reserved"], where + ".reserved"),
                number(pd["on_demand"], where + ".on_demand"),
                None if spot is None else number(spot, where + ".spot"),
            )
        caps = mapping(rd.get("max_instances", {}), f"regions.{name}.max_instances")
        regions[name] = RegionSpec(
            name, prices, {g: int(number(v, f"max_instances.{g}")) for g, v in caps.items()}
        )
    rtt: dict[tuple[str, str], float] = {}
    for pair, v in mapping(doc.get("rtt_ms", {}), "rtt_ms").items():
        a, sep, b = str(pair).partition("-")
        if not sep:
            raise PlanInputError(f"rtt_ms key {pair!r} must be 'regionA-regionB'")
        rtt[(a, b)] = number(v, f"rtt_ms.{pair}")
    opts = {
        k: number(doc[k], k)
        for k in ("max_rtt_ms", "startup_s", "max_utilization", "spot_max_share", "slo_ttft_s")
        if k in doc
    }
    spec = PlanSpec(gpus=gpus, regions=regions, rtt_ms=rtt, **opts)
    spec.validate()
    return spec


def spec_to_dict(spec: PlanSpec) -> dict[str, object]:
    return {
        "gpus": {g.name: {"throughput": dict(g.throughput)} for g in spec.gpus.values()},
        "regions": {
            r.name: {
                "prices": {
                    gpu: {"reserved": p.reserved, "on_demand": p.on_demand, "spot": p.spot}
                    for gpu, p in r.prices.items()
                },
                "max_instances": dict(r.max_instances),
            }
            for r in spec.regions.values()
        },
        "rtt_ms": {f"{a}-{b}": v for (a, b), v in spec.rtt_ms.items()},
        "max_rtt_ms": spec.max_rtt_ms,
        "startup_s": spec.startup_s,
        "max_utilization": spec.max_utilization,
        "spot_max_share": spec.spot_max_share,
        "slo_ttft_s": spec.slo_ttft_s,
    }
