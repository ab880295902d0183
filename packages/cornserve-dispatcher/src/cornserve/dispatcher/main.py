"""`cornserve-dispatcher` (or `python -m cornserve.dispatcher.main`): run one dispatcher replica."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

from nats.aio.client import Client
from pydantic import Field

from cornserve.bus.control import DISPATCHER_SERVICE_NAME
from cornserve.bus.invoke_channel import DEFAULT_MAX_FRAME_BYTES, MIN_MAX_FRAME_BYTES
from cornserve.dispatcher.keepalive import ACK_DELAY_S
from cornserve.dispatcher.service import DispatcherService
from cornserve.runtime.service import run_service, running
from cornserve.runtime.settings import ProcessInfo, ServiceSettings

logger = logging.getLogger("cornserve.dispatcher")

DRAIN_MARGIN_S = 15.0
"""Seconds of the stop deadline beyond `--drain-timeout`: failing what is left and closing clients."""


def _default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class DispatcherSettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-dispatcher`."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "dispatcher",
        "cornserve-dispatcher",
        ("Cornserve task dispatcher replica: executes recorded task graphs on executors"),
    )

    replica_id: str = Field(default_factory=_default_replica_id, min_length=1)
    """Name of this replica in `nats micro` metadata and logs (default: host-pid)."""
    route_timeout: float = Field(default=10.0, gt=0)
    """Seconds a task manager has to pick an executor for one invocation."""
    state_timeout: float = Field(default=3.0, gt=0)
    """Seconds the resource manager has to answer one state query."""
    resync_interval: float = Field(default=30.0, gt=0)
    """Seconds between full re-syncs of the deployment view with the resource manager."""
    drain_timeout: float = Field(default=30.0, gt=0)
    """On SIGTERM, seconds running graphs and streams get to finish before they are failed."""
    ack_delay: float = Field(default=ACK_DELAY_S, ge=0)
    """Seconds a graph runs before its caller gets the acknowledgement keepalive (0: at once); a graph
    that replies sooner sends its caller no keepalive at all (capped at the caller's keepalive interval)."""
    max_graphs: int = Field(default=1024, ge=1)
    """Graphs this replica runs at once (streams being relayed included); more are answered 429."""
    executor_tables: bool = True
    """Route from the executor tables task managers publish; off: one `route` request per invocation."""
    executor_channels: bool = True
    """Send unary invocations over executors' invocation channels where advertised; off: all over HTTP."""
    channel_max_frame_bytes: int = Field(default=DEFAULT_MAX_FRAME_BYTES, ge=MIN_MAX_FRAME_BYTES)
    """Largest invocation-channel frame sent or read (a bigger call goes over HTTP, a bigger reply breaks the connection)."""

    @property
    def nats_client_name(self) -> str:
        """One NATS client name per replica."""
        return f"{DISPATCHER_SERVICE_NAME}-{self.replica_id}"

    @property
    def stop_deadline_s(self) -> float:
        """The drain, then a margin to fail what is left."""
        return self.drain_timeout + DRAIN_MARGIN_S


def serve(settings: DispatcherSettings, nc: Client) -> AbstractAsyncContextManager[None]:
    """One replica, running while the context is open; leaving it drains running graphs."""
    return running(
        DispatcherService(
            nc,
            settings.replica_id,
            route_timeout_s=settings.route_timeout,
            state_timeout_s=settings.state_timeout,
            resync_interval_s=settings.resync_interval,
            drain_timeout_s=settings.drain_timeout,
            ack_delay_s=settings.ack_delay,
            max_graphs=settings.max_graphs,
            executor_tables=settings.executor_tables,
            executor_channels=settings.executor_channels,
            channel_max_frame_bytes=settings.channel_max_frame_bytes,
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `cornserve-dispatcher` console script."""
    sys.exit(run_service(DispatcherSettings, serve, argv=argv))


if __name__ == "__main__":
    main()
