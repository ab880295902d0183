"""Child processes as process groups: the one place Cornserve starts, signals and stops children.

Every child (a service under `cornserve up`, a task manager, an executor, vLLM under its proxy,
nats-server) is started as the leader of a new session, so one signal to its process group also
reaches the helpers it forks (tokenizer pools, NCCL workers) and a terminal's Ctrl-C does not hit
it before its parent has stopped things in order. On Linux a child may also get a signal when its
parent dies (`PR_SET_PDEATHSIG`), so a parent killed with SIGKILL leaves no children behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""`prctl` option: the signal the kernel sends this process when the thread that forked it exits."""

KILL_WAIT_S = 5.0
"""How long to wait for a group to vanish after SIGKILL (only a process stuck in the kernel takes longer)."""

SPAWN_TIMEOUT_S = 60.0
"""Bound on handing a spawn to the spawning thread (a fork and exec take milliseconds)."""

_PROC = Path("/proc")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it), for a child to listen on.

    For more than one port at once use `free_ports`: two calls of this may return the same port.
    """
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that were free a moment ago, for children to listen on.

    Every probe socket stays bound until all `count` ports are drawn: the kernel may hand a port
    that was just released to the next bind to port 0, so drawing ports one `free_port` at a time
    can return the same port twice (an executor's HTTP and channel ports were once drawn that way,
    and its channel was then dropped).
    """
    if count < 1:
        raise ValueError(f"free_ports needs a count of at least 1, got {count}")
    with contextlib.ExitStack() as held:
        ports: list[int] = []
        for _ in range(count):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind((host, 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def log_tail(path: Path, max_chars: int = 2000, max_lines: int | None = None) -> str:
    """The end of a child's log file, for error messages a user can act on.

    Reads only the last `max_chars` bytes (logs can be large), then keeps the last `max_lines`.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            text = f.read().decode(errors="replace").strip()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    return text if max_lines is None else "\n".join(text.splitlines()[-max_lines:])


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes; whether it held (never waits unbounded)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


async def wait_for_async(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """`wait_for` for event loops: polls without blocking the loop."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) from /proc/<pid>/stat; None if it is gone or there is no procfs."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[2])


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot); None if it is gone or there is no procfs.

    Two processes with the same pid and different start times are different processes: a record
    of a pid that outlived its process is recognised this way and never signalled.
    """
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # field 22 of stat(5); `fields` starts at field 3
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process exists and has not exited.

    A zombie (exited, not yet reaped by its parent, e.g. a `cornserve up` whose shell is busy) counts
    as gone, so nobody waits on a process that will never do anything again.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = _proc_state(pid)
    return state is None or state[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from a /proc scan (Linux).

    Without procfs, the group leader alone is checked.
    """
    if not _PROC.is_dir():
        return [pgid] if pid_alive(pgid) else []
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            state = _proc_state(int(entry.name))
            if state is not None and state[1] == pgid and state[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to every process of group `pgid`; False when the group is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        logger.warning("process group %d belongs to another user (pid reused?); not signalled", pgid)
        return False
    return True


def _die_with_parent_hook(sig: signal.Signals) -> Callable[[], None] | None:
    """A pre-exec hook asking Linux to send `sig` to the child when its parent dies.

    Without it, a parent killed with SIGKILL would leave its children running, holding devices and
    ports that a restarted parent needs. Elsewhere there is no such safety net (logged at debug).
    """
    if not sys.platform.startswith("linux"):
        logger.debug("PR_SET_PDEATHSIG is Linux-only; children may outlive this process")
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the hook ran
            os.kill(os.getpid(), sig)

    return hook


_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn_thread() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that lives as long as the process, to fork children that must die with it.

    The kernel's "parent death" is the exit of the *thread* that forked the child: a child started
    from a short-lived worker thread (`asyncio.to_thread`) would be signalled when that thread ends.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="cornserve-spawn"
            )
        return _spawner


