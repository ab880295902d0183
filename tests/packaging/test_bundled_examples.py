"""The example app ships inside cornserve-cli, so `cornserve demo` runs from a wheel or an image.

In a clone, `cornserve/cli/examples/` links to the top-level `examples/` (one copy of each file);
a wheel must carry the files themselves.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from tests.packaging.uvrun import ROOT, run_uv

from cornserve.cli.bundled import DEMO_APP_FILE, DEMO_REQUEST_FILE, MissingExampleError, example_text

BUNDLED = (DEMO_APP_FILE, DEMO_REQUEST_FILE)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_example_is_the_top_level_file(name: str) -> None:
    assert example_text(name) == (ROOT / "examples" / name).read_text()


def test_a_missing_example_is_a_typed_error_naming_it() -> None:
    with pytest.raises(MissingExampleError, match=r"no_such_app\.py"):
        example_text("no_such_app.py")


def test_the_wheel_carries_the_example_files(tmp_path: Path) -> None:
    run_uv("build", "--wheel", "--out-dir", str(tmp_path), "packages/cornserve-cli", timeout=180.0)
    (wheel,) = tmp_path.glob("cornserve_cli-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in BUNDLED:
            info = archive.getinfo(f"cornserve/cli/examples/{name}")
            assert archive.read(info).decode() == (ROOT / "examples" / name).read_text()
