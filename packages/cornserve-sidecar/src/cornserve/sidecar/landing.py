"""Where chunks from other nodes land: the callbacks the TCP receiver calls for each transfer.

The receiver asks for room (allocated in our arena, waiting under pressure like any allocation),
streams the bytes straight into it, then hands the chunk over: from then on it is a mailbox slot
whose bytes this server owns, exactly like a same-node delivery.
"""

from __future__ import annotations

from dataclasses import dataclass

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import ChunkAnnouncement, DeliverRequest, Location, TcpHeader
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.inbox import Inbox
from cornserve.sidecar.tcp import Refusal


@dataclass
class TcpLanding:
    """Allocate, land and abandon callbacks of :class:`~cornserve.sidecar.tcp.TcpReceiver`."""

    me: ServerIdentity
    memory: ArenaMemory
    inbox: Inbox

    async def allocate(self, header: TcpHeader) -> tuple[int, memoryview]:
        """Room for the header's payload, as (offset, view into our arena)."""
        if header.dst_rank != self.me.rank:
            raise Refusal("bad_request", f"this is rank {self.me.rank}, not {header.dst_rank}")
        if header.meta.nbytes > header.size:
            raise Refusal(
                "bad_request", f"meta.nbytes {header.meta.nbytes} exceeds the chunk size {header.size}"
            )
        try:
            offset = await self.memory.allocate(header.size, header.timeout)
        except ServiceFault as f:
            raise Refusal(f.error, f.message) from None
        return offset, self.memory.arena.view[offset : offset + header.size]

    async def land(self, header: TcpHeader, offset: int) -> None:
        """Bytes from another node are in our arena: hold them as a local slot.

        A consumer reads ``meta.nbytes`` from ``offset``: more than the block would read the
        neighbouring transfer's bytes, so the sizes are checked against the block itself.
        """
        block = self.memory.alloc.size_of(offset)
        if header.size > block or header.meta.nbytes > header.size:
            raise Refusal(
                "bad_request",
                f"chunk of {header.size} bytes (meta.nbytes {header.meta.nbytes}) does not fit its block of {block}",
            )
        loc = Location(
            arena=self.memory.arena.name,
            offset=offset,
            size=header.size,
            meta=header.meta,
            node=self.me.node,
            rank=header.source_rank,
        )
        announced = header.model_dump(include=set(ChunkAnnouncement.model_fields))
        deliver = DeliverRequest(**announced, location=loc)
        try:
            self.inbox.accept(deliver, owned_offset=offset)
        except ServiceFault as f:
            raise Refusal(f.error, f.message) from None

    def abandon(self, offset: int) -> None:
        """The transfer failed after allocating: give the room back."""
        self.memory.free(offset)
