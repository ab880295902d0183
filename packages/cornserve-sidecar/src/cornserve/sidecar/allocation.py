"""The server's arena memory: reserving bytes, freeing them, and reservations not sent yet.

Waiting for memory never blocks other requests: an allocation that does not fit waits on an event
that every free replaces, up to its own deadline.

A reservation not sent yet is a :class:`Reservation` object, and giving one back goes by that
object, not by its offset: once a reservation is sent, its block can be released by its consumers
and the same offset reserved again by another request before the first holder looks again, and a
holder that freed "whatever is reserved at this offset" would free the new owner's block (a
use-after-free: another request's tensor read). Only the client protocol speaks in offsets (its
``send`` and ``free`` name one); the server's own holders (a ``put``, the reaper) keep the object.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import AllocReply, AllocRequest, FreeRequest, SidecarAck
from cornserve.sidecar.after_start import AfterStart
from cornserve.sidecar.allocator import Allocator, OutOfMemory, aligned
from cornserve.sidecar.arena import Arena
from cornserve.sidecar.identity import ServerIdentity


@dataclass(eq=False)
class Reservation:
    """Arena bytes handed out and not yet sent or freed (compared by identity, see the module)."""

    offset: int
    size: int
    """The block's size (what the allocator counts)."""
    spare: bool = False
    """Reserved ahead by a client for its next send (``AllocRequest.spare``): reported apart."""
    created: float = field(default_factory=time.monotonic)


class ArenaMemory:
    """Allocator plus the shared-memory arena it manages (the arena exists after :meth:`open`)."""

    def __init__(self, me: ServerIdentity, arena_bytes: int) -> None:
        self._me = me
        self.size = aligned(arena_bytes)
        self.alloc = Allocator(self.size)
        self._arena = AfterStart[Arena]("arena")
        self.unsent: dict[int, Reservation] = {}
        """Reservations handed out and not yet sent or freed, by offset."""
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
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that lands
            # in the same loop turn as the free.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await freed.wait()

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

    async def reserve(self, size: int, timeout: float, spare: bool = False) -> Reservation:
        """Allocate (waiting up to ``timeout``) and record the block as not sent yet."""
        offset = await self.allocate(size, timeout)
        reservation = self.unsent[offset] = Reservation(offset, self.alloc.size_of(offset), spare)
        return reservation

    def take_unsent(self, offset: int) -> Reservation:
        """The reservation at ``offset`` is being sent: it is no longer its holder's to give back."""
        return self.unsent.pop(offset)

    def give_back(self, reservation: Reservation) -> bool:
        """Free ``reservation`` if it is still unsent; whether it was (a sent one is not ours to free).

        The entry is forgotten before the bytes are freed, so a free that fails is not retried forever.
        """
        if self.unsent.get(reservation.offset) is not reservation:
            return False
        del self.unsent[reservation.offset]
        self.free(reservation.offset)
        return True

    def discard_unsent(self, offset: int) -> None:
        """Free the unsent reservation at ``offset`` (a client's ``free``, a refused ``send``)."""
        self.give_back(self.unsent[offset])

    @property
    def spare_bytes(self) -> int:
        """Bytes of the spare reservations held now (a handful per client)."""
        return sum(r.size for r in self.unsent.values() if r.spare)

    @property
    def spare_count(self) -> int:
        """Spare reservations held now."""
        return sum(1 for r in self.unsent.values() if r.spare)

    async def on_alloc(self, req: AllocRequest) -> AllocReply:
        """Reserve space a producer will write into (copy-in or ``Sidecar.alloc_tensor``)."""
        reservation = await self.reserve(req.size, req.timeout, req.spare)
        return AllocReply(
            request_id=req.request_id,
            instance=self._me.instance,
            arena=self.arena.name,
            offset=reservation.offset,
            size=req.size,
        )

    async def on_free(self, req: FreeRequest) -> SidecarAck:
        """Return an allocation that will not be sent."""
        self._me.check_instance(req.instance, "allocation")
        if req.offset not in self.unsent:
            raise ServiceFault(404, "not_found", f"no unsent allocation at offset {req.offset}")
        self.discard_unsent(req.offset)
        return self._me.ack(req.request_id)
