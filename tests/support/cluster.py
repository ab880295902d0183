"""The one cluster builder of the tests: real processes on loopback, all stopped when it closes.

A test directory asks for the parts it tests and nothing else:

    with ProcessCluster(log_dir, nats_url, EXECUTOR_RANKS) as cluster:
        sidecars = cluster.start_sidecars(4)                     # real sidecar servers, ready
        svc = cluster.start_service("matmul-0", cmd, env)        # any service process, logged
        wait_healthy(url, process=svc)

or the whole stack as `cornserve up` runs it (own NATS, sidecars per CPU slot, resource manager,
dispatchers, gateway):

    with ProcessCluster(log_dir) as cluster:
        local = cluster.start_local(state_dir, cpu_slots=4, dispatchers=2)

Closing stops every service (SIGTERM with a deadline), then the sidecars, then the local cluster;
after a clean run it also checks that nothing of a local cluster survived (processes, shared memory).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import aiohttp
from tests.support.processes import ServiceProcess
from tests.support.sidecars import MiB, RankRange, SidecarProcess, start_sidecars

from cornserve.cli.launcher import TASK_MANAGER_DIR, LocalCluster
from cornserve.runtime.detached import DetachedGroups
from cornserve.runtime.process import free_port, pid_alive, wait_for

LOCAL_READY_DEADLINE_S = 180.0


class ProcessCluster:
    """Sidecars, services and/or a whole local cluster started for a test, and stopped together."""

    def __init__(self, log_dir: Path, nats_url: str | None = None, ranks: RankRange | None = None) -> None:
        self.log_dir = log_dir
        self._nats_url = nats_url
        self._ranks = ranks
        self.sidecars: list[SidecarProcess] = []
        self.services: list[ServiceProcess] = []
        self.local: LocalCluster | None = None

    @property
    def nats_url(self) -> str:
        if self.local is not None:
            return self.local.nats_url
        assert self._nats_url is not None, "this cluster was built without a nats-server"
        return self._nats_url

    def new_rank(self) -> int:
        assert self._ranks is not None, "this cluster was built without a rank range"
        return self._ranks.next()

    def start_sidecars(
        self,
        count: int,
        *,
        nodes: list[str] | None = None,
        arena_bytes: int = 64 * MiB,
        ttl_s: float | None = None,
    ) -> list[SidecarProcess]:
        """`count` sidecar servers on fresh ranks, started together; returns once all answer INFO."""
        ranks = [self.new_rank() for _ in range(count)]
        started = asyncio.run(
            start_sidecars(
                ranks, self.nats_url, self.log_dir, nodes=nodes, arena_bytes=arena_bytes, ttl_s=ttl_s
            )
        )
        self.sidecars += started
        return started

    def start_service(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> ServiceProcess:
        """Spawn one service process (log: `<log_dir>/<name>.log`); wait for it with tests.support.waiting."""
        service = ServiceProcess.start(name, cmd, self.log_dir, env)
        self.services.append(service)
        return service

    def start_local(
        self,
        state_dir: Path,
        *,
        cpu_slots: int = 4,
        dispatchers: int = 2,
        tls: tuple[Path, Path] | None = None,
        nats_cluster: int = 1,
    ) -> LocalCluster:
        """The whole stack as `cornserve up --cpu-slots N` runs it, on a free gateway port; returns when ready.

        `tls` is (certificate, key) for an HTTPS gateway; `nats_cluster` is `up --nats-cluster N`. The admin token is generated into the state
        dir, as `up` does; `gateway_session` sends it.
        """
        assert self.local is None, "one local cluster per ProcessCluster"
        self.local = LocalCluster(
            state_dir=state_dir,
            port=free_port(),
            cpu_slots=cpu_slots,
            dispatchers=dispatchers,
            say=lambda *_: None,
            tls_cert=tls[0] if tls else None,
            tls_key=tls[1] if tls else None,
            nats_cluster=nats_cluster,
        )
        self.local.start(ready_timeout_s=LOCAL_READY_DEADLINE_S)
        return self.local

    def assert_sidecars_clean(self) -> None:
        """No sidecar logged a traceback."""
        for s in self.sidecars:
            log = s.log()
            assert "Traceback" not in log, f"sidecar {s.rank} logged a traceback:\n{log}"

    def close(self, *, check_leaks: bool = True) -> None:
        """Stop services (newest first), then sidecars, then the local cluster; raise the first failure."""
        failures: list[AssertionError] = []
        for proc in [*reversed(self.services), *(s.service for s in self.sidecars)]:
            try:
                proc.stop()
            except AssertionError as exc:  # killed past its deadline; stop the rest, then report it
                failures.append(exc)
        if self.local is not None:
            data_plane = data_plane_pids(self.local)  # task managers and executors outlive the RM
            nats = self.local.nats_servers.servers if self.local.nats_servers is not None else []
            nats_pids = [pid for pid in (server.pid for server in nats) if pid is not None]
            self.local.stop()
            if check_leaks:
                assert not any(pid_alive(pid) for pid in nats_pids), "a nats-server outlived the cluster"
            if check_leaks:
                self._assert_local_gone(self.local, data_plane)
        if failures:
            raise failures[0]

    @staticmethod
    def _assert_local_gone(local: LocalCluster, data_plane: list[int]) -> None:
        for child in local.children:
            assert child.proc is not None and not pid_alive(child.proc.pid), (
                f"{child.name} outlived the cluster"
            )
        # Executors get SIGTERM when their task manager dies: give them the moments their exit takes.
        assert wait_for(lambda: not any(pid_alive(p) for p in data_plane), 30), (
            f"task managers or executors outlived the cluster: {[p for p in data_plane if pid_alive(p)]}"
        )
        assert not list(Path("/dev/shm").glob(f"cornserve-sidecar-{local.node}-*"))

    def __enter__(self) -> ProcessCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(check_leaks=exc is None)


def data_plane_pids(local: LocalCluster) -> list[int]:
    """The running task managers of a local cluster (from the resource manager's records) and their children."""
    managers = [r.pid for r in DetachedGroups(local.state_dir / TASK_MANAGER_DIR).records() if r.alive()]
    return [*managers, *children_of(managers)]


def children_of(parents: list[int]) -> list[int]:
    """Live processes whose parent is one of `parents` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[-1].split()[1]) in parents and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@contextmanager
def running_local_cluster(
    root: Path, *, cpu_slots: int = 4, dispatchers: int = 2, tls: tuple[Path, Path] | None = None
) -> Iterator[LocalCluster]:
    """A whole local cluster in `root` for a `with` block; afterwards nothing of it may survive."""
    with ProcessCluster(root) as processes:
        yield processes.start_local(root, cpu_slots=cpu_slots, dispatchers=dispatchers, tls=tls)


def gateway_session(
    local: LocalCluster, timeout_s: float, token: str | None = None, *, anonymous: bool = False
) -> aiohttp.ClientSession:
    """An HTTP session on the local cluster's gateway (`async with` it; relative paths like "/apps").

    It sends `token` as a bearer token, by default the cluster's admin token (none when `anonymous`).
    An HTTPS gateway's certificate is trusted as its own CA.
    """
    chosen = None if anonymous else (token or local.admin_token)
    headers = {"Authorization": f"Bearer {chosen}"} if chosen else {}
    tls = ssl.create_default_context(cafile=str(local.tls_cert)) if local.tls_cert is not None else True
    return aiohttp.ClientSession(
        base_url=local.url,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers=headers,
        connector=aiohttp.TCPConnector(ssl=tls),
    )
