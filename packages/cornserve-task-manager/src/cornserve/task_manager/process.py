"""Child processes in their own process group: start with a log file, stop with a grace period.

Executors may fork helpers (tokenizer pools, NCCL workers); signalling the whole group is what
leaves no orphans behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)


PR_SET_PDEATHSIG = 1


def _terminate_with(parent: int) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to SIGTERM the child when its parent (this task manager) dies.

    Without it, a task manager killed with SIGKILL would leave its executors running, holding
    devices and ports that the re-deployed task needs. Elsewhere, there is no such safety net.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def spawn_in_group(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `command` as the leader of a new session, stdout and stderr appended to `log_path`.

    The child gets SIGTERM if this process dies (Linux), so executors never outlive their manager.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_terminate_with(os.getpid()),
        )


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


async def stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM the process group, SIGKILL it after `grace_s`; returns the exit code."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    if proc.poll() is None:
        logger.warning("pid %d ignored SIGTERM for %.1fs; sending SIGKILL", proc.pid, grace_s)
    # Also sweeps helpers of an already-exited leader that are still in the group.
    _signal_group(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    code = proc.poll()
    return -9 if code is None else code


def log_tail(path: Path, max_chars: int = 2000) -> str:
    """The end of a log file, for error messages a user can act on."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_chars))
            return f.read().decode(errors="replace").strip()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
