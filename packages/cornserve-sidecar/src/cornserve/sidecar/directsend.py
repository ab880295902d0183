"""Copy sends to one same-node rank go straight to that rank's server (on its control socket).

Why: through the producer's own server a same-node send takes three process hops (client → its
server → the destination's server → the waiting ``recv``) and three server-to-server messages
(``deliver``, its ack, later the ``release``). Sent straight to the destination's server, the bytes
land in the arena the receiver maps anyway and the delivery is that server's send to itself: two
hops and no server-to-server message; the receiver's ``done`` frees the block where it lives. A
small chunk rides a ``put``; a bigger one is written by the client into a block of the
destination's arena (``alloc`` there, or a spare reserved there after an earlier send of that size)
and then ``send``. Measured in docs/performance.md ("Direct sends").

Only where nothing else depends on the producer's own server seeing the chunk: one destination
rank (not the producer's own), a bounded chunk (not a stream: ``close_stream`` asks the producer's
server for the stream's destinations), no release notification (the producer's server announces
those), and a copy (a tensor from `alloc_tensor` already lives in the producer's own arena). Everything
else, and every failure to reach the destination this way, takes the usual path.

A destination's control socket is learnt from its ``info`` over NATS, in the background on the first
send to it (that send takes the usual path), so no send waits for the lookup. The reply is checked
before it is used: the rank it names, our node, a socket path a sidecar creates.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
from dataclasses import dataclass, field

from nats.aio.client import Client

from cornserve.bus.micro import request
from cornserve.bus.sidecar import InfoReply, InfoRequest
from cornserve.bus.subjects import SidecarVerb, sidecar_subject
from cornserve.sidecar.arena import map_arena
from cornserve.sidecar.localclient import LocalChannel
from cornserve.sidecar.localsocket import checked_socket_path
from cornserve.sidecar.spares import Spares
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 2.0
"""Bound on asking a destination rank for its info."""
RECHECK_S = 30.0
"""A rank found unusable this way (another node, no socket, no answer) is asked again after this long."""
ROOM_WAIT_S = 0.05
"""How long a direct send waits for room in the destination's arena before the usual path is taken
(there the bytes wait for room in the producer's own arena, as before)."""


def sole_destination(
    dst_ranks: list[list[int]], num_chunks: int | None, notify_released: bool, own_rank: int
) -> int | None:
    """The one destination rank of a send that may go direct, else None (see the module docstring)."""
    if notify_released or num_chunks is None or len(dst_ranks) != 1 or len(dst_ranks[0]) != 1:
        return None
    rank = dst_ranks[0][0]
    return None if rank == own_rank else rank


@dataclass
class DirectPeer:
    """A same-node destination we send to directly.

    Its identity, a channel to its control socket, its arena mapped writable (bigger chunks are
    written straight into it) and the spares reserved there.
    """

    info: InfoReply
    channel: LocalChannel
    arena: mmap.mmap
    view: memoryview = field(init=False)
    spares: Spares = field(default_factory=Spares)

    def __post_init__(self) -> None:
        self.view = memoryview(self.arena)


class DirectPeers:
    """The same-node ranks a client puts to directly, learnt on first use."""

    def __init__(self, own_rank: int) -> None:
        self._own_rank = own_rank
        self._peers: dict[int, DirectPeer] = {}
        self._unusable_until: dict[int, float] = {}
        self._looking_up: set[int] = set()
        self._tasks = BackgroundTasks(logger, "destination sidecar lookup")

    def peer(self, rank: int, nc: Client, own_node: str) -> DirectPeer | None:
        """The direct channel to ``rank`` if known; else None, starting a lookup when one is due."""
        found = self._peers.get(rank)
        if found is not None:
            return found
        if rank in self._looking_up or time.monotonic() < self._unusable_until.get(rank, 0.0):
            return None
        self._looking_up.add(rank)
        self._tasks.spawn(self._learn(rank, nc, own_node))
        return None

    async def _learn(self, rank: int, nc: Client, own_node: str) -> None:
        """Look ``rank`` up, then keep its peer or mark it unusable for a while.

        The rank stays "being looked up" until then, arena mapping included: a send meanwhile must
        not start a second lookup, whose peer would replace this one's with its connections open.
        """
        try:
            found = await self._lookup(rank, nc, own_node)
        finally:
            self._looking_up.discard(rank)
        if found is None:
            self._unusable(rank)
        else:
            self._peers[rank] = found

    async def _lookup(self, rank: int, nc: Client, own_node: str) -> DirectPeer | None:
        """``rank``'s peer from its ``info``, or None (the usual path serves; asked again later).

        None when it did not answer, is not on our node, or its arena cannot be mapped.
        """
        try:
            info = await request(
                nc, sidecar_subject(rank, SidecarVerb.INFO), InfoRequest(), InfoReply, LOOKUP_TIMEOUT_S
            )
        except Exception as exc:  # no answer or a refusal
            logger.info("sidecar rank %d: no info for direct sends (%r); using its peer path", rank, exc)
            return None
        path = checked_socket_path(info.local_socket)
        if info.rank != rank or info.node != own_node or path is None:
            return None
        try:
            # In a thread: filling the page tables of a prefaulted arena takes a while.
            arena = await asyncio.to_thread(map_arena, info.arena, True, info.prefaulted)
        except (OSError, ValueError) as exc:
            logger.info(
                "sidecar rank %d: arena %s not mapped (%r); using its peer path", rank, info.arena, exc
            )
            return None
        return DirectPeer(info, LocalChannel(path), arena)

    def _unusable(self, rank: int) -> None:
        self._unusable_until[rank] = time.monotonic() + RECHECK_S

    def forget(self, rank: int) -> None:
        """Stop using ``rank`` (its socket failed, or it restarted); learnt again on a later send.

        Spares held there are left to that server's TTL (it may be gone). The arena mapping is left
        to the garbage collector: tensors received from it may still view it.
        """
        found = self._peers.pop(rank, None)
        if found is not None:
            found.channel.close()

    def known(self) -> list[DirectPeer]:
        """Every destination known now."""
        return list(self._peers.values())

    async def close(self) -> None:
        """Cancel lookups under way and close every channel."""
        await self._tasks.close()
        for rank in list(self._peers):
            self.forget(rank)
