"""Benchmark and evaluation entry points behind ``kvmesh bench NAME``.

name -> (module, one-line help). The module exposes ``main(argv: list[str]) -> int``,
prints its figures and writes them (JSON + markdown) under ``results/`` unless
told otherwise with ``--out``.
"""

from __future__ import annotations

BENCHES: dict[str, tuple[str, str]] = {}
