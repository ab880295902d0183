"""The sidecar server: one process per device, owning a shared-memory arena.

It answers its clients (alloc, send, recv, done, close, stats, info), talks to peer servers over
NATS for control (deliver, release, notice) and over TCP for cross-node bytes, and reclaims memory
nobody claims within the TTL. Every request runs in its own task with a deadline, so a waiting
receive or a sender blocked on memory never stalls anything else.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro import add_service
from pydantic import BaseModel, Field, ValidationError

from cornserve.bus.micro import (
    HandlerRunner,
    NoResponders,
    RequestTimeout,
    ServiceErrorReply,
    ServiceFault,
    request,
)
from cornserve.bus.sidecar import (
    AllocReply,
    AllocRequest,
    CloseStreamRequest,
    DeliverRequest,
    DoneRequest,
    FreeRequest,
    InfoReply,
    InfoRequest,
    Key,
    Location,
    NoticeKind,
    NoticeRequest,
    OkReply,
    RecvReply,
    RecvRequest,
    ReleasedEvent,
    ReleaseRequest,
    SendRequest,
    StatsReply,
    StatsRequest,
    TcpHeader,
    UpEvent,
)
from cornserve.bus.subjects import (
    SIDECAR_SERVICE_NAME,
    SIDECAR_UP_EVENT,
    SidecarVerb,
    sidecar_released_subject,
    sidecar_subject,
)
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.service import run_process, running
from cornserve.runtime.settings import ProcessInfo, ServiceSettings
from cornserve.sidecar import __version__
from cornserve.sidecar.allocator import Allocator, OutOfMemory, aligned
from cornserve.sidecar.arena import Arena, arena_name
from cornserve.sidecar.mailbox import Mailbox, Slot
from cornserve.sidecar.tcp import ProtocolError, Refusal, TcpReceiver, TransferRefused, push

logger = logging.getLogger("cornserve.sidecar.server")

R = TypeVar("R", bound=BaseModel)

CONNECT_TIMEOUT_S = 30.0

PEER_TIMEOUT_S = 5.0
"""Upper bound on one control round trip to a peer; keeps 'unreachable' fast."""


@dataclass
class Held:
    """Bytes this server owns on behalf of a producer, until every same-node destination released them."""

    offset: int | None
    gpu: bool = False
    pending_local: set[int] = field(default_factory=set)
    pending_remote: set[int] = field(default_factory=set)
    released: set[int] = field(default_factory=set)
    """Ranks that already released (a fast consumer's release can overtake our TCP bookkeeping)."""
    created: float = field(default_factory=time.monotonic)


def fault(code: int, kind: str, message: str, **details: object) -> ServiceFault:
    """Shorthand for a typed error reply."""
    return ServiceFault(code, kind, message, **details)


class SidecarServer:
    """State and handlers of one sidecar server instance."""

    def __init__(
        self,
        rank: int,
        node: str,
        nats_url: str,
        arena_bytes: int,
        ttl_s: float,
        tcp_host: str,
        tcp_port: int = 0,
        prefault: bool = False,
    ) -> None:
        self.rank = rank
        self.node = node
        self.nats_url = nats_url
        self.ttl_s = ttl_s
        self.instance = uuid.uuid4().hex[:16]
        self.arena_bytes = aligned(arena_bytes)
        self.tcp_host = tcp_host
        self.tcp_port = tcp_port
        self.prefault = prefault
        self.arena: Arena | None = None
        self.alloc = Allocator(self.arena_bytes)
        self.mailbox = Mailbox()
        self._allocs: dict[int, float] = {}
        self._held: dict[tuple[str, int], Held] = {}
        self._streams_out: dict[str, tuple[list[list[int]], float]] = {}
        """Destinations of open streams (for ``close_stream``) and when their last chunk was sent."""
        self._peers: dict[int, InfoReply] = {}
        self._peer_instances: dict[int, str] = {}
        self._freed = asyncio.Event()
        self._runner = HandlerRunner()
        self._bg: set[asyncio.Task[Any]] = set()
        self._nc: Client | None = None
        self._tcp: TcpReceiver | None = None
        self.expired_total = 0
        self.lost_total = 0
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, refuse to double-serve a rank, create the arena, register endpoints, announce."""
        try:
            # Unlimited reconnects keep a running server alive through NATS restarts, but would also
            # retry the first connect forever: bound that one.
            self._nc = await asyncio.wait_for(
                connect_nats(self.nats_url, name=f"cornserve-sidecar-{self.rank}"),
                CONNECT_TIMEOUT_S,
            )
        except TimeoutError:
            raise RuntimeError(f"cannot reach NATS at {self.nats_url} within {CONNECT_TIMEOUT_S}s") from None
        try:
            other = await request(
                self._nc, sidecar_subject(self.rank, SidecarVerb.INFO), InfoRequest(), InfoReply, 1.0
            )
        except (NoResponders, RequestTimeout):
            pass  # nobody serves this rank: good
        else:
            raise RuntimeError(
                f"rank {self.rank} is already served by instance {other.instance} on {other.node}"
            )
        removed = Arena.remove_stale(self.node, self.rank)
        if removed:
            logger.warning("removed arenas of crashed instances: %s", removed)
        self.arena = Arena(arena_name(self.node, self.rank, self.instance), self.arena_bytes)
        if self.prefault:
            self.arena.prefault()
        self._tcp = TcpReceiver(
            self.tcp_host, self.tcp_port, self._tcp_allocate, self._tcp_land, self._tcp_abandon
        )
        self.tcp_port = self._tcp.start()
        await self._nc.subscribe(SIDECAR_UP_EVENT, cb=self._on_up)
        await self._register()
        self._spawn(self._reap_forever())
        await self._nc.publish(
            SIDECAR_UP_EVENT,
            UpEvent(rank=self.rank, node=self.node, instance=self.instance).model_dump_json().encode(),
        )
        await self._nc.flush()
        logger.info(
            "sidecar rank=%d node=%s instance=%s arena=%s (%d bytes) tcp=%s:%d ready",
            self.rank,
            self.node,
            self.instance,
            self.arena.name,
            self.arena_bytes,
            self.tcp_host,
            self.tcp_port,
        )

    async def _register(self) -> None:
        assert self._nc is not None
        svc = await add_service(
            self._nc,
            name=SIDECAR_SERVICE_NAME,
            version=__version__,
            description="Cornserve tensor forwarding sidecar",
            metadata={"rank": str(self.rank), "node": self.node, "instance": self.instance},
        )
        routes: list[tuple[SidecarVerb, type[BaseModel], object]] = [
            (SidecarVerb.INFO, InfoRequest, self.on_info),
            (SidecarVerb.STATS, StatsRequest, self.on_stats),
            (SidecarVerb.ALLOC, AllocRequest, self.on_alloc),
            (SidecarVerb.FREE, FreeRequest, self.on_free),
            (SidecarVerb.SEND, SendRequest, self.on_send),
            (SidecarVerb.RECV, RecvRequest, self.on_recv),
            (SidecarVerb.DONE, DoneRequest, self.on_done),
            (SidecarVerb.CLOSE, CloseStreamRequest, self.on_close),
            (SidecarVerb.DELIVER, DeliverRequest, self.on_deliver),
            (SidecarVerb.RELEASE, ReleaseRequest, self.on_release),
            (SidecarVerb.NOTICE, NoticeRequest, self.on_notice),
        ]
        for verb, model, fn in routes:
            await svc.add_endpoint(
                name=verb.value,
                subject=sidecar_subject(self.rank, verb),
                handler=self._runner.wrap(model, fn),  # type: ignore[arg-type]
                metadata={"rank": str(self.rank)},
            )
        self._service = svc

    async def stop(self) -> None:
        """Stop serving, cancel waiting handlers, unlink the arena."""
        await self._runner.close()
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.close()
        if self._nc is not None:
            await self._service.stop()
            await self._nc.drain()
        if self.arena is not None:
            self.arena.close()
        self.stopped.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background coroutine, keeping a reference and logging its failure."""
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._bg.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    @property
    def nc(self) -> Client:
        """The NATS connection (after start)."""
        assert self._nc is not None
        return self._nc

    # ------------------------------------------------------------------ memory

    def _free(self, offset: int) -> None:
        self.alloc.free(offset)
        self._freed.set()
        self._freed = asyncio.Event()

    async def _allocate(self, size: int, timeout: float) -> int:
        """Reserve arena bytes, waiting for frees up to ``timeout``; never blocks other requests."""
        if aligned(size) > self.alloc.capacity:
            raise fault(
                413,
                "too_large",
                f"{size} bytes can never fit arena of {self.alloc.capacity} bytes",
                size=size,
            )
        deadline = time.monotonic() + timeout
        while True:
            freed = self._freed
            try:
                return self.alloc.alloc(size)
            except OutOfMemory:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise fault(
                        503,
                        "memory_pressure",
                        f"rank {self.rank}: no room for {size} bytes within {timeout:.3f}s "
                        f"(used {self.alloc.used_bytes}/{self.alloc.capacity}, "
                        f"largest free {self.alloc.largest_free})",
                        size=size,
                        rank=self.rank,
                    ) from None
                try:
                    await asyncio.wait_for(freed.wait(), remaining)
                except TimeoutError:
                    continue

    # ------------------------------------------------------------------ client endpoints

    async def on_info(self, req: InfoRequest) -> InfoReply:
        """Who we are, where our arena and TCP listener are."""
        assert self.arena is not None
        return InfoReply(
            request_id=req.request_id,
            rank=self.rank,
            node=self.node,
            instance=self.instance,
            version=__version__,
            arena=self.arena.name,
            arena_bytes=self.alloc.capacity,
            tcp_host=self.tcp_host,
            tcp_port=self.tcp_port,
            ttl_s=self.ttl_s,
            prefaulted=self.prefault,
        )

    async def on_stats(self, req: StatsRequest) -> StatsReply:
        """Arena usage and counters (the leak test's ground truth)."""
        return StatsReply(
            request_id=req.request_id,
            rank=self.rank,
            instance=self.instance,
            arena_bytes=self.alloc.capacity,
            used_bytes=self.alloc.used_bytes,
            free_bytes=self.alloc.free_bytes,
            largest_free_block=self.alloc.largest_free,
            free_blocks=self.alloc.free_blocks,
            allocations=self.alloc.allocations,
            held_entries=len(self._held),
            mailbox_entries=self.mailbox.slot_count(),
            pending_allocs=len(self._allocs),
            expired_total=self.expired_total,
            lost_total=self.lost_total,
            known_peers={str(r): i for r, i in self._peer_instances.items()},
        )

    async def on_alloc(self, req: AllocRequest) -> AllocReply:
        """Reserve space a producer will write into (copy-in or :meth:`Sidecar.alloc_tensor`)."""
        assert self.arena is not None
        offset = await self._allocate(req.size, req.timeout)
        self._allocs[offset] = time.monotonic()
        return AllocReply(
            request_id=req.request_id,
            instance=self.instance,
            arena=self.arena.name,
            offset=offset,
            size=req.size,
        )

    async def on_free(self, req: FreeRequest) -> OkReply:
        """Return an allocation that will not be sent."""
        self._check_instance(req.instance, "allocation")
        if req.offset not in self._allocs:
            raise fault(404, "not_found", f"no unsent allocation at offset {req.offset}")
        del self._allocs[req.offset]
        self._free(req.offset)
        return OkReply(request_id=req.request_id, instance=self.instance)

    def _check_instance(self, instance: str, what: str) -> None:
        if instance != self.instance:
            raise fault(
                410,
                "data_lost",
                f"rank {self.rank} restarted: the {what} belonged to instance {instance}, "
                f"now {self.instance}",
                rank=self.rank,
            )

    async def on_send(self, req: SendRequest) -> OkReply:
        """Take ownership of the written bytes and announce them to every destination rank."""
        assert self.arena is not None
        deadline = time.monotonic() + req.timeout
        key = (req.id, req.chunk_id)
        loc = req.location
        if key in self._held:
            raise fault(
                409, "bad_request", f"id {req.id!r} chunk {req.chunk_id} is already in flight from here"
            )
        offset: int | None = None
        if loc.transport == "shm":
            self._check_instance(req.instance, "allocation")
            if loc.arena != self.arena.name or loc.offset not in self._allocs:
                raise fault(
                    400, "bad_request", f"offset {loc.offset} of {loc.arena!r} is not an unsent allocation"
                )
            if aligned(loc.size) > self.alloc.size_of(loc.offset) or loc.size < loc.meta.nbytes:
                raise fault(400, "bad_request", "location size does not match its allocation/meta")
            offset = loc.offset
        ranks = list(dict.fromkeys(r for group in req.dst_ranks for r in group))
        # Resolve every destination before delivering anything: an unreachable rank fails the send fast.
        try:
            peers = await asyncio.gather(*(self._peer(r, deadline) for r in ranks))
        except ServiceFault:
            if offset is not None:
                del self._allocs[offset]
                self._free(offset)
            raise
        if offset is not None:
            del self._allocs[offset]
        held = Held(offset=offset, gpu=loc.transport == "cuda_ipc")
        self._held[key] = held
        if req.num_chunks is None:
            self._streams_out[req.id] = (req.dst_ranks, time.monotonic())  # refreshed by every chunk
        results = await asyncio.gather(
            *(self._deliver_to(p, req, held, deadline) for p in peers), return_exceptions=True
        )
        self._maybe_release(key)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return OkReply(request_id=req.request_id, instance=self.instance)

    async def _deliver_to(self, peer: InfoReply, req: SendRequest, held: Held, deadline: float) -> None:
        loc = req.location
        if peer.node == self.node:
            if loc.transport == "cuda_ipc" and loc.node != self.node:
                raise fault(400, "bad_request", "CUDA IPC location from another node")
            msg = DeliverRequest(
                id=req.id,
                chunk_id=req.chunk_id,
                num_chunks=req.num_chunks,
                source_rank=self.rank,
                source_instance=self.instance,
                dst_rank=peer.rank,
                location=loc.model_copy(update={"node": self.node, "rank": self.rank}),
            )
            held.pending_local.add(peer.rank)
            try:
                await self._deliver_msg(peer.rank, msg, deadline)
            except BaseException:
                held.pending_local.discard(peer.rank)
                raise
        elif loc.transport == "cuda_ipc":
            # Across nodes the GPU bytes stay with the producer's client; the consumer's client pulls
            # them over NCCL. We only announce where to pull from and keep the entry until it is done.
            msg = DeliverRequest(
                id=req.id,
                chunk_id=req.chunk_id,
                num_chunks=req.num_chunks,
                source_rank=self.rank,
                source_instance=self.instance,
                dst_rank=peer.rank,
                location=loc.model_copy(update={"transport": "nccl", "cuda_handle": "", "rank": self.rank}),
            )
            held.pending_local.add(peer.rank)
            try:
                await self._deliver_msg(peer.rank, msg, deadline)
            except BaseException:
                held.pending_local.discard(peer.rank)
                raise
        else:
            # While the bytes stream out of our arena they must not be freed, even if every same-node
            # consumer releases meanwhile: count the transfer as a local user until it completes.
            held.pending_local.add(peer.rank)
            try:
                await self._tcp_send(peer, req, deadline)
            finally:
                held.pending_local.discard(peer.rank)
            if peer.rank not in held.released:
                held.pending_remote.add(peer.rank)

    async def _deliver_msg(self, rank: int, msg: DeliverRequest, deadline: float) -> None:
        if rank == self.rank:
            await self.on_deliver(msg)
            return
        await self._peer_request(rank, SidecarVerb.DELIVER, msg, OkReply, deadline)

    def _maybe_release(self, key: tuple[str, int]) -> None:
        held = self._held.get(key)
        if held is None:
            return
        if not held.pending_local and held.offset is not None:
            self._free(held.offset)
            held.offset = None
        if not held.pending_local and not held.pending_remote:
            del self._held[key]
            if held.gpu:
                # The producer's client keeps the GPU tensor alive until it hears this.
                self._spawn(self._publish_released([key]))

    async def _publish_released(self, keys: list[tuple[str, int]]) -> None:
        event = ReleasedEvent(instance=self.instance, keys=[Key(id=i, chunk_id=c) for i, c in keys])
        await self.nc.publish(sidecar_released_subject(self.rank), event.model_dump_json().encode())

    async def on_close(self, req: CloseStreamRequest) -> OkReply:
        """Announce a stream's final length to its destinations."""
        known = self._streams_out.get(req.id)
        groups = req.dst_ranks or (known[0] if known is not None else None)
        if groups is None:
            raise fault(
                404,
                "unknown_stream",
                f"stream {req.id!r} was never sent from rank {self.rank}; pass dst_ranks",
            )
        deadline = time.monotonic() + req.timeout
        ranks = list(dict.fromkeys(r for g in groups for r in g))
        msgs = [
            DeliverRequest(
                id=req.id,
                chunk_id=0,
                num_chunks=req.num_chunks,
                source_rank=self.rank,
                source_instance=self.instance,
                dst_rank=r,
            )
            for r in ranks
        ]
        await asyncio.gather(*(self._peer(r, deadline) for r in ranks))
        await asyncio.gather(*(self._deliver_msg(m.dst_rank, m, deadline) for m in msgs))
        self._streams_out.pop(req.id, None)
        return OkReply(request_id=req.request_id, instance=self.instance)

    async def on_recv(self, req: RecvRequest) -> RecvReply:
        """Long-poll for a chunk: answers as soon as it is here, or with a typed error at the deadline."""
        deadline = time.monotonic() + req.timeout
        while True:
            reply = self._try_recv(req)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not await self.mailbox.wait_change(req.id, remaining):
                raise fault(
                    504,
                    "recv_timeout",
                    f"rank {self.rank}: id {req.id!r} chunk {req.chunk_id} "
                    f"did not arrive within {req.timeout:.3f}s",
                    id=req.id,
                    chunk_id=req.chunk_id,
                    rank=self.rank,
                )

    def _try_recv(self, req: RecvRequest) -> RecvReply | None:
        done_len = self.mailbox.finished.get(req.id)
        box = self.mailbox.boxes.get(req.id)
        if box is None and done_len is not None:
            if req.chunk_id >= done_len:
                return RecvReply(request_id=req.request_id, instance=self.instance, end_of_stream=True)
            raise fault(
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
                return RecvReply(request_id=req.request_id, instance=self.instance, location=slot.location)
            kind = {"done": "already_consumed", "lost": "data_lost", "expired": "data_expired"}[slot.state]
            raise fault(
                410,
                kind,
                f"id {req.id!r} chunk {req.chunk_id} is {slot.state} on rank {self.rank}"
                + (f": {slot.reason}" if slot.reason else ""),
                id=req.id,
                chunk_id=req.chunk_id,
                rank=self.rank,
            )
        if box.num_chunks is not None and req.chunk_id >= box.num_chunks:
            return RecvReply(request_id=req.request_id, instance=self.instance, end_of_stream=True)
        return None

    async def on_done(self, req: DoneRequest) -> OkReply:
        """Handle a consumer finishing a chunk: free our copy or tell the source to."""
        ok = OkReply(request_id=req.request_id, instance=self.instance)
        box = self.mailbox.boxes.get(req.id)
        slot = box.chunks.get(req.chunk_id) if box is not None else None
        if slot is None:
            if req.id in self.mailbox.finished:
                return ok  # idempotent
            raise fault(
                404,
                "not_found",
                f"id {req.id!r} chunk {req.chunk_id} was never delivered to rank {self.rank}",
            )
        if slot.state != "ready":
            return ok
        self._consume(req.id, req.chunk_id, slot, state="done", reason="")
        self.mailbox.retire_if_finished(req.id)
        self.mailbox.wake(req.id)
        return ok

    def _consume(self, id_: str, chunk_id: int, slot: Slot, state: str, reason: str) -> None:
        """Leave the ready state: free owned bytes, or release the source's bytes."""
        slot.state = state  # type: ignore[assignment]
        slot.reason = reason
        slot.location = None
        if slot.owned_offset is not None:
            self._free(slot.owned_offset)
            slot.owned_offset = None
        msg = ReleaseRequest(
            key=Key(id=id_, chunk_id=chunk_id), dst_rank=self.rank, source_instance=slot.source_instance
        )
        if slot.source_rank == self.rank:
            self._release_local(msg)
        else:
            self._spawn(self._send_release(slot.source_rank, msg))

    async def _send_release(self, rank: int, msg: ReleaseRequest) -> None:
        try:
            await request(self.nc, sidecar_subject(rank, SidecarVerb.RELEASE), msg, OkReply, PEER_TIMEOUT_S)
        except (NoResponders, RequestTimeout, ServiceErrorReply) as exc:
            # The source is gone or restarted; its memory went with it (or its TTL reclaims it).
            logger.warning("release of %s to rank %d failed: %s", msg.key, rank, exc)

    # ------------------------------------------------------------------ peer endpoints

    async def on_deliver(self, req: DeliverRequest) -> OkReply:
        """Accept a source announcing a chunk (or a stream's length) for one of our consumers."""
        box = self.mailbox.box(req.id)
        if req.num_chunks is not None:
            box.num_chunks = req.num_chunks
        if req.location is not None:
            old = box.chunks.get(req.chunk_id)
            if old is not None and old.state == "ready":
                raise fault(
                    409,
                    "bad_request",
                    f"id {req.id!r} chunk {req.chunk_id} is already waiting on rank {self.rank}",
                )
            owned = (
                req.location.offset
                if req.source_rank != self.rank and req.location.arena == self._arena_name
                else None
            )
            box.chunks[req.chunk_id] = Slot(
                state="ready",
                source_rank=req.source_rank,
                source_instance=req.source_instance,
                location=req.location,
                owned_offset=owned,
            )
        self.mailbox.retire_if_finished(req.id)
        self.mailbox.wake(req.id)
        return OkReply(request_id=req.request_id, instance=self.instance)

    @property
    def _arena_name(self) -> str:
        assert self.arena is not None
        return self.arena.name

    async def on_release(self, req: ReleaseRequest) -> OkReply:
        """Handle a destination being done with a chunk we hold."""
        self._release_local(req)
        return OkReply(request_id=req.request_id, instance=self.instance)

    def _release_local(self, req: ReleaseRequest) -> None:
        if req.source_instance != self.instance:
            logger.info("ignoring release of %s for previous instance %s", req.key, req.source_instance)
            return
        key = (req.key.id, req.key.chunk_id)
        held = self._held.get(key)
        if held is None:
            return
        held.released.add(req.dst_rank)
        held.pending_local.discard(req.dst_rank)
        held.pending_remote.discard(req.dst_rank)
        self._maybe_release(key)

    async def on_notice(self, req: NoticeRequest) -> OkReply:
        """Record chunks a source says will never be readable (lost or expired)."""
        self._mark(
            req.kind, req.source_rank, [(k.id, k.chunk_id) for k in req.keys], req.reason, only_shm_of=None
        )
        return OkReply(request_id=req.request_id, instance=self.instance)

    def _mark(
        self,
        kind: NoticeKind,
        source_rank: int,
        keys: list[tuple[str, int]],
        reason: str,
        only_shm_of: str | None,
    ) -> None:
        for id_, chunk in keys:
            box = self.mailbox.box(id_)
            slot = box.chunks.get(chunk)
            if slot is None:
                box.chunks[chunk] = Slot(
                    state=kind, source_rank=source_rank, source_instance="", reason=reason
                )
            elif slot.state == "ready":
                self._consume(id_, chunk, slot, state=kind, reason=reason)
            else:
                continue
            if kind == "lost":
                self.lost_total += 1
            else:
                self.expired_total += 1
            self.mailbox.wake(id_)

    async def _on_up(self, msg: Msg) -> None:
        try:
            event = UpEvent.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.warning("malformed up event: %s", exc)
            return
        if event.rank == self.rank:
            if event.instance != self.instance:
                logger.error("another instance %s now claims rank %d", event.instance, self.rank)
            return
        old = self._peer_instances.get(event.rank)
        if old == event.instance:
            return
        self._peer_instances[event.rank] = event.instance
        self._peers.pop(event.rank, None)
        if old is not None:
            logger.warning("peer rank %d restarted (%s -> %s)", event.rank, old, event.instance)
        # Even without having seen the old instance's announcement, slots naming another instance of
        # that rank point into an arena that no longer exists.
        self._on_peer_restart(event.rank, event.instance)

    def _on_peer_restart(self, rank: int, new_instance: str) -> None:
        # As destination: chunks whose bytes lived in the restarted server's arena are gone.
        lost: list[tuple[str, int]] = []
        for id_, box in self.mailbox.boxes.items():
            for chunk, slot in box.chunks.items():
                gone = slot.source_rank == rank and slot.source_instance != new_instance
                if slot.state == "ready" and gone and slot.owned_offset is None:
                    lost.append((id_, chunk))
        self._mark("lost", rank, lost, f"sidecar rank {rank} restarted", only_shm_of=None)
        # As source: the restarted destination forgot what we announced; tell its new instance.
        told: list[Key] = []
        for key, held in list(self._held.items()):
            if rank in held.pending_local or rank in held.pending_remote:
                told.append(Key(id=key[0], chunk_id=key[1]))
                held.pending_local.discard(rank)
                held.pending_remote.discard(rank)
                self._maybe_release(key)
        if told:
            note = NoticeRequest(
                kind="lost",
                keys=told,
                source_rank=self.rank,
                reason=f"sidecar rank {rank} restarted before delivery",
            )
            self._spawn(self._send_notice(rank, note))

    async def _send_notice(self, rank: int, note: NoticeRequest) -> None:
        try:
            await request(self.nc, sidecar_subject(rank, SidecarVerb.NOTICE), note, OkReply, PEER_TIMEOUT_S)
        except (NoResponders, RequestTimeout, ServiceErrorReply) as exc:
            logger.warning("notice %s to rank %d failed: %s", note.kind, rank, exc)

    # ------------------------------------------------------------------ peers

    async def _peer(self, rank: int, deadline: float) -> InfoReply:
        """Info of a destination rank (cached); raises 'unreachable' naming the rank."""
        if rank == self.rank:
            return await self.on_info(InfoRequest())
        cached = self._peers.get(rank)
        if cached is not None:
            return cached
        info = await self._peer_request(rank, SidecarVerb.INFO, InfoRequest(), InfoReply, deadline)
        self._peers[rank] = info
        self._peer_instances.setdefault(rank, info.instance)
        return info

    async def _peer_request(
        self, rank: int, verb: SidecarVerb, msg: BaseModel, reply: type[R], deadline: float
    ) -> R:
        timeout = max(0.001, min(PEER_TIMEOUT_S, deadline - time.monotonic()))
        try:
            return await request(self.nc, sidecar_subject(rank, verb), msg, reply, timeout)
        except NoResponders:
            self._peers.pop(rank, None)
            raise fault(
                502,
                "unreachable",
                f"destination sidecar rank {rank} is unreachable (no responders)",
                rank=rank,
            ) from None
        except RequestTimeout:
            self._peers.pop(rank, None)
            raise fault(
                504,
                "unreachable",
                f"destination sidecar rank {rank} did not answer within {timeout:.3f}s",
                rank=rank,
            ) from None
        except ServiceErrorReply as exc:
            raise fault(
                int(exc.code) if exc.code.isdigit() else 500,
                exc.error.error,
                exc.error.message,
                **exc.error.details,
            ) from None

    # ------------------------------------------------------------------ TCP path

    async def _tcp_allocate(self, header: TcpHeader) -> tuple[int, memoryview]:
        assert self.arena is not None
        if header.dst_rank != self.rank:
            raise Refusal("bad_request", f"this is rank {self.rank}, not {header.dst_rank}")
        try:
            offset = await self._allocate(header.size, header.timeout)
        except ServiceFault as f:
            raise Refusal(f.error, f.message) from None
        return offset, self.arena.view[offset : offset + header.size]

    async def _tcp_land(self, header: TcpHeader, offset: int) -> None:
        """Bytes from another node are in our arena: hold them as a local slot."""
        assert self.arena is not None
        loc = Location(
            arena=self.arena.name,
            offset=offset,
            size=header.size,
            meta=header.meta,
            node=self.node,
            rank=header.source_rank,
        )
        deliver = DeliverRequest(
            id=header.id,
            chunk_id=header.chunk_id,
            num_chunks=header.num_chunks,
            source_rank=header.source_rank,
            source_instance=header.source_instance,
            dst_rank=self.rank,
            location=loc,
        )
        try:
            await self.on_deliver(deliver)
        except ServiceFault as f:
            raise Refusal(f.error, f.message) from None

    def _tcp_abandon(self, offset: int) -> None:
        self._free(offset)

    async def _tcp_send(self, peer: InfoReply, req: SendRequest, deadline: float) -> None:
        """Stream the chunk's bytes from our arena into the peer's arena."""
        assert self.arena is not None
        loc = req.location
        remaining = max(0.001, deadline - time.monotonic())
        header = TcpHeader(
            request_id=req.request_id,
            id=req.id,
            chunk_id=req.chunk_id,
            num_chunks=req.num_chunks,
            source_rank=self.rank,
            source_instance=self.instance,
            dst_rank=peer.rank,
            meta=loc.meta,
            size=loc.size,
            timeout=remaining,
        )
        payload = self.arena.view[loc.offset : loc.offset + loc.size]
        where = f"destination sidecar rank {peer.rank} (TCP {peer.tcp_host}:{peer.tcp_port})"
        try:
            await push(peer.tcp_host, peer.tcp_port, header, payload, remaining)
        except TransferRefused as r:
            raise fault(503, r.error, f"rank {peer.rank}: {r.message}", rank=peer.rank) from None
        except TimeoutError:
            raise fault(504, "unreachable", f"{where}: transfer timed out", rank=peer.rank) from None
        except (ProtocolError, OSError) as exc:
            raise fault(502, "unreachable", f"{where}: {exc}", rank=peer.rank) from None

    # ------------------------------------------------------------------ TTL

    async def _reap_forever(self) -> None:
        interval = min(5.0, max(0.05, self.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.reap()

    def reap(self) -> None:
        """Free whatever nobody claimed within the TTL, and say so in the log."""
        now = time.monotonic()
        cutoff = now - self.ttl_s
        for offset, created in list(self._allocs.items()):
            if created < cutoff:
                del self._allocs[offset]
                self._free(offset)
                logger.warning(
                    "rank %d: unsent allocation at %d expired after %.1fs", self.rank, offset, self.ttl_s
                )
        notices: dict[int, list[Key]] = {}
        for key, held in list(self._held.items()):
            if held.created < cutoff and held.offset is None and not held.pending_local and not held.gpu:
                # Only a record that TCP destinations have not finished yet: no memory is involved.
                del self._held[key]
                continue
            if held.created < cutoff:
                logger.warning(
                    "rank %d: id %r chunk %d unclaimed by ranks %s for %.1fs; freeing",
                    self.rank,
                    key[0],
                    key[1],
                    sorted(held.pending_local | held.pending_remote),
                    self.ttl_s,
                )
                for r in held.pending_local:
                    notices.setdefault(r, []).append(Key(id=key[0], chunk_id=key[1]))
                if held.offset is not None:
                    self._free(held.offset)
                del self._held[key]
                if held.gpu:
                    self._spawn(self._publish_released([key]))
                self.expired_total += 1
        for rank, keys in notices.items():
            note = NoticeRequest(
                kind="expired", keys=keys, source_rank=self.rank, reason=f"unclaimed for {self.ttl_s}s"
            )
            if rank == self.rank:
                self._spawn(self.on_notice(note))
            else:
                self._spawn(self._send_notice(rank, note))
        for id_, (_, started) in list(self._streams_out.items()):
            if started < cutoff:
                logger.warning(
                    "rank %d: stream %r never closed within %.1fs; forgetting it", self.rank, id_, self.ttl_s
                )
                del self._streams_out[id_]
        for id_, box in list(self.mailbox.boxes.items()):
            for chunk, slot in box.chunks.items():
                if slot.state == "ready" and slot.owned_offset is not None and slot.since < cutoff:
                    logger.warning(
                        "rank %d: received id %r chunk %d unclaimed for %.1fs; freeing",
                        self.rank,
                        id_,
                        chunk,
                        self.ttl_s,
                    )
                    self._consume(id_, chunk, slot, state="expired", reason=f"unclaimed for {self.ttl_s}s")
                    self.expired_total += 1
            if box.touched < cutoff and not any(s.state == "ready" for s in box.chunks.values()):
                del self.mailbox.boxes[id_]


class SidecarSettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of `cornserve-sidecar`."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "sidecar", "cornserve-sidecar", "Cornserve tensor forwarding sidecar server"
    )

    rank: int = Field(ge=0)
    """Global sidecar rank (one per device)."""
    node: str = Field(min_length=1)
    """Node id; same node = shared memory, else TCP."""
    arena_bytes: int = Field(default=1 << 30, gt=0)
    """Shared-memory arena size (default 1 GiB)."""
    ttl_seconds: float = Field(default=300.0, gt=0)
    """Free data nobody claims after this long."""
    tcp_host: str = "127.0.0.1"
    """Address to bind and advertise for cross-node transfers."""
    tcp_port: int = Field(default=0, ge=0, lt=65536)
    """TCP port for cross-node transfers (0 = any)."""
    prefault: bool = False
    """Touch every arena page at start: commits the memory, avoids first-touch page faults on sends."""


SERVER_FIELDS = {"rank", "node", "nats_url", "arena_bytes", "tcp_host", "tcp_port", "prefault"}
"""Settings that `SidecarServer` takes under the same name."""


def serve(settings: SidecarSettings) -> AbstractAsyncContextManager[None]:
    """One rank, served while the context is open (the server holds its own NATS connection)."""
    return running(SidecarServer(ttl_s=settings.ttl_seconds, **settings.model_dump(include=SERVER_FIELDS)))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cornserve-sidecar`` console script."""
    sys.exit(run_process(SidecarSettings, serve, argv=argv))


if __name__ == "__main__":
    main()
