"""Versions come from package metadata, and every built wheel ships its `py.typed` markers."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
import zipfile
from pathlib import Path

import pytest
from tests.packaging.uvrun import ROOT, run_uv

PACKAGES = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))


def subpackages(package_dir: Path) -> list[str]:
    """The `cornserve.*` subpackages a workspace package provides, e.g. ["task", "app"]."""
    return sorted(p.parent.name for p in (package_dir / "src" / "cornserve").glob("*/__init__.py"))


def test_every_subpackage_has_a_py_typed_marker() -> None:
    missing = [
        f"{package.name}: cornserve/{sub}"
        for package in PACKAGES
        for sub in subpackages(package)
        if not (package / "src" / "cornserve" / sub / "py.typed").is_file()
    ]
    assert missing == []
    assert not (ROOT / "packages" / "cornserve-task" / "src" / "cornserve" / "py.typed").exists()


@pytest.mark.parametrize("package", [p.name for p in PACKAGES])
def test_version_is_the_distribution_version(package: str) -> None:
    declared = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"][
        "version"
    ]
    assert importlib.metadata.version(package) == declared
    for sub in subpackages(ROOT / "packages" / package):
        source = (ROOT / "packages" / package / "src" / "cornserve" / sub / "__init__.py").read_text()
        if "__version__" not in source:
            continue
        assert re.search(r"__version__\s*=\s*[\"']", source) is None, (
            f"cornserve.{sub} hard-codes __version__"
        )
        assert importlib.import_module(f"cornserve.{sub}").__version__ == declared


def test_wheels_ship_py_typed(tmp_path: Path) -> None:
    run_uv("build", "--all-packages", "--wheel", "--out-dir", str(tmp_path), "--quiet", timeout=240.0)
    for package in PACKAGES:
        wheel_name = package.name.replace("-", "_")
        (wheel,) = tmp_path.glob(f"{wheel_name}-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        for sub in subpackages(package):
            assert f"cornserve/{sub}/py.typed" in names, f"{wheel.name} lacks cornserve/{sub}/py.typed"
