"""mesh.json_body: the fast decoder accepts and refuses exactly what json.loads does."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh import json_body

CASES = [
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"a": 123456789012345678901234567890}', b'{"a":1,"a":2}', b'{"a": 1e400}',
    b'{"a": -0.0}', b'{"a": "\\ud800"}', b'{"a": NaN}', b'{"a": -Infinity}', b"[1,2]",
    b'  {"a":1}  ', b'{"a":1} x', b'\xef\xbb\xbf{"a":1}', b'{"a":"\xff"}', b"", b"{",
    b"[" * 5000 + b"]" * 5000, b'{"a": 1.0000000000000002}', b'"\\u00e9"',
]


def outcome(fn: object, raw: bytes) -> object:
    try:
        value = fn(raw)  # type: ignore[operator]
    except RecursionError:
        return "RecursionError"
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return type(exc).__name__
    return repr(value) if not (isinstance(value, float) and math.isnan(value)) else "nan"


@pytest.mark.parametrize("raw", CASES)
def test_same_outcome_as_the_standard_library(raw: bytes) -> None:
    assert outcome(json_body.loads, raw) == outcome(json.loads, raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
    max_leaves=20)


@given(json_values)
def test_round_trips_like_the_standard_library(value: object) -> None:
    raw = json.dumps(value).encode()
    assert repr(json_body.loads(raw)) == repr(json.loads(raw))
