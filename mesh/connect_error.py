"""The upstream connection error, kept in a module the compiled build leaves as Python: a
compiled class cannot inherit ``OSError``."""

from __future__ import annotations


class ConnectError(OSError):
    """The connection could not be made (refused, unreachable, DNS, TLS, timeout)."""
