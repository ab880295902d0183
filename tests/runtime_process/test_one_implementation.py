"""Process groups, parent-death signals and port picking live in one module of the product.

A second copy is how the five diverging implementations this replaced came to be: scan every
product source file for the primitives and fail when one appears outside `cornserve.runtime.process`.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "packages" / "cornserve-runtime" / "src" / "cornserve" / "runtime" / "process.py"
PRIMITIVES = ("start_new_session", "os.killpg", "os.setsid", "PR_SET_PDEATHSIG", "def free_port")


def test_process_primitives_appear_only_in_the_runtime_process_module() -> None:
    sources = sorted((ROOT / "packages").rglob("*.py"))
    assert HOME in sources
    offenders = [
        f"{path.relative_to(ROOT)}: {word}"
        for path in sources
        if path != HOME
        for word in PRIMITIVES
        if word in path.read_text()
    ]
    assert not offenders, "use cornserve.runtime.process instead:\n" + "\n".join(offenders)


def test_the_scan_sees_the_primitives_where_they_belong() -> None:
    """Guards the scan itself: the words it looks for are the ones the module really uses."""
    text = HOME.read_text()
    assert all(word in text for word in PRIMITIVES if word != "os.setsid")
