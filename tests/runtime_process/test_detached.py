"""Process records of detached groups (`cornserve.runtime.detached`) on real processes."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cornserve.runtime.detached import DetachedGroups, DetachedRecord
from cornserve.runtime.process import pid_alive, process_start_ticks, signal_group, wait_for


def sleeper() -> subprocess.Popen[bytes]:
    """A group leader with a child of its own, as a task manager with an executor."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_records_are_written_read_and_stopped(tmp_path: Path) -> None:
    groups = DetachedGroups(tmp_path / "tms")
    proc = sleeper()
    try:
        rec = groups.record("task-a", proc.pid)
        assert rec.start_ticks == process_start_ticks(proc.pid) and rec.alive()
        assert groups.records() == [rec]
        stopped = groups.stop_all(grace_s=5, say=lambda _: None)
        assert [r.pid for r in stopped] == [proc.pid]
        assert proc.wait(timeout=10) is not None
        assert groups.records() == []
    finally:
        kill_group(proc)


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    groups = DetachedGroups(tmp_path / "tms")
    proc = sleeper()
    try:
        rec = DetachedRecord(
            name="task-b", pid=proc.pid, start_ticks=(process_start_ticks(proc.pid) or 0) + 1
        )
        groups.directory.mkdir(parents=True)
        groups.path("task-b").write_text(rec.model_dump_json())
        assert not groups.records()[0].alive()  # same pid, another process
        assert groups.stop_all(grace_s=1, say=lambda _: None) == []
        assert pid_alive(proc.pid) and groups.records() == []  # untouched; the stale record is dropped
    finally:
        kill_group(proc)


def test_unreadable_records_are_skipped_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    groups = DetachedGroups(tmp_path / "tms")
    groups.directory.mkdir(parents=True)
    (groups.directory / "bad.json").write_bytes(b"\xff not json")
    (groups.directory / "other.json").write_text('{"name": "elsewhere", "pid": 12345}')
    with caplog.at_level(logging.WARNING):
        assert groups.records() == []
    assert "skipping unreadable process record" in caplog.text and "it names 'elsewhere'" in caplog.text
    assert (groups.directory / "bad.json").exists()
    with pytest.raises(ValueError):
        groups.path("../escape")


def test_a_finished_group_leaves_nothing(tmp_path: Path) -> None:
    groups = DetachedGroups(tmp_path / "tms")
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    groups.record("task-c", proc.pid)
    proc.wait(timeout=30)
    assert wait_for(lambda: not groups.records()[0].alive(), 5)
    assert groups.stop_all(grace_s=1, say=lambda _: None) == []
    assert groups.records() == []
