"""Process groups that outlive their parent on purpose, recorded in a directory so they can be found.

A task manager is started detached from the resource manager (`die_with_parent=False`): a
resource manager that restarts, gracefully or after a crash, adopts the running data plane instead
of stopping it. Something else must then stop the data plane when the whole cluster stops, and a
restarted parent must find processes it no longer has a handle to. Both read these records:
one JSON file per name (`<dir>/<name>.json`: name, pid, start time) written when the group is
started or adopted and removed when it is stopped.

A record is never trusted blindly: a file that does not parse is skipped (and logged), and a
record whose pid now runs a process started at another time (the pid was reused) is stale: it is
treated as gone and never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cornserve.runtime.process import (
    KILL_WAIT_S,
    group_members,
    pid_alive,
    process_start_ticks,
    signal_group,
    wait_for,
)

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


class DetachedRecord(BaseModel):
    """One recorded process group: its leader's pid and when that process started."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=_NAME.pattern)
    pid: int = Field(gt=1)
    start_ticks: int | None = None
    """The leader's start time (clock ticks since boot, /proc/<pid>/stat); None without procfs."""

    def alive(self) -> bool:
        """Whether the recorded process still runs (and is the same process, not a reused pid)."""
        if not pid_alive(self.pid):
            return False
        return self.start_ticks is None or process_start_ticks(self.pid) == self.start_ticks


class DetachedGroups:
    """The records in one directory (created on the first write)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str) -> Path:
        """The record file of `name`."""
        if not _NAME.match(name):
            raise ValueError(f"not a valid process record name: {name!r}")
        return self.directory / f"{name}.json"

    def record(self, name: str, pid: int) -> DetachedRecord:
        """Record (or re-record) the group led by `pid` under `name`; written atomically."""
        rec = DetachedRecord(name=name, pid=pid, start_ticks=process_start_ticks(pid))
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(name)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(rec.model_dump_json())
        tmp.replace(target)
        return rec

    def forget(self, name: str, pid: int | None = None) -> None:
        """Remove the record of `name` (only if it names `pid`, when given)."""
        current = self.get(name)
        if current is not None and (pid is None or current.pid == pid):
            with contextlib.suppress(FileNotFoundError):
                self.path(name).unlink()

    def get(self, name: str) -> DetachedRecord | None:
        """The record of `name`, None if absent or unreadable."""
        return self._read(self.path(name))

    def records(self) -> list[DetachedRecord]:
        """Every readable record (unreadable files are logged and skipped, never deleted)."""
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            rec = self._read(path)
            if rec is not None:
                found.append(rec)
        return found

    def _read(self, path: Path) -> DetachedRecord | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("skipping unreadable process record %s: %s", path, exc)
            return None
        try:
            rec = DetachedRecord.model_validate_json(text)
        except ValidationError as exc:
            logger.warning("skipping unreadable process record %s: %d error(s)", path, exc.error_count())
            return None
        if path.stem != rec.name:
            logger.warning("skipping process record %s: it names %r", path, rec.name)
            return None
        return rec

    def stop_all(self, grace_s: float, say: Callable[[str], object] = logger.info) -> list[DetachedRecord]:
        """SIGTERM every recorded live group at once, SIGKILL what is left after `grace_s`; drop the records.

        Returns the records that were running. Records of processes already gone (or of reused
        pids) are removed without signalling anything.
        """
        live = [rec for rec in self.records() if rec.alive()]
        for rec in live:
            say(f"  stopping {rec.name} (pid {rec.pid})")
            signal_group(rec.pid, signal.SIGTERM)
        wait_for(lambda: not any(pid_alive(rec.pid) for rec in live), grace_s, poll_s=0.1)
        for rec in live:
            if pid_alive(rec.pid):
                say(f"  {rec.name} (pid {rec.pid}) did not stop within {grace_s:.0f} s; killing it")
            signal_group(rec.pid, signal.SIGKILL)  # also sweeps what the leader left in its group
        wait_for(lambda: not any(group_members(rec.pid) for rec in live), KILL_WAIT_S, poll_s=0.1)
        for rec in self.records():
            if not rec.alive():  # one recorded meanwhile (a parent still starting it) is kept
                self.forget(rec.name, rec.pid)
        return live
