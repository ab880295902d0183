"""Source side of the server: a producer's ``send`` and ``close_stream``, delivered to every destination.

Same-node destinations get an announcement of where the bytes are (this arena, or a CUDA IPC
handle); cross-node destinations get the bytes themselves over TCP, or, for GPU data, an
announcement to pull them over NCCL from the producer's client. Every destination is resolved
before anything is delivered, so an unreachable rank fails the send fast and leaks nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cornserve.bus.micro import ServiceFault
from cornserve.bus.sidecar import (
    ChunkAnnouncement,
    CloseStreamRequest,
    DeliverRequest,
    InfoReply,
    SendRequest,
    SidecarAck,
    TcpHeader,
)
from cornserve.bus.subjects import SidecarVerb
from cornserve.runtime.tracing import Attributes, span
from cornserve.sidecar.allocation import ArenaMemory
from cornserve.sidecar.allocator import aligned
from cornserve.sidecar.holdings import Held, Holdings
from cornserve.sidecar.identity import ServerIdentity
from cornserve.sidecar.inbox import Inbox
from cornserve.sidecar.metrics import observe_delivery
from cornserve.sidecar.peerauth import PeerKey
from cornserve.sidecar.peers import Peers
from cornserve.sidecar.tcp import ProtocolError, TransferRefused, push

A = TypeVar("A", bound=ChunkAnnouncement)


def distinct_ranks(groups: list[list[int]]) -> list[int]:
    """Every rank of ``groups`` once, in first-seen order."""
    return list(dict.fromkeys(r for group in groups for r in group))


@dataclass
class Outbox:
    """The send and close endpoints, and delivery of chunks to destination ranks."""

    me: ServerIdentity
    memory: ArenaMemory
    holdings: Holdings
    inbox: Inbox
    peers: Peers
    streams: dict[str, tuple[list[list[int]], float]] = field(default_factory=dict)
    """Destinations of open streams (for ``close_stream``) and when their last chunk was sent."""
    peer_key: PeerKey | None = None
    """The cluster's peer secret (set at start when configured); without it no cross-node pushes."""
    sent_by_path: Counter[str] = field(default_factory=Counter)
    """Chunks delivered per path (`shm`, `cuda_ipc`, `tcp`, `nccl`), reported in stats."""

    async def on_send(self, req: SendRequest) -> SidecarAck:
        """Take ownership of the written bytes and announce them to every destination rank."""
        deadline = time.monotonic() + req.timeout
        key = (req.id, req.chunk_id)
        loc = req.location
        if req.id in self.inbox.dropped:
            # Its graph was given up (the producer had not noticed yet): free the bytes, send nothing.
            if (
                loc.transport == "shm"
                and loc.arena == self.memory.arena.name
                and loc.offset in self.memory.unsent
            ):
                self.memory.discard_unsent(loc.offset)
            raise ServiceFault(
                410,
                "data_dropped",
                f"id {req.id!r} was dropped on rank {self.me.rank}: its graph was given up",
            )
        if key in self.holdings.held:
            raise ServiceFault(
                409, "bad_request", f"id {req.id!r} chunk {req.chunk_id} is already in flight from here"
            )
        offset: int | None = None
        if loc.transport == "shm":
            self.me.check_instance(req.instance, "allocation")
            if loc.arena != self.memory.arena.name or loc.offset not in self.memory.unsent:
                raise ServiceFault(
                    400, "bad_request", f"offset {loc.offset} of {loc.arena!r} is not an unsent allocation"
                )
            if aligned(loc.size) > self.memory.alloc.size_of(loc.offset) or loc.size < loc.meta.nbytes:
                raise ServiceFault(400, "bad_request", "location size does not match its allocation/meta")
            offset = loc.offset
        # Resolve every destination before delivering anything: an unreachable rank fails the send fast.
        try:
            peers = await self._resolve(distinct_ranks(req.dst_ranks), deadline)
        except ServiceFault:
            if offset is not None:
                self.memory.discard_unsent(offset)
            raise
        if offset is not None:
            self.memory.take_unsent(offset)
        held = Held(
            offset=offset,
            gpu=loc.transport == "cuda_ipc",
            dsts={p.rank for p in peers},
            notify=req.notify_released,
        )
        self.holdings.held[key] = held
        if req.num_chunks is None:
            self.streams[req.id] = (req.dst_ranks, time.monotonic())  # refreshed by every chunk
        if len(peers) == 1:
            # One destination (the common case) is delivered inline: `gather` would wrap it in a task
            # that runs a loop turn later, on the transfer's latency path.
            try:
                await self._deliver_to(peers[0], req, held, deadline)
            finally:
                self.holdings.maybe_release(key)
            return self.me.ack(req.request_id)
        results = await asyncio.gather(
            *(self._deliver_to(p, req, held, deadline) for p in peers), return_exceptions=True
        )
        self.holdings.maybe_release(key)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return self.me.ack(req.request_id)

    async def _resolve(self, ranks: list[int], deadline: float) -> list[InfoReply]:
        """Info of every destination rank (cached, else asked concurrently; one inline, see `on_send`)."""
        if len(ranks) == 1:
            return [await self.peers.info(ranks[0], deadline)]
        return list(await asyncio.gather(*(self.peers.info(r, deadline) for r in ranks)))

    async def _deliver_to(self, peer: InfoReply, req: SendRequest, held: Held, deadline: float) -> None:
        """Deliver the chunk to one destination, counted in the metrics by path."""
        loc = req.location
        path: str
        if peer.node == self.me.node:
            path = loc.transport
        else:
            path = "nccl" if loc.transport == "cuda_ipc" else "tcp"
        started = time.monotonic()
        ok = False
        attributes: Attributes = {
            "cornserve.sidecar.rank": self.me.rank,
            "cornserve.sidecar.dst_rank": peer.rank,
            "cornserve.sidecar.path": path,
            "cornserve.bytes": loc.size,
        }
        try:
            with span("sidecar.transfer", attributes=attributes):
                await self._deliver_one(peer, req, held, deadline)
            ok = True
            self.sent_by_path[path] += 1
        finally:
            observe_delivery(self.me.rank, path, loc.size, time.monotonic() - started, ok)

    async def _deliver_one(self, peer: InfoReply, req: SendRequest, held: Held, deadline: float) -> None:
        loc = req.location
        me = self.me
        if peer.node != me.node and loc.transport != "cuda_ipc":
            # While the bytes stream out of our arena they must not be freed, even if every same-node
            # consumer releases meanwhile: count the transfer as a local user until it completes.
            held.pending_local.add(peer.rank)
            try:
                await self._push(peer, req, deadline)
            finally:
                held.pending_local.discard(peer.rank)
            if peer.rank not in held.released:
                held.pending_remote.add(peer.rank)
            return
        if peer.node == me.node:
            if loc.transport == "cuda_ipc" and loc.node != me.node:
                raise ServiceFault(400, "bad_request", "CUDA IPC location from another node")
            there = loc.model_copy(update={"node": me.node, "rank": me.rank})
        else:
            # Across nodes the GPU bytes stay with the producer's client; the consumer's client pulls
            # them over NCCL. We only announce where to pull from and keep the entry until it is done.
            there = loc.model_copy(update={"transport": "nccl", "cuda_handle": "", "rank": me.rank})
        msg = self._announce(DeliverRequest, req.id, req.chunk_id, req.num_chunks, peer.rank, location=there)
        held.pending_local.add(peer.rank)
        try:
            await self._deliver(msg, deadline)
        except BaseException:
            held.pending_local.discard(peer.rank)
            raise

    def _announce(
        self, model: type[A], id_: str, chunk_id: int, num_chunks: int | None, dst_rank: int, **rest: Any
    ) -> A:
        """A message from this server to ``dst_rank`` about one chunk (``rest``: the model's own fields)."""
        return model(
            id=id_,
            chunk_id=chunk_id,
            num_chunks=num_chunks,
            source_rank=self.me.rank,
            source_instance=self.me.instance,
            dst_rank=dst_rank,
            **rest,
        )

    async def _deliver(self, msg: DeliverRequest, deadline: float) -> None:
        if msg.dst_rank == self.me.rank:
            if self.inbox.accept(msg, owned_offset=None):
                # A receiver is waiting: let it answer its consumer before the producer's send is
                # acked (as `Inbox.on_deliver` does for a peer's delivery; `directsend` sends land here).
                await asyncio.sleep(0)
            return
        await self.peers.request(msg.dst_rank, SidecarVerb.DELIVER, msg, SidecarAck, deadline)

    async def _push(self, peer: InfoReply, req: SendRequest, deadline: float) -> None:
        """Stream the chunk's bytes from our arena into the peer's arena."""
        loc = req.location
        key = self._check_cross_node(peer)
        remaining = max(0.001, deadline - time.monotonic())
        header = self._announce(
            TcpHeader,
            req.id,
            req.chunk_id,
            req.num_chunks,
            peer.rank,
            request_id=req.request_id,
            meta=loc.meta,
            size=loc.size,
            timeout=remaining,
        )
        payload = self.memory.arena.view[loc.offset : loc.offset + loc.size]
        where = f"destination sidecar rank {peer.rank} (TCP {peer.tcp_host}:{peer.tcp_port})"
        try:
            await push(peer.tcp_host, peer.tcp_port, key, header, payload, remaining)
        except TransferRefused as r:
            raise ServiceFault(503, r.error, f"rank {peer.rank}: {r.message}", rank=peer.rank) from None
        except TimeoutError:
            raise ServiceFault(504, "unreachable", f"{where}: transfer timed out", rank=peer.rank) from None
        except (ProtocolError, OSError) as exc:
            raise ServiceFault(502, "unreachable", f"{where}: {exc}", rank=peer.rank) from None

    def _check_cross_node(self, peer: InfoReply) -> PeerKey:
        """Our key for a push to ``peer``; a typed ``peer_auth`` fault when either side has none."""
        if self.peer_key is None:
            raise ServiceFault(
                503,
                "peer_auth",
                f"rank {self.me.rank} cannot send to rank {peer.rank} on node {peer.node}: it has no "
                "peer secret (give every sidecar the same --peer-secret-file; `cornserve up` does)",
                rank=peer.rank,
            )
        if peer.tcp_port == 0:
            raise ServiceFault(
                503,
                "peer_auth",
                f"destination sidecar rank {peer.rank} on node {peer.node} accepts no cross-node "
                "transfers: it has no peer secret (give it the cluster's --peer-secret-file)",
                rank=peer.rank,
            )
        return self.peer_key

    async def on_close(self, req: CloseStreamRequest) -> SidecarAck:
        """Announce a stream's final length to its destinations."""
        known = self.streams.get(req.id)
        groups = req.dst_ranks or (known[0] if known is not None else None)
        if groups is None:
            raise ServiceFault(
                404,
                "unknown_stream",
                f"stream {req.id!r} was never sent from rank {self.me.rank}; pass dst_ranks",
            )
        deadline = time.monotonic() + req.timeout
        ranks = distinct_ranks(groups)
        msgs = [self._announce(DeliverRequest, req.id, 0, req.num_chunks, r) for r in ranks]
        await asyncio.gather(*(self.peers.info(r, deadline) for r in ranks))
        await asyncio.gather(*(self._deliver(m, deadline) for m in msgs))
        self.streams.pop(req.id, None)
        return self.me.ack(req.request_id)
