"""The sidecar server: one process per device, owning a shared-memory arena.

It answers its clients (alloc, send, recv, done, close, stats, info), talks to peer servers over
NATS for control (deliver, release, notice) and over TCP for cross-node bytes, and reclaims memory
nobody claims within the TTL. Every request runs in its own task with a deadline, so a waiting
receive or a sender blocked on memory never stalls anything else.

:class:`SidecarServer` only composes the parts and runs their lifecycle; each concept is its own
module: ``allocation`` (arena memory), ``holdings`` (bytes held for destinations), ``outbox``
(send/deliver), ``inbox`` (mailbox endpoints), ``peers``, ``landing`` (TCP arrivals) and ``reaper``
(TTL). The server imports neither torch nor numpy.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, ClassVar

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.service import Service
from pydantic import BaseModel, Field, model_validator

from cornserve.bus.micro import (
    HandlerRunner,
    NoResponders,
    RequestTimeout,
    request,
)
from cornserve.bus.sidecar import (
    AllocRequest,
    ArenaUsage,
    CloseStreamRequest,
    DeliverRequest,
    DoneRequest,
    DropRequest,
    FreeRequest,
    InfoReply,
    InfoRequest,
    NoticeRequest,
    RecvRequest,
    ReleaseChunkRequest,
    SendRequest,
    StatsReply,
    StatsRequest,
    UpEvent,
)
from cornserve.bus.subjects import (
    SIDECAR_SERVICE_NAME,
    SIDECAR_UP_EVENT,
    SidecarVerb,
    sidecar_subject,
)
from cornserve.runtime.metrics import read_on_loop
from cornserve.runtime.nats import NatsAuthError, connect_nats
from cornserve.runtime.natscreds import NatsCredentialsError
from cornserve.runtime.natsstop import current_budget, nats_step
from cornserve.runtime.secrets import SecretFileError
from cornserve.runtime.service import run_process, running
from cornserve.runtime.settings import Flag, ProcessInfo, ServiceSettings
from cornserve.sidecar import __version__
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.arena import Arena, arena_name
from cornserve.sidecar.dropping import DroppedIds, Dropper
from cornserve.sidecar.holdings import Holdings
from cornserve.sidecar.identity import LossCounters, ServerIdentity
from cornserve.sidecar.inbox import Inbox
from cornserve.sidecar.landing import TcpLanding
from cornserve.sidecar.localserver import LocalEndpoint, Route
from cornserve.sidecar.localsocket import create_socket_dir, remove_socket_dir, remove_stale_sockets
from cornserve.sidecar.metrics import watch_arena
from cornserve.sidecar.outbox import Outbox
from cornserve.sidecar.ownership import OwnedDir
from cornserve.sidecar.peerauth import PeerKey, load_peer_key
from cornserve.sidecar.peers import Peers
from cornserve.sidecar.reaper import Reaper
from cornserve.sidecar.tasks import BackgroundTasks
from cornserve.sidecar.tcp import ReceiverLimits, TcpReceiver

logger = logging.getLogger("cornserve.sidecar.server")

CONNECT_TIMEOUT_S = 30.0
DEFAULT_TCP_MAX_TIMEOUT_S = 120.0


class SidecarServer:
    """One sidecar server instance: its parts, their endpoints, start and stop."""

    def __init__(
        self,
        rank: int,
        node: str,
        nats_url: str,
        arena_bytes: int,
        ttl_s: float,
        tcp_host: str,
        tcp_port: int = 0,
        prefault: bool = False,
        nats_creds: Path | None = None,
        peer_secret_file: Path | None = None,
        tcp_max_timeout_s: float = DEFAULT_TCP_MAX_TIMEOUT_S,
        advertise_host: str | None = None,
    ) -> None:
        self.me = ServerIdentity(
            rank=rank,
            node=node,
            ttl_s=ttl_s,
            tcp_host=tcp_host,
            tcp_port=tcp_port,
            prefault=prefault,
            advertise_host=advertise_host,
        )
        self.rank = rank
        self.nats_url = nats_url
        self.nats_creds = nats_creds
        self.peer_secret_file = peer_secret_file
        self.tcp_max_timeout_s = tcp_max_timeout_s
        self.counters = LossCounters()
        self.background = BackgroundTasks(logger, "background task")
        self.memory = ArenaMemory(self.me, arena_bytes)
        self.peers = Peers(self.me, self._own_info, self.background, self._on_peer_restart)
        self.holdings = Holdings(self.me, self.memory, self.peers, self.background)
        self.dropped = DroppedIds()
        self.inbox = Inbox(self.me, self.memory, self.holdings, self.peers, self.counters, self.dropped)
        self.outbox = Outbox(self.me, self.memory, self.holdings, self.inbox, self.peers)
        self.dropper = Dropper(self.me, self.memory, self.holdings, self.inbox, self.outbox, self.counters)
        self.landing = TcpLanding(self.me, self.memory, self.inbox)
        self.reaper = Reaper(
            self.me,
            self.memory,
            self.holdings,
            self.inbox,
            self.outbox,
            self.peers,
            self.counters,
            self.background,
            self.dropped,
        )
        self._runner = HandlerRunner()
        self._local: LocalEndpoint | None = None
        self._socket_dir: OwnedDir | None = None
        self._nc: Client | None = None
        self._service: Service | None = None
        self._tcp: TcpReceiver | None = None
        self.stopped = asyncio.Event()

    @property
    def instance(self) -> str:
        """Instance id of this process (new at every start)."""
        return self.me.instance

    async def start(self) -> None:
        """Connect, refuse to double-serve a rank, create the arena, register endpoints, announce."""
        # First: a bad secret file is a configuration error to report before touching anything.
        key = load_peer_key(self.peer_secret_file)
        try:
            # Unlimited reconnects keep a running server alive through NATS restarts, but would also
            # retry the first connect forever: bound that one.
            self._nc = await asyncio.wait_for(
                connect_nats(self.nats_url, name=f"cornserve-sidecar-{self.rank}", creds=self.nats_creds),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            raise RuntimeError(f"cannot reach NATS at {self.nats_url} within {CONNECT_TIMEOUT_S}s") from None
        await self._refuse_double_serve(self._nc)
        self.peers.connection.set(self._nc)
        removed = Arena.remove_stale(self.me.node, self.rank) + remove_stale_sockets(self.me.node, self.rank)
        if removed:
            logger.warning("removed arenas of crashed instances: %s", removed)
        arena = Arena(arena_name(self.me.node, self.rank, self.instance), self.memory.size)
        self.memory.open(arena)
        watch_arena(read_on_loop(self.stats))
        if self.me.prefault:
            arena.prefault()
        if key is None:
            # Same-node transfers need no secret; cross-node ones are refused with a typed error.
            logger.warning(
                "no peer secret configured (--peer-secret-file / CORNSERVE_SIDECAR_PEER_SECRET_FILE): "
                "cross-node transfers to and from rank %d are disabled; same-node transfers work",
                self.rank,
            )
        else:
            self.outbox.peer_key = key
            self.peers.peer_key = key
            self._tcp = TcpReceiver(
                self.me.tcp_host,
                self.me.tcp_port,
                key,
                ReceiverLimits(rank=self.rank, max_timeout=self.tcp_max_timeout_s),
                self.landing.allocate,
                self.landing.land,
                self.landing.abandon,
            )
            self.me.tcp_port = self._tcp.start()
        await self._start_local(key)
        await self._nc.subscribe(SIDECAR_UP_EVENT, cb=self.peers.on_up)
        self._service = await self._register(self._nc)
        self.background.spawn(self.reaper.run_forever())
        up = UpEvent(rank=self.rank, node=self.me.node, instance=self.instance)
        await self._nc.publish(SIDECAR_UP_EVENT, up.model_dump_json().encode())
        await self._nc.flush()
        logger.info(
            "sidecar rank=%d node=%s instance=%s arena=%s (%d bytes) tcp=%s:%d (advertised as %s) ready",
            self.rank,
            self.me.node,
            self.instance,
            arena.name,
            self.memory.size,
            self.me.tcp_host,
            self.me.tcp_port,
            self.me.reachable_host,
        )

    async def _refuse_double_serve(self, nc: Client) -> None:
        """Fail the start if another live instance already answers for this rank."""
        try:
            other = await request(
                nc, sidecar_subject(self.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0
            )
        except (NoResponders, RequestTimeout):
            return  # nobody serves this rank: good
        raise RuntimeError(f"rank {self.rank} is already served by instance {other.instance} on {other.node}")

    def _routes(self) -> list[tuple[SidecarVerb, type[BaseModel], Callable[..., Awaitable[BaseModel]]]]:
        """Every endpoint: the same handlers answer on NATS and on the control socket."""
        return [
            (SidecarVerb.INFO, InfoRequest, self.on_info),
            (SidecarVerb.STATS, StatsRequest, self.on_stats),
            (SidecarVerb.ALLOC, AllocRequest, self.memory.on_alloc),
            (SidecarVerb.FREE, FreeRequest, self.memory.on_free),
            (SidecarVerb.SEND, SendRequest, self.outbox.on_send),
            (SidecarVerb.RECV, RecvRequest, self.inbox.on_recv),
            (SidecarVerb.DONE, DoneRequest, self.inbox.on_done),
            (SidecarVerb.CLOSE, CloseStreamRequest, self.outbox.on_close),
            (SidecarVerb.DELIVER, DeliverRequest, self.inbox.on_deliver),
            (SidecarVerb.RELEASE, ReleaseChunkRequest, self.holdings.on_release),
            (SidecarVerb.NOTICE, NoticeRequest, self.inbox.on_notice),
            (SidecarVerb.DROP, DropRequest, self.dropper.on_drop),
        ]

    async def _start_local(self, key: PeerKey | None) -> None:
        """Listen on the same-node control socket: client verbs for all, peer verbs after a hello.

        ``drop`` stays on NATS only (dispatchers call it, from anywhere).
        """
        peer_verbs = {SidecarVerb.DELIVER, SidecarVerb.RELEASE, SidecarVerb.NOTICE}
        routes = {
            verb.value: Route(model, fn, peer_only=verb in peer_verbs)
            for verb, model, fn in self._routes()
            if verb != SidecarVerb.DROP
        }
        endpoint = LocalEndpoint(self.me, self.memory, routes, self.outbox.on_send, key)
        path = create_socket_dir(self.me.node, self.rank, self.instance)
        self._socket_dir = OwnedDir(path.parent)
        try:
            await endpoint.start(path)
        except BaseException:
            remove_socket_dir(path)
            self._socket_dir.release()
            raise
        self._local = endpoint

    async def _register(self, nc: Client) -> Service:
        svc = await add_service(
            nc,
            name=SIDECAR_SERVICE_NAME,
            version=__version__,
            description="Cornserve tensor forwarding sidecar",
            metadata={"rank": str(self.rank), "node": self.me.node, "instance": self.instance},
            stats_handler=lambda _endpoint: self.stats().model_dump(
                include={"arena_bytes", "used_bytes", "allocations", "held_entries", "mailbox_entries"}
            ),
        )
        for verb, model, fn in self._routes():
            await svc.add_endpoint(
                name=verb.value,
                subject=sidecar_subject(self.rank, verb),
                handler=self._runner.wrap(model, fn, f"sidecar.{verb.value}"),
                metadata={"rank": str(self.rank)},
            )
        return svc

    async def stop(self) -> None:
        """Cancel waiting handlers, unlink the arena, then stop serving on NATS.

        Local resources go first and regardless of errors: the arena is unlinked even when NATS is
        gone (a node shutting down), whose clean-up is then bounded and skipped
        (`cornserve.runtime.natsstop`).
        """
        try:
            await self._runner.close()
            if self._local is not None:
                await self._local.close()
            self.peers.close()
            await self.background.close()
            if self._tcp is not None:
                await self._tcp.close()
        finally:
            if self._local is not None and self._local.path is not None:
                remove_socket_dir(self._local.path)
            if self._socket_dir is not None:
                self._socket_dir.release()
            if self.memory.is_open:
                self.memory.arena.close()
            try:
                if self._nc is not None:
                    if self._service is not None:
                        await nats_step("stopping the micro service", self._service.stop)
                    await current_budget(f"sidecar-{self.rank}").close(self._nc)
            finally:
                self.stopped.set()

    def _own_info(self, request_id: str = "") -> InfoReply:
        return InfoReply(
            request_id=request_id,
            rank=self.rank,
            node=self.me.node,
            instance=self.instance,
            version=__version__,
            arena=self.memory.arena.name,
            arena_bytes=self.memory.alloc.capacity,
            tcp_host=self.me.reachable_host,
            tcp_port=self.me.tcp_port,
            ttl_s=self.me.ttl_s,
            prefaulted=self.me.prefault,
            local_socket=str(self._local.path) if self._local is not None and self._local.path else "",
        )

    async def on_info(self, req: InfoRequest) -> InfoReply:
        """Who we are, where our arena and TCP listener are."""
        return self._own_info(req.request_id)

    async def on_stats(self, req: StatsRequest) -> StatsReply:
        """Arena usage and counters (the leak test's ground truth)."""
        return self.stats(req.request_id)

    def stats(self, request_id: str = "") -> StatsReply:
        """Arena usage and counters, now (also what the metrics port reports)."""
        usage = ArenaUsage.model_validate(self.memory.alloc, from_attributes=True)
        spare_bytes, spare_allocs = self.memory.spare_bytes, self.memory.spare_count
        counted = {  # clients' spare reservations are reported apart (`cornserve.sidecar.spares`)
            "used_bytes": usage.used_bytes - spare_bytes,
            "allocations": usage.allocations - spare_allocs,
            "spare_bytes": spare_bytes,
        }
        return StatsReply(
            **(usage.model_dump() | counted),
            spare_allocs=spare_allocs,
            **asdict(self.counters),
            request_id=request_id,
            rank=self.rank,
            instance=self.instance,
            held_entries=len(self.holdings.held),
            mailbox_entries=self.inbox.mailbox.slot_count(),
            pending_allocs=len(self.memory.unsent) - spare_allocs,
            known_peers={str(r): i for r, i in self.peers.instances.items()},
            sent_by_path=dict(self.outbox.sent_by_path),
            socket_requests=self._local.requests if self._local is not None else 0,
        )

    def _on_peer_restart(self, rank: int, new_instance: str) -> None:
        """A peer rank came back as a new instance: settle both directions of what we had with it."""
        # As destination: chunks whose bytes lived in the restarted server's arena are gone.
        self.inbox.forget_source(rank, new_instance)
        # As source: the restarted destination forgot what we announced; tell its new instance.
        told = self.holdings.forget_destination(rank)
        if told:
            note = NoticeRequest(
                kind="lost",
                keys=told,
                source_rank=self.rank,
                reason=f"sidecar rank {rank} restarted before delivery",
            )
            self.peers.tell(rank, SidecarVerb.NOTICE, note, f"notice {note.kind}")

    def reap(self) -> int:
        """Run one TTL sweep now (the reaper also runs them periodically); returns failed sweeps."""
        return self.reaper.reap()


class SidecarSettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-sidecar`."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "sidecar", "cornserve-sidecar", "Cornserve tensor forwarding sidecar server"
    )

    rank: int = Field(ge=0)
    """Global sidecar rank (one per device)."""
    node: str = Field(min_length=1)
    """Node id; same node = shared memory, else TCP."""
    arena_bytes: int = Field(default=1 << 30, gt=0)
    """Shared-memory arena size (default 1 GiB)."""
    ttl_seconds: float = Field(default=300.0, gt=0)
    """Free data nobody claims after this long."""
    tcp_host: str = "127.0.0.1"
    """Address to bind for cross-node transfers (and to advertise, unless --advertise-host is given)."""
    advertise_host: str | None = Field(default=None, min_length=1)
    """Address peers on other nodes connect to (this node's routable address; needed with --tcp-host 0.0.0.0)."""
    tcp_port: int = Field(default=0, ge=0, lt=65536)
    """TCP port for cross-node transfers (0 = any)."""
    prefault: bool = False
    """Touch every arena page at start: commits the memory, avoids first-touch page faults on sends."""
    sidecar_peer_secret_file: Annotated[Path | None, Flag(name="--peer-secret-file")] = None
    """Secret file (mode 0600) shared by every sidecar of the cluster; without it, no cross-node transfers."""
    tcp_max_timeout_s: Annotated[float, Flag(name="--tcp-max-timeout")] = Field(
        default=DEFAULT_TCP_MAX_TIMEOUT_S, gt=0, allow_inf_nan=False
    )
    """Longest a peer's transfer may hold memory here waiting for its bytes (caps its own timeout)."""

    @model_validator(mode="after")
    def _routable(self) -> SidecarSettings:
        if self.advertise_host is None and self.tcp_host in ("0.0.0.0", "::", ""):
            raise ValueError(
                f"--tcp-host {self.tcp_host!r} binds every address but is no address peers can connect "
                "to: give --advertise-host (this node's routable address)"
            )
        return self


SERVER_FIELDS = {
    "rank", "node", "nats_url", "nats_creds", "arena_bytes", "tcp_host", "tcp_port", "prefault",
    "tcp_max_timeout_s", "advertise_host",
}  # fmt: skip
"""Settings that `SidecarServer` takes under the same name."""


def serve(settings: SidecarSettings) -> AbstractAsyncContextManager[None]:
    """One rank, served while the context is open (the server holds its own NATS connection)."""
    return running(
        SidecarServer(
            ttl_s=settings.ttl_seconds,
            peer_secret_file=settings.sidecar_peer_secret_file,
            **settings.model_dump(include=SERVER_FIELDS),
        )
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cornserve-sidecar`` console script."""
    sys.exit(
        run_process(
            SidecarSettings,
            serve,
            argv=argv,
            expected_errors=(NatsAuthError, NatsCredentialsError, SecretFileError),
        )
    )


if __name__ == "__main__":
    main()
