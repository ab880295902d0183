"""Dropping the data of a graph that was given up: freed now, not at the TTL.

A graph cancelled by its caller (client gone, deadline) or failed half way leaves forwards behind:
a producer already sent a chunk that no consumer will read, or a consumer's sidecar already holds
a copy. Without a word from outside, the sidecar keeps them until its TTL (300 s by default). The
dispatcher that ran the graph knows every forward's id and ranks, so it sends each of those
sidecars a `DropRequest`: the server frees every chunk of those ids it holds, as source (held for
destinations) or as destination (received, not consumed), and remembers the ids for a while
(`DroppedIds`), so that a send or delivery that arrives after the drop (a producer that had not
noticed the cancel yet) is refused or freed at once instead of waiting for the TTL, and a receive
fails at once with `data_dropped`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from cornserve.bus.sidecar import DropRequest, SidecarAck
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.holdings import Holdings
from cornserve.sidecar.identity import LossCounters, ServerIdentity
from cornserve.sidecar.inbox import Inbox
from cornserve.sidecar.outbox import Outbox

logger = logging.getLogger("cornserve.sidecar.server")

DROP_MEMORY = 16384
"""Dropped ids remembered at most (the oldest are forgotten first; the TTL sweep forgets them too)."""


class DroppedIds:
    """Ids dropped recently (by when), so late sends, deliveries and receives of them end at once."""

    def __init__(self, limit: int = DROP_MEMORY) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, id_: str) -> None:
        """Remember `id_` as dropped now."""
        self._ids[id_] = time.monotonic()
        self._ids.move_to_end(id_)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __contains__(self, id_: object) -> bool:
        return id_ in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def forget_before(self, cutoff: float) -> None:
        """Forget ids dropped before `cutoff` (monotonic time): nothing of theirs can still arrive."""
        while self._ids:
            id_, when = next(iter(self._ids.items()))
            if when >= cutoff:
                return
            del self._ids[id_]


@dataclass
class Dropper:
    """The `drop` endpoint: frees every chunk of the named ids this server holds."""

    me: ServerIdentity
    memory: ArenaMemory
    holdings: Holdings
    inbox: Inbox
    outbox: Outbox
    counters: LossCounters

    async def on_drop(self, req: DropRequest) -> SidecarAck:
        """Endpoint: the graph of these ids was given up; free what is held for them."""
        reason = req.reason or "its graph was given up"
        freed = sum(self.drop(id_, reason) for id_ in req.ids)
        if freed:
            logger.info(
                "rank %d: dropped %d chunk(s) of %d id(s): %s", self.me.rank, freed, len(req.ids), reason
            )
        return self.me.ack(req.request_id)

    def drop(self, id_: str, reason: str) -> int:
        """Free every chunk of `id_` held here (as source and as destination); how many were freed."""
        self.inbox.dropped.add(id_)
        freed = 0
        for key in [k for k in self.holdings.held if k[0] == id_]:
            held = self.holdings.held.pop(key)
            if held.offset is not None:
                self.memory.free(held.offset)
            if held.announces:
                self.holdings.announce_released([key])
            freed += 1
        self.outbox.streams.pop(id_, None)
        freed += self.inbox.drop(id_, reason)
        self.counters.dropped_total += freed
        return freed