def spawn_group(
    command: Sequence[str],
    *,
    log_path: Path | None,
    die_with_parent: bool,
    env: dict[str, str] | None = None,
    death_signal: signal.Signals = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start `command` as the leader of a new session (so of a new process group).

    stdout and stderr are appended to `log_path` (inherited when None). With `die_with_parent`, the
    child gets `death_signal` when this process dies (Linux); a child meant to survive a restart of
    its parent (a task manager, adopted by the next resource manager) passes False.
    """
    stdout: int | None = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        stdout = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=None if stdout is None else subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent_hook(death_signal) if die_with_parent else None,
        )

    try:
        if die_with_parent and threading.current_thread() is not threading.main_thread():
            return _spawn_thread().submit(popen).result(timeout=SPAWN_TIMEOUT_S)
        return popen()
    finally:
        if stdout is not None:
            os.close(stdout)


class ProcessGroup:
    """A child process that leads its own process group: started here, or adopted by pid.

    An adopted group (started by an earlier incarnation of this service) is known only by its pid;
    its exit code is unknown (-1) once it is gone.
    """

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None, log_path: Path | None = None):
        self._pid = pid
        self._popen = popen
        self.log_path = log_path

    @classmethod
    def spawn(
        cls,
        command: Sequence[str],
        *,
        log_path: Path | None,
        die_with_parent: bool,
        env: dict[str, str] | None = None,
    ) -> Self:
        """Start `command` in a new process group (see `spawn_group`)."""
        popen = spawn_group(command, log_path=log_path, die_with_parent=die_with_parent, env=env)
        return cls(popen.pid, popen, log_path)

    @classmethod
    def adopt(cls, pid: int, log_path: Path | None = None) -> Self:
        """A group leader this process did not start (it cannot be reaped or its exit code read)."""
        return cls(pid, None, log_path)

    @property
    def pid(self) -> int:
        """The leader's pid, which is also the process group id."""
        return self._pid

    def exit_code(self) -> int | None:
        """None while the leader runs; its exit code (-1 when unknown, for adopted ones) once gone."""
        if self._popen is not None:
            return self._popen.poll()
        return None if pid_alive(self._pid) else -1

    def alive(self) -> bool:
        """Whether the leader still runs."""
        return self.exit_code() is None

    def gone(self) -> bool:
        """Whether the leader has exited and no other process of its group is left."""
        return not self.alive() and not group_members(self._pid)

    def signal(self, sig: int) -> bool:
        """Send `sig` to the whole group; False when there is no group any more."""
        return signal_group(self._pid, sig)

    def log_tail(self, max_chars: int = 2000, max_lines: int | None = None) -> str:
        """The end of its log, for error messages ("" when it logs elsewhere)."""
        return "" if self.log_path is None else log_tail(self.log_path, max_chars, max_lines)

    def wait(self, timeout_s: float) -> int | None:
        """Wait up to `timeout_s` for the leader to exit; its exit code, None if it still runs."""
        wait_for(lambda: not self.alive(), timeout_s)
        return self.exit_code()

    async def wait_async(self, timeout_s: float) -> int | None:
        """`wait` for event loops."""
        await wait_for_async(lambda: not self.alive(), timeout_s)
        return self.exit_code()

    def kill_group(self) -> bool:
        """SIGKILL the whole group and wait (up to `KILL_WAIT_S`) until it is gone; whether it is.

        Also sweeps helpers an already-exited leader left in the group.
        """
        self.signal(signal.SIGKILL)
        if wait_for(self.gone, KILL_WAIT_S):
            return True
        self._log_survivors()
        return False

    def stop(self, grace_s: float) -> int | None:
        """SIGTERM the group, SIGKILL it after `grace_s`; the leader's exit code (None if it never exited)."""
        if self.alive():
            self.signal(signal.SIGTERM)
            if self.wait(grace_s) is None:
                logger.warning("pid %d ignored SIGTERM for %.1fs; sending SIGKILL", self._pid, grace_s)
        self.kill_group()
        return self.exit_code()

    async def stop_async(self, grace_s: float) -> int | None:
        """`stop` for event loops (never blocks the loop)."""
        if self.alive():
            self.signal(signal.SIGTERM)
            if await self.wait_async(grace_s) is None:
                logger.warning("pid %d ignored SIGTERM for %.1fs; sending SIGKILL", self._pid, grace_s)
        self.signal(signal.SIGKILL)
        if not await wait_for_async(self.gone, KILL_WAIT_S):
            self._log_survivors()
        return self.exit_code()

    def _log_survivors(self) -> None:
        """Only a process stuck in the kernel (a hung device driver) survives SIGKILL; say which."""
        members = group_members(self._pid)
        logger.error("process group %d survived SIGKILL for %.0fs: pids %s", self._pid, KILL_WAIT_S, members)
