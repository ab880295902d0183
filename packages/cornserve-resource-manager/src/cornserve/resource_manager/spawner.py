"""How task-manager processes come to exist: a `Spawner` interface and the local-subprocess spawner.

Node agents and Kubernetes are later spawners behind the same interface; the resource manager only
needs to start a task manager, know whether it is still alive, read its log's tail, and kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from cornserve.bus.control import TaskSpec

logger = logging.getLogger(__name__)


class TaskManagerHandle(Protocol):
    """A running (or exited) task-manager process."""

    @property
    def pid(self) -> int | None:
        """Process id, where the spawner has one."""

    def exit_code(self) -> int | None:
        """None while alive; the exit code (or -1 when unknown) once it is gone."""

    def log_tail(self, max_chars: int = 2000) -> str:
        """The end of its log, for error messages."""

    async def kill(self, grace_s: float) -> None:
        """SIGTERM its process group, SIGKILL after `grace_s`; returns once it is gone."""


class Spawner(Protocol):
    """Starts task managers and re-attaches to ones that survived a resource-manager restart."""

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Start a task manager for `task`."""

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """A handle to a task manager started by an earlier resource-manager process."""


def _read_tail(path: Path, max_chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_chars))
            return f.read().decode(errors="replace").strip()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalProcessHandle:
    """A task manager this process started (its child, leader of its own process group)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self._proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int | None:
        """The child's pid."""
        return self._proc.pid

    def exit_code(self) -> int | None:
        """None while alive."""
        return self._proc.poll()

    def log_tail(self, max_chars: int = 2000) -> str:
        """End of the task manager's log file."""
        return _read_tail(self.log_path, max_chars)

    async def kill(self, grace_s: float) -> None:
        """SIGTERM the group, then SIGKILL (also sweeps children left behind by an exited leader)."""
        pid = self._proc.pid
        if self._proc.poll() is None:
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self._proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._proc.poll() is None:
                logger.warning("task manager pid %d ignored SIGTERM for %.1fs; killing it", pid, grace_s)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self._proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class AdoptedProcessHandle:
    """A task manager started by an earlier resource manager: known only by pid (not our child)."""

    def __init__(self, pid: int | None, log_path: Path | None) -> None:
        self._pid = pid
        self.log_path = log_path

    @property
    def pid(self) -> int | None:
        """The pid recorded when it was spawned (or reported by the task manager)."""
        return self._pid

    def exit_code(self) -> int | None:
        """None while the pid is alive; -1 (unknown code) once it is gone."""
        if self._pid is None:
            return None
        return None if _pid_alive(self._pid) else -1

    def log_tail(self, max_chars: int = 2000) -> str:
        """End of its log file, when known."""
        return "" if self.log_path is None else _read_tail(self.log_path, max_chars)

    async def kill(self, grace_s: float) -> None:
        """SIGTERM its group, SIGKILL after the grace period (it is its own group leader)."""
        pid = self._pid
        if pid is None:
            return
        if _pid_alive(pid):
            _signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while _pid_alive(pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        _signal_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _pid_alive(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class LocalSubprocessSpawner:
    """`python -m cornserve.task_manager.main` as a child process in its own process group."""

    def __init__(self, log_dir: Path, log_level: str = "INFO") -> None:
        self.log_dir = log_dir
        self.log_level = log_level

    def log_path(self, task_key: str) -> Path:
        """Where a task manager's stdout/stderr go (executor logs sit next to it)."""
        return self.log_dir / f"tm-{task_key}.log"

    async def spawn(self, task_key: str, task: TaskSpec, nats_url: str) -> TaskManagerHandle:
        """Start the task manager; it answers on its subjects once it has loaded the task."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(task_key)
        command = [
            sys.executable, "-m", "cornserve.task_manager.main",
            "--task-key", task_key,
            "--task-json", json.dumps(task, separators=(",", ":")),
            "--nats-url", nats_url,
            "--log-dir", str(self.log_dir),
            "--log-level", self.log_level,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("spawned task manager for %s (pid %d, log %s)", task_key, proc.pid, log_path)
        return LocalProcessHandle(proc, log_path)

    def adopt(self, task_key: str, pid: int | None) -> TaskManagerHandle:
        """Handle to a surviving task manager."""
        return AdoptedProcessHandle(pid, self.log_path(task_key))
