"""Holding the gateway's port for the life of a local cluster, so none of its own processes takes it.

`cornserve up --port N` starts many processes before its gateway binds `N`: NATS servers on ports
from `free_port()`, sidecars whose TCP listeners bind port 0, metrics ports, and later executors.
When `N` lies in the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), any of
those port-0 binds (and outgoing connections) may be handed `N` first, and the gateway then fails
with "address already in use" (seen once in CI with `--nats-cluster 3`).

`PortReservation` binds `N` before anything starts, with ``SO_REUSEADDR`` and without listening,
and keeps the socket open until the cluster stops. On Linux:

- a bind to port 0 (and the port choice of `connect`) skips a port that has a socket bound on the
  same address, so no child is handed `N` (the kernel would only share it once every other port of
  the range is in use);
- an explicit bind of `N` with ``SO_REUSEADDR`` succeeds while no socket *listens* on it, so the
  gateway (asyncio and uvloop set ``SO_REUSEADDR`` on a server socket; the gateway also asks for
  it) binds and listens as before, also after a restart by the supervisor;
- the reservation itself fails when something already listens on `N`, so `up` refuses at once,
  before starting anything, with a message naming the port.

Handing a listening socket to the gateway would also work, but the process spawner closes every
inherited descriptor; drawing the cluster's internal ports from below the ephemeral range would not
stop the children's port-0 binds, and would take ports other software expects to bind.
"""

from __future__ import annotations

import errno
import socket
from types import TracebackType


class PortInUse(RuntimeError):
    """The port cannot be reserved: something listens on it already (or it may not be bound at all)."""


class PortReservation:
    """A bound, never listening ``SO_REUSEADDR`` socket on each address of ``host:port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._sockets: list[socket.socket] = []
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise PortInUse(f"cannot resolve {host!r} to reserve port {port}: {exc}") from None
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:  # as asyncio's server does: v6 only, v4 has its own
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EADDRNOTAVAIL:
                    continue  # the family is not enabled here: asyncio's server skips it too
                self.close()
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"port {port} on {host} is in use; stop what listens there or pass another --port"
                    ) from None
                raise PortInUse(f"port {port} on {host} cannot be bound: {exc.strerror or exc}") from None
            self._sockets.append(sock)

    def close(self) -> None:
        """Let the port go (the cluster stopped)."""
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
