"""The NATS of `cornserve up`: one server (the default), or N routed servers with clustered JetStream.

Why a cluster on one machine: it is how NATS is meant to run (three servers, every KV bucket with
three replicas), and it keeps serving while one server is down: clients hold the whole server list
and move to a live server, and a replicated bucket keeps its quorum with two of three. Each server
has its own client port, route port, store directory (`<state dir>/nats/<name>`) and log
(`<state dir>/logs/<name>.log`), and the same authentication config (`cornserve.cli.natsauth`).

With one server nothing changes from a lone `NatsServerProcess`: no cluster flags, the store in
`<state dir>/nats`, the log in `logs/nats.log`, the name "nats".
"""

from __future__ import annotations

from pathlib import Path

from cornserve.cli.natsserver import SYNC_DEFAULT, ClusterRole, NatsServerError, NatsServerProcess
from cornserve.runtime.process import free_port, free_ports

CLUSTER_NAME = "cornserve"
"""The NATS cluster name of `up`'s servers (JetStream needs one in clustered mode)."""
MAX_SERVERS = 7
"""More servers than this make every KV write slower for no gain on one machine."""


def check_cluster_size(size: int) -> int:
    """`size` if `cornserve up` can run that many NATS servers (1, or an odd 3..7 for a quorum)."""
    if size == 1 or (3 <= size <= MAX_SERVERS and size % 2 == 1):
        return size
    raise ValueError(
        f"--nats-cluster must be 1 or an odd number from 3 to {MAX_SERVERS} (a quorum needs a majority), "
        f"got {size}"
    )


def bucket_replicas(size: int) -> int:
    """Replicas of each KV bucket on a cluster of `size` servers (JetStream allows at most 5)."""
    return min(size, 5)


class NatsCluster:
    """`size` nats-server processes on loopback, routed to each other when more than one.

    `start` starts them all and returns once each accepts connections; the JetStream meta leader is
    elected after that (`cornserve.cli.natsauth.create_buckets` waits for it). A dead server comes
    back by `NatsServerProcess.start` on the same ports and store, and rejoins through its routes.
    """

    def __init__(
        self,
        size: int,
        state_dir: Path,
        config_file: Path | None = None,
        sync_interval: str = SYNC_DEFAULT,
        host: str = "127.0.0.1",
    ) -> None:
        self.size = check_cluster_size(size)
        log_dir = state_dir / "logs"
        if size == 1:
            self.servers = [
                NatsServerProcess(
                    host=host,
                    port=free_port(host),
                    store_dir=state_dir / "nats",
                    log_file=log_dir / "nats.log",
                    config_file=config_file,
                    sync_interval=sync_interval,
                )
            ]
            return
        names = [f"nats-{index}" for index in range(size)]
        ports = free_ports(2 * size, host)  # all at once: separate draws may repeat a port
        route_ports, client_ports = ports[:size], ports[size:]
        routes = tuple(f"nats://{host}:{port}" for port in route_ports)
        self.servers = [
            NatsServerProcess(
                host=host,
                port=client_port,
                store_dir=state_dir / "nats" / name,
                log_file=log_dir / f"{name}.log",
                config_file=config_file,
                sync_interval=sync_interval,
                name=name,
                cluster=ClusterRole(name, CLUSTER_NAME, port, routes),
            )
            for name, port, client_port in zip(names, route_ports, client_ports, strict=True)
        ]

    @property
    def urls(self) -> list[str]:
        """The client URL of every server, the first one first."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """All client URLs comma-separated: what services get as ``CORNSERVE_NATS_URL``."""
        return ",".join(self.urls)

    @property
    def replicas(self) -> int:
        """Replicas of each KV bucket created on this cluster."""
        return bucket_replicas(self.size)

    def server(self, name: str) -> NatsServerProcess:
        """The server called `name` ("nats", or "nats-<i>" in a cluster)."""
        for server in self.servers:
            if server.name == name:
                return server
        known = ", ".join(s.name for s in self.servers)
        raise NatsServerError(f"no NATS server named {name!r} (known: {known})")

    def start(self, timeout: float = 15.0) -> None:
        """Start every server; on a failure stop those already started and raise it."""
        try:
            for server in self.servers:
                server.start(timeout)
        except NatsServerError:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every server (last first); each gets `timeout` for SIGTERM before SIGKILL."""
        for server in reversed(self.servers):
            server.stop(timeout)
