"""Client API keys with a per-key rate limit (sans-I/O: header and ``now`` in).

With ``api_keys`` configured, every ``/v1/`` request needs ``Authorization: Bearer <key>``:
a missing or unknown key is a 401 (OpenAI's ``invalid_api_key``), a key over its rate a
429 with ``Retry-After`` (``rate_limit_exceeded``). Keys are held as SHA-256 digests and
looked up by digest, so comparing does not leak a key's prefix through timing. The key a
client presents is the router's, not the engine's: it is never passed on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh.limits import TokenBucket


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    name: str
    rate: float | None = None
    """Requests a second (sustained); None: unlimited."""
    burst: float | None = None
    """Requests allowed at once; default ``max(1, rate)``."""
    tier: str | None = None
    """The service tier of this key's requests that name none (``mesh.tiers``)."""


class KeyRefused(Exception):
    def __init__(self, status: int, message: str, code: str,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class ApiKeys:
    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._by_digest = {_digest(k.key): k for k in keys}
        self._buckets: dict[str, TokenBucket] = {}
        self.refused: dict[str, int] = {"missing": 0, "invalid": 0, "rate_limited": 0}

    def __bool__(self) -> bool:
        return bool(self._by_digest)

    def check(self, headers: Mapping[str, str], now: float) -> ApiKey:
        """The caller's key, or ``KeyRefused`` (401 / 429)."""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.refused["missing"] += 1
            raise KeyRefused(401, "missing API key: send 'Authorization: Bearer <key>'",
                             "invalid_api_key")
        key = self._by_digest.get(_digest(token.strip()))
        if key is None:
            self.refused["invalid"] += 1
            raise KeyRefused(401, "incorrect API key provided", "invalid_api_key")
        if key.rate is not None:
            bucket = self._buckets.get(key.name)
            if bucket is None:
                burst = key.burst if key.burst is not None else max(1.0, key.rate)
                bucket = self._buckets[key.name] = TokenBucket(key.rate, burst, now)
            wait = bucket.take(now)
            if wait > 0:
                self.refused["rate_limited"] += 1
                raise KeyRefused(429, f"rate limit of {key.rate:g} requests/s reached for "
                                 f"key {key.name!r}", "rate_limit_exceeded", wait)
        return key
