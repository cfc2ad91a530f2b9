"""JSON bodies decoded fast, accepting exactly what the standard library accepts.

msgspec decodes a chat body about four times faster than ``json.loads``. Where it refuses
a document (the standard library takes a ``NaN`` literal, a lone surrogate escape, a byte
order mark, a float out of range, deeper nesting) the standard library decides, so a body
is accepted or refused, and decoded to the same values, as before.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_decoder = msgspec.json.Decoder()


def loads(raw: bytes) -> Any:
    """``json.loads(raw)``, faster; raises what ``json.loads`` raises."""
    try:
        return _decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return json.loads(raw)
