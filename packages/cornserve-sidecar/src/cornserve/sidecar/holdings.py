"""Source-side ownership: bytes this server keeps for a producer until every destination is done.

A chunk sent from here is *held* until each same-node destination released it (its consumer called
``mark_done``) and each cross-node destination has its own copy. GPU chunks hold no arena bytes;
their producer's client keeps the tensor alive until this server publishes that it was released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cornserve.bus.sidecar import Key, ReleaseChunkRequest, ReleasedEvent, SidecarAck
from cornserve.bus.subjects import sidecar_released_subject
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.peers import Peers
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger("cornserve.sidecar.server")

ChunkKey = tuple[str, int]
"""(id, chunk_id) of one chunk."""


@dataclass
class Held:
    """Bytes this server owns on behalf of a producer, until every same-node destination released them."""

    offset: int | None
    gpu: bool = False
    dsts: set[int] = field(default_factory=set)
    """Every destination rank of the chunk: only these may release it."""
    pending_local: set[int] = field(default_factory=set)
    pending_remote: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    """Ranks that already released (a fast consumer's release can overtake our TCP bookkeeping)."""
    created: float = field(default_factory=time.monotonic)
    notify: bool = False
    """The producer asked to hear when the chunk is released (`SendRequest.notify_released`)."""

    @property
    def announces(self) -> bool:
        """Whether its release is published (`ReleasedEvent`): GPU chunks and notify requests."""
        return self.gpu or self.notify


@dataclass
class Holdings:
    """Every chunk held for destinations, and their release."""

    me: ServerIdentity
    memory: ArenaMemory
    peers: Peers
    background: BackgroundTasks
    held: dict[ChunkKey, Held] = field(default_factory=dict)

    def maybe_release(self, key: ChunkKey) -> None:
        """Free the chunk's bytes once no same-node user is left, and forget it once nobody is."""
        held = self.held.get(key)
        if held is None:
            return
        if not held.pending_local and held.offset is not None:
            self.memory.free(held.offset)
            held.offset = None
        if not held.pending_local and not held.pending_remote:
            del self.held[key]
            if held.announces:
                # The producer's client keeps the GPU tensor alive (or its stream window open) until
                # it hears this.
                self.announce_released([key])

    def announce_released(self, keys: list[ChunkKey]) -> None:
        """Tell the producer clients of this rank that they may drop these chunks' GPU tensors."""
        self.background.spawn(self._publish_released(keys))

    async def _publish_released(self, keys: list[ChunkKey]) -> None:
        event = ReleasedEvent(instance=self.me.instance, keys=[Key(id=i, chunk_id=c) for i, c in keys])
        await self.peers.nc.publish(sidecar_released_subject(self.me.rank), event.model_dump_json().encode())

    def release(self, req: ReleaseChunkRequest) -> None:
        """A destination is done with a chunk we hold."""
        if req.source_instance != self.me.instance:
            logger.info("ignoring release of %s for previous instance %s", req.key, req.source_instance)
            return
        key = (req.key.id, req.key.chunk_id)
        held = self.held.get(key)
        if held is None:
            return
        if req.dst_rank not in held.dsts:
            logger.warning(
                "ignoring release of %s by rank %d, not one of its destinations", req.key, req.dst_rank
            )
            return
        held.released.add(req.dst_rank)
        held.pending_local.discard(req.dst_rank)
        held.pending_remote.discard(req.dst_rank)
        self.maybe_release(key)

    async def on_release(self, req: ReleaseChunkRequest) -> SidecarAck:
        """Endpoint: handle a destination being done with a chunk we hold."""
        self.release(req)
        return self.me.ack(req.request_id)

    def forget_destination(self, rank: int) -> list[Key]:
        """A destination restarted and forgot what we announced: stop waiting for it.

        Returns the chunks it was still due to receive, so its new instance can be told they are lost.
        """
        told: list[Key] = []
        for key, held in list(self.held.items()):
            if rank in held.pending_local or rank in held.pending_remote:
                told.append(Key(id=key[0], chunk_id=key[1]))
                held.pending_local.discard(rank)
                held.pending_remote.discard(rank)
                self.maybe_release(key)
        return told
