"""Suite-wide rules.

Under ``CI=true`` an integration or chaos test that skips (no Docker, no Redis, a
missing binary) is turned into a failure: in CI, infrastructure that cannot run
is a broken build, not a pass.

A run stopped with SIGTERM (a timeout, a CI job cancelled) ends like Ctrl-C: the fixtures'
teardowns still run, so the engines, routers and containers a test started are stopped
rather than left running (they live in their own sessions and would outlive the run).
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

from cli import sigterm_like_ctrl_c

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
_STRICT_MARKERS = ("integration", "chaos", "redis", "real")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if IN_CI and report.skipped and any(item.get_closest_marker(m) for m in _STRICT_MARKERS):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def pytest_configure(config: pytest.Config) -> None:
    sigterm_like_ctrl_c()
