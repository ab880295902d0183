"""Running uv on the workspace from tests: the lock's view of an environment, and syncs into temp dirs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def uv_command() -> list[str]:
    """The uv that runs these tests (`uv run` exports it as `$UV`), else the one on PATH."""
    found = os.environ.get("UV") or shutil.which("uv")
    if found is None:
        raise RuntimeError("uv not found: run the tests with `uv run` or put uv on PATH")
    return [found]


def run_uv(*args: str, env: dict[str, str] | None = None, timeout: float = 120.0) -> str:
    """Run uv in the workspace root; its stdout, or a failure that shows its stderr."""
    base = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    proc = subprocess.run(
        [*uv_command(), *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"uv {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}"
    return proc.stdout


def exported(*args: str) -> dict[str, str]:
    """`uv export --locked ... --no-dev` as {normalized distribution name: version} (workspace members: "")."""
    text = run_uv("export", "--locked", "--no-dev", "--no-hashes", "--no-header", "--no-annotate", *args)
    found: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split(";")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-e "):
            found[Path(line[3:]).name] = ""
            continue
        name, _, version = line.partition("==")
        found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found
