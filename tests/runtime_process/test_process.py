"""`cornserve.runtime.process` with real processes: parent death, escalation, whole-group stop, logs, ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cornserve.runtime.process import (
    KILL_WAIT_S,
    ProcessGroup,
    free_port,
    group_members,
    log_tail,
    pid_alive,
    wait_for,
)

# A child that ignores SIGTERM and forks a grandchild (same process group) that ignores it too,
# then logs the grandchild's pid.
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pid = os.fork()
if pid == 0:
    time.sleep(600)
    os._exit(0)
print("grandchild", pid, flush=True)
time.sleep(600)
"""

# A parent that starts a grandchild through the runtime, prints its pid, then sleeps.
PARENT = """
import sys, time
from pathlib import Path
from cornserve.runtime.process import ProcessGroup
group = ProcessGroup.spawn(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    log_path=Path(sys.argv[1]), die_with_parent=sys.argv[2] == "1",
)
print(group.pid, flush=True)
time.sleep(600)
"""


def _grandchild_pid(log: Path) -> int:
    assert wait_for(lambda: "grandchild" in log_tail(log), 30), log_tail(log)
    return int(log_tail(log).split()[1])


def _start_parent(tmp_path: Path, die_with_parent: bool) -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "grandchild.log"), "1" if die_with_parent else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    line = parent.stdout.readline()
    parent.stdout.close()
    assert line.strip().isdigit(), line
    return parent, int(line)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_grandchild_dies_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    parent, grandchild = _start_parent(tmp_path, die_with_parent=True)
    assert pid_alive(grandchild)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    assert wait_for(lambda: not pid_alive(grandchild), 10), f"pid {grandchild} outlived its SIGKILLed parent"


def test_without_die_with_parent_the_grandchild_survives(tmp_path: Path) -> None:
    """The control for the test above: what a task manager needs to be adopted after a restart."""
    parent, grandchild = _start_parent(tmp_path, die_with_parent=False)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    try:
        time.sleep(0.5)
        assert pid_alive(grandchild)
    finally:
        adopted = ProcessGroup.adopt(grandchild)
        adopted.stop(grace_s=5)
    assert adopted.gone() and adopted.exit_code() == -1


def test_a_child_spawned_from_a_finished_thread_keeps_running(tmp_path: Path) -> None:
    """Linux signals a child when the *thread* that forked it exits; spawning must not depend on it."""
    spawned: list[ProcessGroup] = []
    thread = threading.Thread(
        target=lambda: spawned.append(
            ProcessGroup.spawn(
                [sys.executable, "-c", "import time; time.sleep(600)"],
                log_path=tmp_path / "t.log",
                die_with_parent=True,
            )
        )
    )
    thread.start()
    thread.join(timeout=30)
    (group,) = spawned
    try:
        time.sleep(1.0)
        assert group.alive(), f"exited with {group.exit_code()} after its spawning thread ended"
    finally:
        group.stop(grace_s=5)


def test_stop_escalates_to_sigkill_and_leaves_no_group_member(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    group = ProcessGroup.spawn([sys.executable, "-c", STUBBORN], log_path=log, die_with_parent=True)
    grandchild = _grandchild_pid(log)
    assert set(group_members(group.pid)) == {group.pid, grandchild}
    started = time.monotonic()
    code = group.stop(grace_s=1.0)
    took = time.monotonic() - started
    assert code == -signal.SIGKILL
    assert 1.0 <= took < 1.0 + KILL_WAIT_S, took
    assert group_members(group.pid) == [] and not pid_alive(grandchild)


async def test_stop_async_escalates_too(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    group = ProcessGroup.spawn([sys.executable, "-c", STUBBORN], log_path=log, die_with_parent=True)
    grandchild = _grandchild_pid(log)
    assert await group.stop_async(grace_s=0.5) == -signal.SIGKILL
    assert group.gone() and not pid_alive(grandchild)


def test_stop_of_a_cooperative_child_is_prompt_and_keeps_its_exit_code(tmp_path: Path) -> None:
    script = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(7))\nprint('up', flush=True)\ntime.sleep(600)"
    log = tmp_path / "ok.log"
    group = ProcessGroup.spawn([sys.executable, "-c", script], log_path=log, die_with_parent=True)
    assert wait_for(lambda: "up" in log_tail(log), 30)
    started = time.monotonic()
    assert group.stop(grace_s=30) == 7
    assert time.monotonic() - started < 5


def test_log_is_appended_and_its_tail_is_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "counter.log"  # the directory is created
    for start in (0, 100):
        group = ProcessGroup.spawn(
            [
                sys.executable,
                "-c",
                f"import sys\nfor i in range({start}, {start + 100}): print(i)\nsys.exit(2)",
            ],
            log_path=log,
            die_with_parent=True,
        )
        assert group.wait(30) == 2
    assert log.read_text().split() == [str(i) for i in range(200)]
    assert group.log_tail(max_lines=3) == "197\n198\n199"
    assert log_tail(log, max_chars=8) == "198\n199"
    assert log_tail(tmp_path / "missing.log").startswith("<log ")


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
