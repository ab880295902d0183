"""The server's arena memory: reserving bytes, freeing them, and reservations not sent yet.

Waiting for memory never blocks other requests: an allocation that does not fit waits on an event
that every free replaces, up to its own deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import AllocReply, AllocRequest, FreeRequest, SidecarAck
from cornserve.sidecar.after_start import AfterStart
from cornserve.sidecar.allocator import Allocator, OutOfMemory, aligned
from cornserve.sidecar.arena import Arena
from cornserve.sidecar.identity import ServerIdentity


class ArenaMemory:
    """Allocator plus the shared-memory arena it manages (the arena exists after :meth:`open`)."""

    def __init__(self, me: ServerIdentity, arena_bytes: int) -> None:
        self._me = me
        self.size = aligned(arena_bytes)
        self.alloc = Allocator(self.size)
        self._arena = AfterStart[Arena]("arena")
        self.unsent: dict[int, float] = {}
        """Offsets handed to clients by ``alloc`` and not yet sent or freed, with when."""
        self.spares: dict[int, int] = {}
        """The unsent offsets that clients reserved ahead (``AllocRequest.spare``), with their block sizes."""
        self._freed = asyncio.Event()

    def open(self, arena: Arena) -> None:
        """Adopt the arena created at start."""
        self._arena.set(arena)

    @property
    def arena(self) -> Arena:
        """The arena (after start)."""
        return self._arena.get()

    @property
    def is_open(self) -> bool:
        """Whether an arena was adopted (it must be closed at stop)."""
        return self._arena.ready

    def free(self, offset: int) -> None:
        """Return a block and wake every allocation waiting for room."""
        self.alloc.free(offset)
        self._freed.set()
        self._freed = asyncio.Event()

    async def allocate(self, size: int, timeout: float) -> int:
        """Reserve arena bytes, waiting for frees up to ``timeout``; never blocks other requests."""
        if aligned(size) > self.alloc.capacity:
            raise ServiceFault(
                413,
                "too_large",
                f"{size} bytes can never fit arena of {self.alloc.capacity} bytes",
                size=size,
            )
        deadline = time.monotonic() + timeout
        while True:
            freed = self._freed
            offset = self._try_alloc(size)
            if offset is not None:
                return offset
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._no_room(size, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), remaining)

    def _try_alloc(self, size: int) -> int | None:
        try:
            return self.alloc.alloc(size)
        except OutOfMemory:
            return None

    def _no_room(self, size: int, timeout: float) -> ServiceFault:
        return ServiceFault(
            503,
            "memory_pressure",
            f"rank {self._me.rank}: no room for {size} bytes within {timeout:.3f}s "
            f"(used {self.alloc.used_bytes}/{self.alloc.capacity}, largest free {self.alloc.largest_free_block})",
            size=size,
            rank=self._me.rank,
        )

    def take_unsent(self, offset: int) -> None:
        """A reservation is being sent: it is no longer the client's to free."""
        del self.unsent[offset]
        self.spares.pop(offset, None)

    def discard_unsent(self, offset: int) -> None:
        """Forget a reservation and free its bytes."""
        del self.unsent[offset]
        self.spares.pop(offset, None)
        self.free(offset)

    @property
    def spare_bytes(self) -> int:
        """Bytes of the spare reservations held now (a handful per client)."""
        return sum(self.spares.values())

    async def on_alloc(self, req: AllocRequest) -> AllocReply:
        """Reserve space a producer will write into (copy-in or ``Sidecar.alloc_tensor``)."""
        offset = await self.allocate(req.size, req.timeout)
        self.unsent[offset] = time.monotonic()
        if req.spare:
            self.spares[offset] = self.alloc.size_of(offset)
        return AllocReply(
            request_id=req.request_id,
            instance=self._me.instance,
            arena=self.arena.name,
            offset=offset,
            size=req.size,
        )

    async def on_free(self, req: FreeRequest) -> SidecarAck:
        """Return an allocation that will not be sent."""
        self._me.check_instance(req.instance, "allocation")
        if req.offset not in self.unsent:
            raise ServiceFault(404, "not_found", f"no unsent allocation at offset {req.offset}")
        self.discard_unsent(req.offset)
        return self._me.ack(req.request_id)
