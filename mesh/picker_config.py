"""The ``endpoint_picker`` section of a router's configuration (see docs/gateway.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from mesh.picker import DEST_NAMESPACE, SUBSET_NAMESPACE


class PickerConfigError(ValueError):
    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key


@dataclass(frozen=True, slots=True)
class PickerConfig:
    listen: str = "0.0.0.0:9002"
    """host:port of the gRPC server (ext_proc and gRPC health)."""
    fallbacks: int = 0
    """Next-best local endpoints listed after the primary (0: the primary alone, which is
    what an ORIGINAL_DST cluster needs; a proxy that walks the list can take more)."""
    remote: bool = True
    """Let the mesh send a request to another region's entry (its router); False keeps every
    pick inside this pool."""
    priority_header: str = "x-kvmesh-priority"
    shed_below: int = 0
    """A request whose priority is below this is sheddable: 429 instead of waiting."""
    mark_down_statuses: tuple[int, ...] = (502, 503, 504)
    """Statuses from the served endpoint that count as its failure (the engine is taken out
    until its next good health check)."""
    dest_namespace: str = DEST_NAMESPACE
    subset_namespace: str = SUBSET_NAMESPACE
    max_body: int = 64 * 1024 * 1024

    @property
    def host(self) -> str:
        host, _, _ = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0"

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


KEYS = tuple(f.name for f in fields(PickerConfig))


def _int(value: object, key: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PickerConfigError(key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _str(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise PickerConfigError(key, f"expected a non-empty string, got {value!r}")
    return value


def parse(value: object, key: str = "endpoint_picker") -> PickerConfig | None:
    """None (or ``false``): no picker; ``true`` or ``{}``: the defaults; else a mapping."""
    if value is None or value is False:
        return None
    if value is True:
        return PickerConfig()
    if not isinstance(value, Mapping):
        raise PickerConfigError(key, f"expected a mapping, got {value!r}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise PickerConfigError(f"{key}.{unknown[0]}", f"unknown key (known: {', '.join(KEYS)})")
    d = PickerConfig()
    listen = _str(value.get("listen", d.listen), f"{key}.listen")
    _, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PickerConfigError(f"{key}.listen", f"expected host:port, got {listen!r}")
    remote = value.get("remote", d.remote)
    if not isinstance(remote, bool):
        raise PickerConfigError(f"{key}.remote", f"expected true or false, got {remote!r}")
    statuses = value.get("mark_down_statuses", list(d.mark_down_statuses))
    if not isinstance(statuses, list):
        raise PickerConfigError(f"{key}.mark_down_statuses",
                                f"expected a list of HTTP statuses, got {statuses!r}")
    shed = value.get("shed_below", d.shed_below)
    if isinstance(shed, bool) or not isinstance(shed, int):
        raise PickerConfigError(f"{key}.shed_below", f"expected an integer, got {shed!r}")
    return PickerConfig(
        listen=listen,
        fallbacks=_int(value.get("fallbacks", d.fallbacks), f"{key}.fallbacks"),
        remote=remote,
        priority_header=_str(value.get("priority_header", d.priority_header),
                             f"{key}.priority_header").lower(),
        shed_below=shed,
        mark_down_statuses=tuple(_int(s, f"{key}.mark_down_statuses[{i}]", 100)
                                 for i, s in enumerate(statuses)),
        dest_namespace=_str(value.get("dest_namespace", d.dest_namespace),
                            f"{key}.dest_namespace"),
        subset_namespace=_str(value.get("subset_namespace", d.subset_namespace),
                              f"{key}.subset_namespace"),
        max_body=_int(value.get("max_body", d.max_body), f"{key}.max_body", 1),
    )
