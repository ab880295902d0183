"""The other sidecar servers as this server sees them: their info, their restarts, requests to them.

Peer info (node, TCP address) is cached per rank and dropped when the peer stops answering or
announces a new instance; every request to a peer has a bounded timeout, so an unreachable rank
fails a send fast with a typed ``unreachable`` error naming it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel, ValidationError

from cornserve.bus.micro import NoResponders, RequestTimeout, ServiceErrorReply, ServiceFault, request
from cornserve.bus.sidecar import InfoReply, InfoRequest, SidecarAck, UpEvent
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar.after_start import AfterStart
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger("cornserve.sidecar.server")

R = TypeVar("R", bound=BaseModel)

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
    _info: dict[int, InfoReply] = field(init=False, default_factory=dict)

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
        """Ask peer ``rank`` by ``deadline``; failures become typed faults for our own caller."""
        timeout = max(0.001, min(PEER_TIMEOUT_S, deadline - time.monotonic()))
        try:
            return await request(self.nc, sidecar_subject(rank, verb), msg, reply, timeout)
        except (NoResponders, RequestTimeout) as exc:
            self._info.pop(rank, None)  # it may come back elsewhere: ask again next time
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

    def tell(self, rank: int, verb: SidecarVerb, msg: BaseModel, what: str) -> None:
        """Send ``msg`` to peer ``rank`` in the background; a failure is only logged.

        For messages whose loss is harmless: a gone or restarted peer lost the memory they are
        about anyway, and the TTL reclaims whatever a lost message leaves behind.
        """
        self.background.spawn(self._tell(rank, verb, msg, what))

    async def _tell(self, rank: int, verb: SidecarVerb, msg: BaseModel, what: str) -> None:
        try:
            await request(self.nc, sidecar_subject(rank, verb), msg, SidecarAck, PEER_TIMEOUT_S)
        except (NoResponders, RequestTimeout, ServiceErrorReply) as exc:
            logger.warning("%s to rank %d failed: %s", what, rank, exc)

    async def on_up(self, msg: Msg) -> None:
        """Handle a server announcing its start; a new instance of a known rank is a restart."""
        try:
            event = UpEvent.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.warning("malformed up event: %s", exc)
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
        if old is not None:
            logger.warning("peer rank %d restarted (%s -> %s)", event.rank, old, event.instance)
        # Even without having seen the old instance's announcement, slots naming another instance of
        # that rank point into an arena that no longer exists.
        self.on_restart(event.rank, event.instance)
