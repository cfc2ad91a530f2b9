"""Policy parameters from configuration: typed, checked, and named in every error."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar, get_type_hints

from mesh.policies.base import PolicyError

P = TypeVar("P")


def parse_params(cls: type[P], params: Mapping[str, object], policy: str) -> P:
    """Build the frozen parameter dataclass ``cls`` from ``params``.

    Unknown keys, wrong types and negative numbers are errors that name
    ``policy.<key>``; ints are accepted where floats are expected.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise PolicyError(
            f"policy.{unknown[0]}: unknown parameter for policy {policy!r} "
            f"(known: {', '.join(sorted(names)) or 'none'})"
        )
    values: dict[str, Any] = {}
    for name, raw in params.items():
        values[name] = _coerce(hints[name], raw, f"policy.{name}")
    return cls(**values)


def _coerce(hint: object, raw: object, key: str) -> object:
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        raise PolicyError(f"{key}: expected true or false, got {raw!r}")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
            return raw
        raise PolicyError(f"{key}: expected a non-negative integer, got {raw!r}")
    if hint is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            value = float(raw)
            if value >= 0 and not math.isnan(value):
                return value
        raise PolicyError(f"{key}: expected a non-negative number, got {raw!r}")
    if hint == float | None:
        if raw is None:
            return None
        return _coerce(float, raw, key)
    if hint is str:
        if isinstance(raw, str) and raw:
            return raw
        raise PolicyError(f"{key}: expected a non-empty string, got {raw!r}")
    raise TypeError(f"{key}: unsupported parameter type {hint!r}")
