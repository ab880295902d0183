"""The README's main command, `cornserve demo`, run once as a user would (with `--once`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cornserve.runtime.process import free_port
from cornserve.sidecar.ownership import owned_by_a_live_process


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_demo_once_builds_the_checkpoint_serves_the_app_and_stops_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    shm_before = set(Path("/dev/shm").glob("cornserve-sidecar-*"))
    cornserve = Path(sys.executable).parent / "cornserve"
    done = subprocess.run(
        [
            str(cornserve),
            "demo",
            "--once",
            "--state-dir",
            str(state),
            "--port",
            str(free_port()),
            "--max-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "building the demo checkpoint (tiny qwen2-vl, random weights)" in out
    assert (state / "models" / "tiny-qwen2-vl" / "config.json").exists()
    assert "app 'demo' is ready" in out
    answer = out.split("answer: ", 1)[1]
    assert "time to first token" in answer and "chunks;" in answer
    assert out.rstrip().endswith("stopped")
    leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.strip()
    assert leftovers == "", f"processes of the demo cluster survived: {leftovers}"
    # Left behind: new arenas no live server owns (another cluster on this machine, e.g. a parallel
    # test run, holds the ownership lock of each of its arenas while it runs).
    new_shm = {
        p
        for p in set(Path("/dev/shm").glob("cornserve-sidecar-*")) - shm_before
        if not owned_by_a_live_process(p)
    }
    assert not new_shm, f"the demo left shared memory behind: {sorted(new_shm)}"
