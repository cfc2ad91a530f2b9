"""Which build of the request path runs: the Python sources, or the C extensions mypyc made of
``mesh/native_modules.py`` (``KVMESH_COMPILE=1``, see ``setup.py``).

A compiled module is refused when it no longer matches the source installed beside it (the
build records each source's hash in ``mesh/_native_build.py``): an edited ``.py`` must never
be shadowed by an older binary that Python imports in its place.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from mesh.native_modules import NATIVE_MODULES

MODULE_NAMES = tuple(p.removesuffix(".py").replace("/", ".") for p in NATIVE_MODULES)


class StaleBuild(RuntimeError):
    """Compiled and source modules disagree: rebuild, or install the pure package."""


@dataclass(frozen=True, slots=True)
class BuildInfo:
    compiled: tuple[str, ...]
    """The modules of ``MODULE_NAMES`` that load as C extensions."""

    @property
    def label(self) -> str:
        """``compiled`` (all of them), ``pure`` (none) or ``mixed``."""
        if not self.compiled:
            return "pure"
        return "compiled" if len(self.compiled) == len(MODULE_NAMES) else "mixed"

    def describe(self) -> str:
        if self.label == "pure":
            return "pure Python"
        return f"{self.label} (mypyc: {len(self.compiled)}/{len(MODULE_NAMES)} modules)"


def _extension_origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None
    return spec.origin


def info() -> BuildInfo:
    return BuildInfo(tuple(n for n in MODULE_NAMES if _extension_origin(n) is not None))


def source_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale(origins: dict[str, str], recorded: dict[str, str] | None) -> list[str]:
    """Why the compiled modules (name -> extension path) do not match their sources:
    ``recorded`` maps each module to the hash of the source it was compiled from (None when
    the build left no record)."""
    problems = []
    if origins and len(origins) != len(MODULE_NAMES):
        missing = sorted(set(MODULE_NAMES) - set(origins))
        problems.append(f"only part of the request path is compiled (not: {', '.join(missing)})")
    for name, origin in sorted(origins.items()):
        src = Path(origin).parent / (name.rsplit(".", 1)[-1] + ".py")
        if recorded is None or name not in recorded:
            problems.append(f"{origin}: no record of the source it was compiled from")
        elif src.exists() and source_hash(src) != recorded[name]:
            problems.append(f"{src} changed since {origin} was compiled from it")
    return problems


def _recorded() -> dict[str, str] | None:
    try:
        record = importlib.import_module("mesh._native_build")
    except ImportError:
        return None
    return dict(record.SOURCES)


def check() -> BuildInfo:
    """The running build; ``StaleBuild`` when a compiled module would run instead of a
    different source beside it, or only part of the request path is compiled."""
    origins = {n: o for n in MODULE_NAMES if (o := _extension_origin(n)) is not None}
    problems = stale(origins, _recorded() if origins else None)
    if problems:
        raise StaleBuild(
            "the compiled request path does not match its sources: " + "; ".join(problems)
            + ". Rebuild it (KVMESH_COMPILE=1 pip install --no-build-isolation .) or install "
            "the pure-Python package (pip install -e .)")
    return BuildInfo(tuple(origins))
