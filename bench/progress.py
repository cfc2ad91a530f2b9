"""Progress for benchmarks, so none runs silently: phases and throttled bars on stderr.

Figures go to stdout (and files); progress goes to stderr, so a piped or saved result stays
clean. On a terminal a bar redraws in place (at most 10 times a second); elsewhere (CI logs,
``| tee``) a line is printed at most every ``every`` seconds and at the end, so a long step
is visible in a log without flooding it.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}" if s >= 60 else f"{seconds:.0f} s"


class Bar:
    """``update(done)`` towards ``total`` (None: no total known, counts only)."""

    def __init__(self, label: str, total: float | None = None, unit: str = "",
                 every: float = 5.0, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self._last = time.monotonic()
        self.done = 0.0
        self._drawn = False

    def update(self, done: float, detail: str = "") -> None:
        self.done = done
        now = time.monotonic()
        if now - self._last < (0.1 if self.tty else self.every):
            return
        self._last = now
        self._draw(now, detail)

    def advance(self, n: float = 1, detail: str = "") -> None:
        self.update(self.done + n, detail)

    def close(self, detail: str = "") -> None:
        now = time.monotonic()
        self._draw(now, detail, final=True)

    def _draw(self, now: float, detail: str, final: bool = False) -> None:
        elapsed = now - self.started
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            frac = min(1.0, self.done / self.total)
            eta = "" if final or frac <= 0 else f", eta {_clock(elapsed * (1 - frac) / frac)}"
            bar = "#" * round(20 * frac) + "." * (20 - round(20 * frac))
            text = (f"  {self.label} [{bar}] {frac:4.0%} {self.done:,.0f}/{self.total:,.0f}"
                    f"{unit}, {_clock(elapsed)}{eta}")
        else:
            text = f"  {self.label}: {self.done:,.1f}{unit}, {_clock(elapsed)}"
        if detail:
            text += f" | {detail}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._drawn = True


class Phases:
    """Numbered steps of a benchmark: ``with phases.step("apply 1,000,000 pairs"):``."""

    def __init__(self, name: str, total: int, stream: TextIO | None = None) -> None:
        self.name, self.total, self.n = name, total, 0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.n += 1
        t0 = time.monotonic()
        print(f"[{self.name} {self.n}/{self.total}] {label} ...", file=self.stream, flush=True)
        yield
        now = time.monotonic()
        print(f"[{self.name} {self.n}/{self.total}] {label}: done in {_clock(now - t0)} "
              f"(total {_clock(now - self.started)})", file=self.stream, flush=True)
