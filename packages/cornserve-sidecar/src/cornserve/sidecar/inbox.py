"""Destination side of the server: chunks announced to this rank, and its consumers' receives.

Sources announce chunks (``deliver``); consumers long-poll for them (``recv``) and finish them
(``done``), which frees bytes this server owns or releases the source's bytes. Chunks that will
never be readable (source restarted, TTL expired) keep a state so a receive gets a precise error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import (
    DeliverRequest,
    DoneRequest,
    Key,
    NoticeKind,
    NoticeRequest,
    RecvReply,
    RecvRequest,
    ReleaseChunkRequest,
    SidecarAck,
)
from cornserve.bus.subjects import SidecarVerb
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.arena import arena_name
from cornserve.sidecar.holdings import ChunkKey, Holdings
from cornserve.sidecar.identity import LossCounters, ServerIdentity
from cornserve.sidecar.mailbox import Mailbox, Slot, SlotState
from cornserve.sidecar.peers import Peers

_ERROR_OF_STATE = {
    "done": "already_consumed",
    "lost": "data_lost",
    "expired": "data_expired",
    "dropped": "data_dropped",
}


class DroppedIdsView(Protocol):
    """What the inbox asks of the dropped ids (`cornserve.sidecar.dropping.DroppedIds`)."""

    def __contains__(self, id_: object) -> bool:
        """Whether `id_` was dropped recently."""

    def add(self, id_: str) -> None:
        """Remember `id_` as dropped."""


@dataclass
class Inbox:
    """The deliver, recv, done and notice endpoints over this rank's :class:`Mailbox`."""

    me: ServerIdentity
    memory: ArenaMemory
    holdings: Holdings
    peers: Peers
    counters: LossCounters
    dropped: DroppedIdsView
    """Ids whose graph was given up (`dropping.py`): what still arrives for them is freed at once."""
    mailbox: Mailbox = field(default_factory=Mailbox)

    async def on_deliver(self, req: DeliverRequest) -> SidecarAck:
        """Endpoint: a peer server announces a chunk (or a stream's length) for one of our consumers.

        Everything in it comes from the bus, so it may only point into the *source's* own arena: a
        location in this server's arena (whose blocks we would free when the chunk is consumed) or
        one whose ``meta.nbytes`` overruns its size is refused with ``bad_request``.
        """
        self.check_peer_deliver(req)
        if self.accept(req, owned_offset=None):
            # A receiver is waiting: let it answer its consumer before we ack the source (the consumer's
            # reply is on the transfer's latency path; the ack is not).
            await asyncio.sleep(0)
        return self.me.ack(req.request_id)

    def check_peer_deliver(self, req: DeliverRequest) -> None:
        """Refuse an announcement that is not a peer's, for us, about the peer's own bytes."""

        def bad(why: str) -> ServiceFault:
            return ServiceFault(400, "bad_request", f"rank {self.me.rank}: deliver of id {req.id!r} {why}")

        if req.dst_rank != self.me.rank:
            raise bad(f"is addressed to rank {req.dst_rank}")
        if req.source_rank == self.me.rank:
            raise bad("claims to come from this rank (local deliveries never use the bus)")
        loc = req.location
        if loc is None:
            return
        if loc.meta.nbytes > loc.size:
            raise bad(f"has meta.nbytes {loc.meta.nbytes} beyond its size {loc.size}")
        if loc.transport != "shm":
            return
        if loc.arena == self.memory.arena.name:
            raise bad("points into this server's own arena; only TCP arrivals land there")
        expected = arena_name(self.me.node, req.source_rank, req.source_instance)
        if loc.arena != expected or loc.node != self.me.node:
            raise bad(f"names arena {loc.arena!r} on node {loc.node!r}, not its source's {expected!r}")

    def accept(self, req: DeliverRequest, owned_offset: int | None) -> bool:
        """Record an announced chunk; ``owned_offset`` is our arena block holding it (TCP arrivals only).

        Returns whether a receiver waiting for the id was woken.
        """
        box = self.mailbox.box(req.id)
        if req.location is not None:
            old = box.chunks.get(req.chunk_id)
            if old is not None and old.state == "ready":
                raise ServiceFault(
                    409,
                    "bad_request",
                    f"id {req.id!r} chunk {req.chunk_id} is already waiting on rank {self.me.rank}",
                )
            box.chunks[req.chunk_id] = Slot(
                state="ready",
                source_rank=req.source_rank,
                source_instance=req.source_instance,
                location=req.location,
                owned_offset=owned_offset,
            )
            if req.id in self.dropped:  # arrived after its graph was given up: free it now
                self.consume(
                    req.id, req.chunk_id, box.chunks[req.chunk_id], "dropped", "its graph was given up"
                )
                self.counters.dropped_total += 1
        if req.num_chunks is not None:
            box.num_chunks = req.num_chunks
        self.mailbox.retire_if_finished(req.id)
        return self.mailbox.wake(req.id)

    async def on_recv(self, req: RecvRequest) -> RecvReply:
        """Long-poll for a chunk: answers as soon as it is here, or with a typed error at the deadline."""
        deadline = time.monotonic() + req.timeout
        while True:
            reply = self._try_recv(req)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.mailbox.wait_change(req.id, remaining):
                raise ServiceFault(
                    504,
                    "recv_timeout",
                    f"rank {self.me.rank}: id {req.id!r} chunk {req.chunk_id} "
                    f"did not arrive within {req.timeout:.3f}s",
                    id=req.id,
                    chunk_id=req.chunk_id,
                    rank=self.me.rank,
                )

    def _try_recv(self, req: RecvRequest) -> RecvReply | None:
        """The answer to ``req`` if there is one now; None means keep waiting."""
        end = RecvReply(request_id=req.request_id, instance=self.me.instance, end_of_stream=True)
        if req.id in self.dropped:
            raise ServiceFault(
                410,
                "data_dropped",
                f"id {req.id!r} was dropped on rank {self.me.rank}: its graph was given up",
                id=req.id,
                chunk_id=req.chunk_id,
                rank=self.me.rank,
            )
        done_len = self.mailbox.finished.get(req.id)
        box = self.mailbox.boxes.get(req.id)
        if box is None and done_len is not None:
            if req.chunk_id >= done_len:
                return end
            raise ServiceFault(
                410,
                "already_consumed",
                f"id {req.id!r} chunk {req.chunk_id} was already marked done",
                id=req.id,
            )
        if box is None:
            return None
        slot = box.chunks.get(req.chunk_id)
        if slot is not None:
            if slot.state == "ready":
                return RecvReply(request_id=req.request_id, instance=self.me.instance, location=slot.location)
            raise ServiceFault(
                410,
                _ERROR_OF_STATE[slot.state],
                f"id {req.id!r} chunk {req.chunk_id} is {slot.state} on rank {self.me.rank}"
                + (f": {slot.reason}" if slot.reason else ""),
                id=req.id,
                chunk_id=req.chunk_id,
                rank=self.me.rank,
            )
        if box.num_chunks is not None and req.chunk_id >= box.num_chunks:
            return end
        return None

    async def on_done(self, req: DoneRequest) -> SidecarAck:
        """Handle a consumer finishing a chunk: free our copy or tell the source to."""
        ok = self.me.ack(req.request_id)
        box = self.mailbox.boxes.get(req.id)
        slot = box.chunks.get(req.chunk_id) if box is not None else None
        if slot is None:
            if req.id in self.mailbox.finished:
                return ok  # idempotent
            raise ServiceFault(
                404,
                "not_found",
                f"id {req.id!r} chunk {req.chunk_id} was never delivered to rank {self.me.rank}",
            )
        if slot.state != "ready":
            return ok
        self.consume(req.id, req.chunk_id, slot, state="done", reason="")
        self.mailbox.retire_if_finished(req.id)
        self.mailbox.wake(req.id)
        return ok

    def consume(self, id_: str, chunk_id: int, slot: Slot, state: SlotState, reason: str) -> None:
        """Leave the ready state: free owned bytes, or release the source's bytes."""
        slot.state = state
        slot.reason = reason
        slot.location = None
        if slot.owned_offset is not None:
            self.memory.free(slot.owned_offset)
            slot.owned_offset = None
        msg = ReleaseChunkRequest(
            key=Key(id=id_, chunk_id=chunk_id), dst_rank=self.me.rank, source_instance=slot.source_instance
        )
        if slot.source_rank == self.me.rank:
            self.holdings.release(msg)
        else:
            # A gone or restarted source lost its memory anyway (or its TTL reclaims it).
            self.peers.tell(slot.source_rank, SidecarVerb.RELEASE, msg, f"release of {msg.key}")

    async def on_notice(self, req: NoticeRequest) -> SidecarAck:
        """Record chunks a source says will never be readable (lost or expired)."""
        self.mark(req.kind, req.source_rank, [(k.id, k.chunk_id) for k in req.keys], req.reason)
        return self.me.ack(req.request_id)

    def mark(self, kind: NoticeKind, source_rank: int, keys: list[ChunkKey], reason: str) -> None:
        """Mark chunks that are not yet consumed as lost or expired, and wake their receivers."""
        for id_, chunk in keys:
            box = self.mailbox.box(id_)
            slot = box.chunks.get(chunk)
            if slot is None:
                box.chunks[chunk] = Slot(
                    state=kind, source_rank=source_rank, source_instance="", reason=reason
                )
            elif slot.source_rank != source_rank:
                continue  # only a chunk's own source may declare it lost or expired
            elif slot.state == "ready":
                self.consume(id_, chunk, slot, state=kind, reason=reason)
            else:
                continue
            if kind == "lost":
                self.counters.lost_total += 1
            else:
                self.counters.expired_total += 1
            self.mailbox.wake(id_)

    def drop(self, id_: str, reason: str) -> int:
        """Free every received chunk of `id_` not yet consumed, and wake its receivers; how many."""
        box = self.mailbox.boxes.get(id_)
        freed = 0
        if box is not None:
            for chunk, slot in box.chunks.items():
                if slot.state == "ready":
                    self.consume(id_, chunk, slot, state="dropped", reason=reason)
                    freed += 1
        self.mailbox.wake(id_)
        return freed

    def forget_source(self, rank: int, new_instance: str) -> None:
        """A source rank restarted: chunks whose bytes lived in its old arena are gone."""
        lost: list[ChunkKey] = []
        for id_, box in self.mailbox.boxes.items():
            for chunk, slot in box.chunks.items():
                gone = slot.source_rank == rank and slot.source_instance != new_instance
                if slot.state == "ready" and gone and slot.owned_offset is None:
                    lost.append((id_, chunk))
        self.mark("lost", rank, lost, f"sidecar rank {rank} restarted")
