"""Destination-side bookkeeping: which chunks arrived for which ids, and who is waiting for them.

A *slot* is one chunk announced to this server. Its bytes live either in the source server's arena
(same node) or in this server's own arena (received over TCP, ``owned_offset`` set). Slots keep a
state so a receive can tell "not yet" from "lost", "expired" or "already consumed".
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from cornserve.bus.sidecar import Location

SlotState = Literal["ready", "done", "lost", "expired", "dropped"]
FINISHED_MEMORY = 65536
"""How many fully consumed ids we remember, so late receives get a precise answer instead of a hang."""


@dataclass
class Slot:
    """One chunk as seen by a destination server."""

    state: SlotState
    source_rank: int
    source_instance: str
    location: Location | None = None
    owned_offset: int | None = None
    reason: str = ""
    since: float = field(default_factory=time.monotonic)


@dataclass
class StreamBox:
    """All chunks of one id at one destination; ``num_chunks`` is None until the length is known."""

    num_chunks: int | None = None
    chunks: dict[int, Slot] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)

    def finished(self) -> bool:
        """Every chunk of a stream of known length was marked done."""
        if self.num_chunks is None:
            return False
        return all(
            self.chunks.get(i) is not None and self.chunks[i].state == "done" for i in range(self.num_chunks)
        )


class Mailbox:
    """Slots by id plus futures of receivers waiting for an id to change."""

    def __init__(self) -> None:
        self.boxes: dict[str, StreamBox] = {}
        self.finished: OrderedDict[str, int] = OrderedDict()
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}

    def box(self, id_: str) -> StreamBox:
        """Return the box of ``id_``, created on first use (a re-sent finished id starts afresh)."""
        box = self.boxes.get(id_)
        if box is None:
            self.finished.pop(id_, None)
            box = self.boxes[id_] = StreamBox()
        box.touched = time.monotonic()
        return box

    def retire_if_finished(self, id_: str) -> None:
        """Forget a fully consumed stream, remembering only its length."""
        box = self.boxes.get(id_)
        if box is not None and box.finished():
            del self.boxes[id_]
            assert box.num_chunks is not None
            self.finished[id_] = box.num_chunks
            while len(self.finished) > FINISHED_MEMORY:
                self.finished.popitem(last=False)

    def wake(self, id_: str) -> bool:
        """Wake every receiver waiting on ``id_`` so it re-checks the box; whether any was waiting."""
        woken = False
        for fut in self._waiters.pop(id_, set()):
            if not fut.done():
                fut.set_result(None)
                woken = True
        return woken

    async def wait_change(self, id_: str, timeout: float) -> bool:
        """Wait until ``id_`` changes or ``timeout`` passes; returns False on timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(id_, set())
        waiters.add(fut)
        try:
            # asyncio.timeout, not wait_for: the waiter resumes in the loop turn after the wake (wait_for
            # adds two more turns on Python 3.11, on the latency path of every receive).
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            waiters.discard(fut)
            if not waiters and self._waiters.get(id_) is waiters:
                del self._waiters[id_]

    def slot_count(self) -> int:
        """Slots that still reference bytes (ready)."""
        return sum(1 for b in self.boxes.values() for s in b.chunks.values() if s.state == "ready")
