"""The other sidecar servers as this server sees them: their info, their restarts, requests to them.

Peer info (node, TCP address) is cached per rank and dropped when the peer stops answering or
announces a new instance; every request to a peer has a bounded timeout, so an unreachable rank
fails a send fast with a typed ``unreachable`` error naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel

from cornserve.bus.events import parse_event
from cornserve.bus.micro import NoResponders, RequestTimeout, ServiceErrorReply, ServiceFault, request
from cornserve.bus.sidecar import InfoReply, InfoRequest, SidecarAck, UpEvent
from cornserve.bus.sidecar_local import LocalHello
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar.after_start import AfterStart
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.localclient import LocalChannel, LocalUnavailable
from cornserve.sidecar.localsocket import checked_socket_path
from cornserve.sidecar.peerauth import PeerKey
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger("cornserve.sidecar.server")

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")

PEER_TIMEOUT_S = 5.0
"""Upper bound on one control round trip to a peer; keeps 'unreachable' fast."""

Restarted = Callable[[int, str], None]
"""Called with (rank, new instance) when a peer rank came back as a new instance."""


@dataclass
class Peers:
    """Cached info of peer ranks, restart detection, and typed requests to peers."""

    me: ServerIdentity
    own_info: Callable[[], InfoReply]
    background: BackgroundTasks
    on_restart: Restarted
    connection: AfterStart[Client] = field(
        init=False, default_factory=lambda: AfterStart[Client]("NATS connection")
    )
    instances: dict[int, str] = field(init=False, default_factory=dict)
    """The last instance seen per peer rank (reported in stats as ``known_peers``)."""
    peer_key: PeerKey | None = None
    """The cluster's peer secret: with it, same-node peers are asked over their control socket."""
    _info: dict[int, InfoReply] = field(init=False, default_factory=dict)
    _local: dict[int, LocalChannel] = field(init=False, default_factory=dict)
    """Control-socket channels to same-node peers (`localclient`), opened on first use."""

    @property
    def nc(self) -> Client:
        """The NATS connection (after start)."""
        return self.connection.get()

    async def info(self, rank: int, deadline: float) -> InfoReply:
        """Info of a destination rank (cached); raises 'unreachable' naming the rank."""
        if rank == self.me.rank:
            return self.own_info()
        cached = self._info.get(rank)
        if cached is not None:
            return cached
        info = await self.request(rank, SidecarVerb.INFO, InfoRequest(), InfoReply, deadline)
        self._info[rank] = info
        self.instances.setdefault(rank, info.instance)
        return info

    async def request(
        self, rank: int, verb: SidecarVerb, msg: BaseModel, reply: type[R], deadline: float
    ) -> R:
        """Ask peer ``rank`` by ``deadline``; failures become typed faults for our own caller.

        A same-node peer is asked over its control socket when both hold the peer secret (no broker
        hop); if the socket fails, over NATS, which reaches whatever instance serves the rank now.
        """
        return await self._carried(
            rank,
            deadline,
            lambda channel, timeout: channel.call(verb.value, msg, reply, timeout),
            lambda timeout: request(self.nc, sidecar_subject(rank, verb), msg, reply, timeout),
        )

    def tell(self, rank: int, verb: SidecarVerb, msg: BaseModel, what: str) -> None:
        """Send ``msg`` to peer ``rank`` in the background; a failure is only logged.

        For messages whose loss is harmless: a gone or restarted peer lost the memory they are
        about anyway, and the TTL reclaims whatever a lost message leaves behind.
        """
        self.background.spawn(self._tell(rank, verb, msg, what))

    async def _tell(self, rank: int, verb: SidecarVerb, msg: BaseModel, what: str) -> None:
        """Over a same-node peer's control socket without waiting for an answer (`ONE_WAY`), else NATS.

        The peer's info is fetched (once, then cached) even when only told things: a destination
        that never sent to its source would otherwise tell it every release over NATS.
        """

        async def over_nats(timeout: float) -> None:
            await request(self.nc, sidecar_subject(rank, verb), msg, SidecarAck, timeout)

        deadline = time.monotonic() + PEER_TIMEOUT_S
        try:
            await self.info(rank, deadline)
            await self._carried(
                rank, deadline, lambda channel, timeout: channel.tell(verb.value, msg, timeout), over_nats
            )
        except ServiceFault as exc:
            logger.warning("%s to rank %d failed: %s", what, rank, exc)

    async def _carried(
        self,
        rank: int,
        deadline: float,
        over_socket: Callable[[LocalChannel, float], Awaitable[T]],
        over_nats: Callable[[float], Awaitable[T]],
    ) -> T:
        """``over_socket`` on the peer's control socket if there is one, else (or when it fails) ``over_nats``.

        One mapping of both transports' failures to typed faults (the socket reports the bus's own
        types, `localclient`).
        """
        timeout = max(0.001, min(PEER_TIMEOUT_S, deadline - time.monotonic()))
        try:
            channel = self._channel(rank)
            if channel is not None:
                try:
                    return await over_socket(channel, timeout)
                except LocalUnavailable as exc:
                    logger.info("control socket of rank %d failed (%s); using NATS", rank, exc)
                    self._drop_channel(rank)
                timeout = max(0.001, min(PEER_TIMEOUT_S, deadline - time.monotonic()))
            return await over_nats(timeout)
        except (NoResponders, RequestTimeout) as exc:
            self._info.pop(rank, None)  # it may come back elsewhere: ask again next time
            self._drop_channel(rank)
            if isinstance(exc, NoResponders):
                code, why = 502, "is unreachable (no responders)"
            else:
                code, why = 504, f"did not answer within {timeout:.3f}s"
            raise ServiceFault(
                code, "unreachable", f"destination sidecar rank {rank} {why}", rank=rank
            ) from None
        except ServiceErrorReply as exc:
            raise ServiceFault(
                int(exc.code) if exc.code.isdigit() else 500,
                exc.error.error,
                exc.error.message,
                **exc.error.details,
            ) from None

    def _channel(self, rank: int) -> LocalChannel | None:
        """The control-socket channel to a same-node peer, when both sides can use one."""
        found = self._local.get(rank)
        if found is not None:
            return found
        info = self._info.get(rank)
        key = self.peer_key
        if info is None or key is None or info.node != self.me.node:
            return None
        path = checked_socket_path(info.local_socket)
        if path is None:
            return None
        me = self.me.rank

        def hello(challenge: str) -> LocalHello:
            return LocalHello(source_rank=me, dst_rank=rank, mac=key.sender_mac(challenge, me, rank, "local"))

        channel = self._local[rank] = LocalChannel(path, hello)
        return channel

    def _drop_channel(self, rank: int) -> None:
        channel = self._local.pop(rank, None)
        if channel is not None:
            channel.close()

    def close(self) -> None:
        """Close the control-socket channels to peers (at stop)."""
        for rank in list(self._local):
            self._drop_channel(rank)

    async def on_up(self, msg: Msg) -> None:
        """Handle a server announcing its start; a new instance of a known rank is a restart."""
        event = parse_event(UpEvent, msg, logger)
        if event is None:
            return
        if event.rank == self.me.rank:
            if event.instance != self.me.instance:
                logger.error("another instance %s now claims rank %d", event.instance, self.me.rank)
            return
        old = self.instances.get(event.rank)
        if old == event.instance:
            return
        self.instances[event.rank] = event.instance
        self._info.pop(event.rank, None)
        self._drop_channel(event.rank)
        if old is not None:
            logger.warning("peer rank %d restarted (%s -> %s)", event.rank, old, event.instance)
        # Even without having seen the old instance's announcement, slots naming another instance of
        # that rank point into an arena that no longer exists.
        self.on_restart(event.rank, event.instance)
