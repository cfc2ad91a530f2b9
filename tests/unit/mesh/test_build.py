"""mesh.build: which build runs, and the refusal of compiled modules that no longer match
their sources."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from mesh import build
from mesh.native_modules import NATIVE_MODULES

EXPECT_COMPILED = os.environ.get("KVMESH_EXPECT_COMPILED") == "1"


def test_module_names_follow_the_paths() -> None:
    assert len(build.MODULE_NAMES) == len(NATIVE_MODULES)
    assert "mesh.router" in build.MODULE_NAMES
    assert "kvevents.keys" in build.MODULE_NAMES
    assert "mesh.api" not in build.MODULE_NAMES  # aiohttp middlewares stay Python


def test_the_running_build_is_the_expected_one() -> None:
    info = build.check()
    assert info.label == ("compiled" if EXPECT_COMPILED else "pure")
    assert len(info.compiled) == (len(build.MODULE_NAMES) if EXPECT_COMPILED else 0)


def _layout(tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A compiled layout: an extension and its source per module, and their record."""
    origins, recorded = {}, {}
    for name in build.MODULE_NAMES:
        d = tmp_path.joinpath(*name.split(".")[:-1])
        d.mkdir(parents=True, exist_ok=True)
        leaf = name.rsplit(".", 1)[-1]
        src = d / f"{leaf}.py"
        src.write_text(f"# {name}\n")
        so = d / f"{leaf}.cpython-311-x86_64-linux-gnu.so"
        so.write_bytes(b"\x7fELF")
        origins[name] = str(so)
        recorded[name] = hashlib.sha256(src.read_bytes()).hexdigest()
    return origins, recorded


def test_matching_sources_are_not_stale(tmp_path: Path) -> None:
    origins, recorded = _layout(tmp_path)
    assert build.stale(origins, recorded) == []
    assert build.stale({}, None) == []  # the pure build


def test_an_edited_source_is_refused(tmp_path: Path) -> None:
    origins, recorded = _layout(tmp_path)
    src = tmp_path / "mesh" / "router.py"
    src.write_text(src.read_text() + "x = 1\n")
    problems = build.stale(origins, recorded)
    assert problems == [f"{src} changed since {origins['mesh.router']} was compiled from it"]


def test_no_record_and_a_partial_build_are_refused(tmp_path: Path) -> None:
    origins, _ = _layout(tmp_path)
    assert len(build.stale(origins, None)) == len(origins)
    part = {"mesh.view": origins["mesh.view"]}
    problems = build.stale(part, {"mesh.view": _layout(tmp_path)[1]["mesh.view"]})
    assert len(problems) == 1 and problems[0].startswith("only part of the request path")
    assert "mesh.router" in problems[0]


def test_describe() -> None:
    assert build.BuildInfo(()).describe() == "pure Python"
    full = build.BuildInfo(build.MODULE_NAMES)
    assert full.label == "compiled"
    assert full.describe() == f"compiled (mypyc: {len(build.MODULE_NAMES)}/"\
        f"{len(build.MODULE_NAMES)} modules)"
    assert build.BuildInfo(build.MODULE_NAMES[:2]).label == "mixed"


def test_check_refuses_a_stale_compiled_module(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    origins, recorded = _layout(tmp_path)
    monkeypatch.setattr(build, "_extension_origin", origins.get)
    monkeypatch.setattr(build, "_recorded", lambda: recorded)
    assert build.check().label == "compiled"
    (tmp_path / "mesh" / "view.py").write_text("changed\n")
    with pytest.raises(build.StaleBuild, match=r"view\.py changed since"):
        build.check()
