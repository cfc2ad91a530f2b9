"""Fixtures shared by the integration tests that start routers and engines."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from router_support import Procs, processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Router and engine processes for one test, all stopped when it ends."""
    with processes(tmp_path) as p:
        yield p
