"""A real service process for tests: its output captured in a log file, stopped with a deadline.

Every test that starts a service (sidecar, executor, dispatcher, task or resource manager) starts
it through `ServiceProcess.start`, so each one has a log to show when it fails and none outlives
its test: `stop` sends SIGTERM and, past the deadline, kills it and fails loudly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cornserve.runtime.process import pid_alive

STOP_DEADLINE_S = 30.0


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args...` with the test's interpreter."""
    return [sys.executable, "-m", module, *args]


def console_script(name: str) -> str:
    """Path of an installed console script of the test's virtual environment (e.g. cornserve-sidecar)."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"console script missing at {path}; run uv sync"
    return str(path)


@dataclass
class ServiceProcess:
    """One child process started by a test, with stdout and stderr in `log_path`."""

    name: str
    cmd: list[str]
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes]

    @classmethod
    def start(
        cls, name: str, cmd: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        """Spawn `cmd` (environment: the test's plus `env`); output appends to `<log_dir>/<name>.log`."""
        extra = dict(env or {})
        log_path = log_dir / f"{name}.log"
        return cls(name, cmd, log_path, extra, _spawn(cmd, log_path, extra))

    def restart(self) -> None:
        """Start the same command again (after `kill` or `stop`); the log keeps growing."""
        assert not self.running, f"{self.name} is still running"
        self.proc = _spawn(self.cmd, self.log_path, self.env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_exit(self, timeout: float = STOP_DEADLINE_S) -> int:
        """Its exit code; past `timeout` it is killed and the wait fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s; killed:\n{self.log()}"
            ) from None

    def stop(self, timeout: float = STOP_DEADLINE_S) -> int:
        """SIGTERM, then its exit code; one that ignores SIGTERM past `timeout` is killed and fails."""
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL and reap (a crash, as far as the rest of the cluster can tell)."""
        self.proc.kill()
        self.proc.wait()

    def assert_clean_exit(self, *, stopped_line: str | None = "stopped") -> None:
        """Exit code 0, no traceback in the log, and (when given) the line a service logs last."""
        log = self.log()
        assert self.proc.returncode == 0, f"{self.name} exited with {self.proc.returncode}:\n{log}"
        assert "Traceback" not in log, f"{self.name} logged a traceback:\n{log}"
        if stopped_line is not None:
            assert stopped_line in log, f"{self.name} never logged {stopped_line!r}:\n{log}"


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **env}
        )


def pids_matching(*needles: str) -> list[int]:
    """Live processes (not this one) whose command line contains every needle, found through /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline and all(n in cmdline for n in needles) and pid_alive(int(entry)):
            found.append(int(entry))
    return found
