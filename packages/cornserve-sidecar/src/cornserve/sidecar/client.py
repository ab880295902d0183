"""The sidecar client library executors use: ``send`` / ``recv`` / ``mark_done`` and friends.

Control requests go over NATS to the local sidecar server of ``rank``; bytes are written into
that server's shared-memory arena by this process and read by consumers straight out of the
arena that holds them. Every call has a deadline and failures surface as
:mod:`cornserve.sidecar.errors` exceptions.

Return types: a torch tensor comes back as a torch tensor, a numpy array as a numpy array
(zero-copy, read-only views unless ``copy=True``), small objects as equal plain objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import torch
from nats.aio.client import Client
from pydantic import BaseModel

from cornserve.bus.error_codec import publish_error
from cornserve.bus.micro import NoResponders, RequestTimeout, ServiceErrorReply, request
from cornserve.bus.sidecar import (
    AllocReply,
    AllocRequest,
    CloseStreamRequest,
    DataMeta,
    DoneRequest,
    FreeRequest,
    InfoReply,
    InfoRequest,
    Location,
    NcclPullRequest,
    RecvReply,
    RecvRequest,
    ReleasedEvent,
    SendRequest,
    SidecarAck,
    StatsReply,
    StatsRequest,
)
from cornserve.bus.sidecar_local import PUT
from cornserve.bus.subjects import (
    SidecarVerb,
    sidecar_nccl_pull_subject,
    sidecar_released_subject,
    sidecar_subject,
)
from cornserve.runtime.nats import connect_nats
from cornserve.runtime.natsstop import current_budget
from cornserve.runtime.settings import nats_creds_from_env, nats_url_from_env
from cornserve.runtime.tracing import client_span, set_attributes
from cornserve.sidecar import gpu, gpu_ipc, gpu_nccl, spares
from cornserve.sidecar.arena import map_arena
from cornserve.sidecar.codec import Encoded, decode, encode, torch_dtype, torch_dtype_name
from cornserve.sidecar.directsend import ROOM_WAIT_S, DirectPeer, DirectPeers, sole_destination
from cornserve.sidecar.errors import (
    BadRequest,
    DataLost,
    GpuTransferFailed,
    RecvTimeout,
    SidecarError,
    SidecarTimeout,
    SidecarUnavailable,
    error_from_kind,
)
from cornserve.sidecar.localclient import LocalChannel, LocalUnavailable
from cornserve.sidecar.localsocket import checked_socket_path
from cornserve.sidecar.loop import LoopRunner, blocking, on_owner_loop
from cornserve.sidecar.spares import Spare, Spares
from cornserve.sidecar.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")


class _Unavailable:
    """The control socket could not carry a request (the caller uses NATS instead)."""


_UNAVAILABLE = _Unavailable()

DEFAULT_TIMEOUT_S = 60.0
REPLY_MARGIN_S = 5.0
"""Extra time a NATS request waits beyond the server-side deadline, so the server's typed error wins."""
INLINE_SEND_BYTES = 64 << 10
"""Copy sends up to this size go as one ``put`` over the control socket, their bytes riding along
(the server writes them into its arena); bigger ones reserve space first and are written here."""
SPARE_FREE_TIMEOUT_S = 2.0
"""Bound on giving back one spare reservation (and on waiting for reservations under way, at close)."""
LOCAL_RETRY_S = 1.0
"""After the control socket failed, calls use NATS for this long before trying the socket again."""


@dataclass
class _ReleaseWatch:
    """Released chunks of one watched id, and an event set whenever one more is released."""

    released: set[int]
    changed: asyncio.Event


@dataclass(frozen=True)
class _Region:
    instance: str
    offset: int
    size: int


class Sidecar:
    """Client of the sidecar server of ``rank`` on this node.

    Use ``async with Sidecar(rank) as sc`` (or :meth:`connect` / :meth:`close`); every operation has a
    generated ``*_sync`` twin for threads without an event loop.
    """

    def __init__(
        self,
        rank: int,
        nats_url: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        nats_creds: Path | None = None,
        keep_spares: bool = True,
        direct_sends: bool = True,
    ) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank
        self.nats_url = nats_url or nats_url_from_env()
        self.nats_creds = nats_creds or nats_creds_from_env()
        """The executor role's credentials file (the task manager sets ``CORNSERVE_NATS_CREDS``)."""
        self.timeout = timeout
        self._loop = LoopRunner(f"cornserve-sidecar-client-{rank}")
        self._nc: Client | None = None
        self._local: LocalChannel | None = None
        """Our server's same-node control socket (`localclient`); None: NATS only."""
        self._local_retry_at = 0.0
        """When a failed control socket may be tried again."""
        self._info: InfoReply | None = None
        self._own_map: mmap.mmap | None = None
        self._own_view: memoryview | None = None
        self._ro_maps: dict[str, mmap.mmap] = {}
        self._regions: dict[int, _Region] = {}
        self._gpu_hold: dict[tuple[str, int], tuple[torch.Tensor, gpu_ipc.IpcExport]] = {}
        """Staged copies of sent CUDA tensors, kept until the server reports every destination done."""
        self._ipc = gpu_ipc.IpcMappings()
        self._links = gpu_nccl.NcclLinks()
        self._link_locks: dict[tuple[int, gpu_nccl.Direction], asyncio.Lock] = {}
        self._nccl_recvd: dict[tuple[str, int], torch.Tensor] = {}
        self._pull_sub: Any = None
        self._watched: dict[str, _ReleaseWatch] = {}
        """Ids whose chunk releases a stream writer waits for (`watch_releases`)."""
        self._gpu_tasks = BackgroundTasks(logger, "NCCL send")
        self._keep_spares = keep_spares
        """Reserve the next block after a copy send of a size (`spares`); False: every send allocates."""
        self._spares = Spares()
        self._spare_tasks = BackgroundTasks(logger, "spare reservation")
        self._direct_sends = direct_sends
        """Send copies for one same-node rank to that rank's server (`directsend`); False: via our own."""
        self._direct = DirectPeers(rank)
        """Same-node ranks sends go to directly."""
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    @on_owner_loop
    async def connect(self) -> Sidecar:
        """Connect to NATS and check the server is there (raises SidecarUnavailable otherwise)."""
        await self._connect()
        return self

    async def _connect(self) -> None:
        if self._closed:
            raise SidecarError(f"sidecar client of rank {self.rank} is closed")
        if self._nc is None:
            deadline = min(self.timeout, 10.0)
            try:
                # With unlimited reconnects nats-py would retry the *first* connect forever too.
                nc = await asyncio.wait_for(
                    connect_nats(
                        self.nats_url,
                        name=f"cornserve-sidecar-client-{self.rank}",
                        creds=self.nats_creds,
                        connect_timeout_s=min(self.timeout, 2.0),
                        first_connect_deadline_s=deadline,
                    ),
                    deadline,
                )
            except Exception as exc:  # nats-py raises several unrelated types for "cannot connect"
                raise SidecarUnavailable(
                    f"cannot reach NATS at {self.nats_url} for sidecar rank {self.rank}: {exc!r}",
                    rank=self.rank,
                ) from exc
            self._nc = nc
            await self._nc.subscribe(sidecar_released_subject(self.rank), cb=self._on_released)
        if self._info is None:
            await self._refresh_info()

    async def _refresh_info(self) -> InfoReply:
        info = await self._call(SidecarVerb.INFO, InfoRequest(), InfoReply, self.timeout)
        if self._info is not None and self._info.instance != info.instance:
            logger.warning(
                "sidecar rank %d restarted (%s -> %s); data it held is lost",
                self.rank,
                self._info.instance,
                info.instance,
            )
        self._info = info
        if self._local is not None:
            self._local.close()
        path = checked_socket_path(info.local_socket)
        self._local = LocalChannel(path) if path is not None else None
        self._own_map = map_arena(info.arena, writable=True, populate=info.prefaulted)
        self._own_view = memoryview(self._own_map)
        return info

    @on_owner_loop
    async def close(self) -> None:
        """Close the NATS connection and stop the client's loop thread (idempotent)."""
        if not self._closed:
            await self._release_spares()
            await self._direct.close()
            if self._nc is not None:  # bounded, also when NATS is gone (cornserve.runtime.natsstop)
                await current_budget("sidecar client").close(self._nc)
                self._nc = None
            if self._local is not None:
                self._local.close()
                self._local = None
            # Views handed out keep their mappings alive; dropping our references lets GC unmap later.
            self._own_view = None
            self._own_map = None
            self._ro_maps.clear()
            self._links.close()
            for key in list(self._gpu_hold):
                self._drop_gpu_hold(key)
            self._closed = True
        self._loop.request_stop()

    async def __aenter__(self) -> Sidecar:
        return await self.connect()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ transport to our server

    async def _call(self, verb: SidecarVerb, msg: BaseModel, reply: type[R], timeout: float) -> R:
        if self._closed:
            raise SidecarError(f"sidecar client of rank {self.rank} is closed")
        if self._nc is None:
            await self._connect()
        assert self._nc is not None
        with self._typed_errors(verb.value, timeout):
            result = await self._call_local(verb.value, msg, reply, timeout)
            if result is None:
                result = await request(self._nc, sidecar_subject(self.rank, verb), msg, reply, timeout)
        return await self._check_instance(verb, result)

    @contextlib.contextmanager
    def _typed_errors(self, verb: str, timeout: float) -> Iterator[None]:
        """Turn a failed request to our server into a typed error, whichever transport carried it.

        The control socket reports failures as the bus's own types (`localclient`), so NATS and the
        socket share this one mapping.
        """
        try:
            yield
        except NoResponders as exc:
            raise SidecarUnavailable(
                f"sidecar rank {self.rank} is not running (no responders on {exc.subject})", rank=self.rank
            ) from None
        except RequestTimeout:
            raise SidecarTimeout(
                f"sidecar rank {self.rank} did not answer {verb} within {timeout:.3f}s"
            ) from None
        except ServiceErrorReply as exc:
            raise error_from_kind(exc.error.error, exc.error.message, exc.error.details) from None

    async def _call_local(
        self, verb: str, msg: BaseModel, reply: type[R], timeout: float, payload: memoryview | None = None
    ) -> R | None:
        """Ask over the control socket; None when it is unavailable (the caller uses NATS).

        A reply's error or a missed deadline raises the bus's types (see :meth:`_typed_errors`).
        """
        answer = await self._on_local(lambda local: local.call(verb, msg, reply, timeout, payload or b""))
        return None if answer is _UNAVAILABLE else cast(R, answer)

    async def _tell_local(self, verb: str, msg: BaseModel, timeout: float) -> bool:
        """Write a one-way request on the control socket; False when it is unavailable (use NATS)."""
        return await self._on_local(lambda local: local.tell(verb, msg, timeout)) is not _UNAVAILABLE

    async def _on_local(self, exchange: Callable[[LocalChannel], Awaitable[T]]) -> T | _Unavailable:
        """``exchange`` on the control socket (reopened if it failed before), or `_UNAVAILABLE`."""
        local = self._local
        if local is None:
            local = self._reopen_local()
            if local is None:
                return _UNAVAILABLE
        try:
            return await exchange(local)
        except LocalUnavailable as exc:
            self._local_failed(local, exc)
            return _UNAVAILABLE

    def _local_failed(self, local: LocalChannel, exc: LocalUnavailable) -> None:
        """The control socket failed: use NATS, which reaches whichever instance serves the rank now."""
        logger.info("control socket of sidecar rank %d failed (%s); using NATS", self.rank, exc)
        if self._local is local:
            local.close()
            self._local = None
            self._local_retry_at = time.monotonic() + LOCAL_RETRY_S

    def _reopen_local(self) -> LocalChannel | None:
        """After a socket failure, try the known socket again (at most every ``LOCAL_RETRY_S``).

        A restarted server's new socket is learnt from its next reply naming the new instance; this
        covers a failure that was not a restart (a connection the server closed), so one failure does
        not pin the client to NATS for good.
        """
        if self._info is None or time.monotonic() < self._local_retry_at:
            return None
        self._local_retry_at = time.monotonic() + LOCAL_RETRY_S
        path = checked_socket_path(self._info.local_socket)
        if path is None:
            return None
        self._local = LocalChannel(path)
        return self._local

    async def _check_instance(self, verb: SidecarVerb, result: R) -> R:
        """Notice a restarted server from any reply naming its instance (remaps its arena)."""
        instance = getattr(result, "instance", None)
        if (
            instance is not None
            and self._info is not None
            and instance != self._info.instance
            and verb != SidecarVerb.INFO
        ):
            await self._refresh_info()
        return result

    # ------------------------------------------------------------------ send side

    @on_owner_loop
    async def alloc_tensor(
        self, shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Allocate a writable CPU tensor inside the sidecar arena.

        Build your output in it, then ``send`` it without any copy. After ``send`` the memory
        belongs to the sidecar; do not write to it.
        """
        shape = tuple(shape)
        await self._connect()
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        reply = await self._call(
            SidecarVerb.ALLOC,
            AllocRequest(size=nbytes, timeout=self.timeout),
            AllocReply,
            self.timeout + REPLY_MARGIN_S,
        )
        assert self._own_view is not None
        if nbytes == 0:
            t = torch.empty(shape, dtype=dtype)
        else:
            t = torch.frombuffer(self._own_view, dtype=dtype, count=numel, offset=reply.offset).view(shape)
        self._regions[t.data_ptr()] = _Region(reply.instance, reply.offset, nbytes)
        return t

    @on_owner_loop
    async def free_tensor(self, tensor: torch.Tensor) -> None:
        """Give back an :meth:`alloc_tensor` tensor that will not be sent (else the TTL reclaims it)."""
        region = self._regions.pop(tensor.data_ptr(), None)
        if region is None:
            raise BadRequest("tensor was not allocated with alloc_tensor (or was already sent/freed)")
        await self._call(
            SidecarVerb.FREE,
            FreeRequest(instance=region.instance, offset=region.offset),
            SidecarAck,
            self.timeout,
        )

    def send(
        self,
        data: Any,
        id: str,
        dst_ranks: list[list[int]],
        chunk_id: int = 0,
        num_chunks: int | None = 1,
        *,
        timeout: float | None = None,
        notify_released: bool = False,
    ) -> Coroutine[Any, Any, None]:
        """Send ``data`` as chunk ``chunk_id`` of ``id`` to every rank of every group in ``dst_ranks``.

        ``num_chunks=None`` starts a stream of unknown length; end it with :meth:`close_stream`.
        Returns once every destination sidecar has the chunk; waits for arena space up to ``timeout``.
        ``notify_released`` has the server announce when every destination is done with the chunk
        (see :meth:`wait_released`).
        A CUDA tensor is sent as its value at the call: work queued on the caller's current stream
        before ``send`` is waited for, and later writes to the tensor do not reach consumers.
        """
        # Runs on the caller's thread (also for send_sync): its current stream is the producer's.
        ready = gpu.capture(data) if isinstance(data, torch.Tensor) and data.device.type == "cuda" else None
        return self._send_owned(data, ready, id, dst_ranks, chunk_id, num_chunks, timeout, notify_released)

    @on_owner_loop
    async def _send_owned(
        self,
        data: Any,
        ready: gpu.ProducerReady | None,
        id: str,
        dst_ranks: list[list[int]],
        chunk_id: int,
        num_chunks: int | None,
        timeout: float | None,
        notify_released: bool,
    ) -> None:
        with client_span("sidecar.send", {"cornserve.sidecar.chunk_id": chunk_id}):
            id_, timeout = id, timeout or self.timeout
            await self._connect()
            assert self._info is not None
            _check_destinations(id_, dst_ranks, chunk_id, num_chunks)
            if ready is not None:
                await self._send_cuda(ready, id_, dst_ranks, chunk_id, num_chunks, timeout, notify_released)
                return
            region = self._zero_copy_region(data)
            encoded = None
            if region is None:
                encoded = encode(data)
                meta = encoded.meta
                sole = sole_destination(dst_ranks, num_chunks, notify_released, self.rank)
                if (
                    sole is not None
                    and self._direct_sends
                    and await self._send_direct(sole, encoded, id_, chunk_id, num_chunks, timeout)
                ):
                    return
                if meta.nbytes <= INLINE_SEND_BYTES and self._local is not None:
                    msg = SendRequest(
                        id=id_,
                        chunk_id=chunk_id,
                        num_chunks=num_chunks,
                        dst_ranks=dst_ranks,
                        instance=self._info.instance,
                        location=Location(
                            arena=self._info.arena, size=meta.nbytes, meta=meta, node=self._info.node
                        ),
                        timeout=timeout,
                        notify_released=notify_released,
                    )
                    set_attributes({"cornserve.bytes": meta.nbytes})
                    with self._typed_errors(PUT, timeout + REPLY_MARGIN_S):
                        put = await self._call_local(
                            PUT, msg, SidecarAck, timeout + REPLY_MARGIN_S, encoded.raw()
                        )
                    if put is not None:
                        await self._check_instance(SidecarVerb.SEND, put)
                        return
                spare, stale = self._spares.take(meta.nbytes, self._info.instance, self._info.ttl_s)
                for old in stale:
                    self._spare_tasks.spawn(self._free_spare(old))
                if spare is not None:  # reserved after an earlier send of this size: no round trip
                    region = _Region(spare.instance, spare.offset, meta.nbytes)
                else:
                    reply = await self._call(
                        SidecarVerb.ALLOC,
                        AllocRequest(size=meta.nbytes, timeout=timeout),
                        AllocReply,
                        timeout + REPLY_MARGIN_S,
                    )
                    region = _Region(reply.instance, reply.offset, meta.nbytes)
                assert self._own_view is not None
                try:
                    encoded.write_into(self._own_view, region.offset)
                except BaseException:
                    await self._call(
                        SidecarVerb.FREE,
                        FreeRequest(instance=region.instance, offset=region.offset),
                        SidecarAck,
                        self.timeout,
                    )
                    raise
            else:
                assert isinstance(data, torch.Tensor)
                meta = encode(data).meta  # metadata only: the tensor is contiguous so no copy is made
                self._regions.pop(data.data_ptr(), None)
            set_attributes({"cornserve.bytes": meta.nbytes})
            location = Location(
                transport="shm",
                arena=self._info.arena,
                offset=region.offset,
                size=meta.nbytes,
                meta=meta,
                node=self._info.node,
            )
            msg = SendRequest(
                id=id_,
                chunk_id=chunk_id,
                num_chunks=num_chunks,
                dst_ranks=dst_ranks,
                instance=region.instance,
                location=location,
                timeout=timeout,
                notify_released=notify_released,
            )
            await self._call(SidecarVerb.SEND, msg, SidecarAck, timeout + REPLY_MARGIN_S)
            if encoded is not None:
                self._keep_spare(meta.nbytes)

    async def _send_direct(
        self, rank: int, encoded: Encoded, id_: str, chunk_id: int, num_chunks: int | None, timeout: float
    ) -> bool:
        """Send a chunk straight to same-node ``rank``'s server (`directsend`); False: take the usual path.

        A small chunk rides a ``put``; a bigger one is written into a block of that server's arena (a
        spare reserved there, else an ``alloc``) and sent from there. The usual path is taken when the
        destination is not known (yet) to be on our node, when its socket fails, and when its arena
        has no room within `ROOM_WAIT_S` or is too small (the usual path waits for room in our own
        arena, as before). Its other errors are the send's.
        """
        assert self._nc is not None and self._info is not None
        peer = self._direct.peer(rank, self._nc, self._info.node)
        if peer is None:
            return False
        meta = encoded.meta
        info = peer.info

        def request(offset: int, room_wait: float) -> SendRequest:
            return SendRequest(
                id=id_,
                chunk_id=chunk_id,
                num_chunks=num_chunks,
                dst_ranks=[[rank]],
                instance=info.instance,
                location=Location(
                    arena=info.arena, offset=offset, size=meta.nbytes, meta=meta, node=info.node
                ),
                timeout=room_wait,
            )

        set_attributes({"cornserve.bytes": meta.nbytes, "cornserve.sidecar.direct_rank": rank})
        if meta.nbytes <= INLINE_SEND_BYTES:
            put = request(0, min(timeout, ROOM_WAIT_S))
            return await self._direct_call(peer, PUT, put, SidecarAck, timeout, encoded.raw()) is not None
        offset = await self._direct_block(peer, meta.nbytes)
        if offset is None:
            return False
        try:
            encoded.write_into(peer.view, offset)
        except BaseException:
            self._spare_tasks.spawn(self._free_spare(Spare(info.instance, offset, meta.nbytes), peer))
            raise
        sent = await self._direct_call(
            peer, SidecarVerb.SEND.value, request(offset, timeout), SidecarAck, timeout
        )
        if sent is None:  # the socket failed: the block went with its server, or its TTL reclaims it
            return False
        self._keep_spare(meta.nbytes, peer)
        return True

    async def _direct_block(self, peer: DirectPeer, size: int) -> int | None:
        """Where in ``peer``'s arena to write ``size`` bytes: a spare there, else a fresh ``alloc``."""
        spare, stale = peer.spares.take(size, peer.info.instance, peer.info.ttl_s)
        for old in stale:
            self._spare_tasks.spawn(self._free_spare(old, peer))
        if spare is not None:
            return spare.offset
        request = AllocRequest(size=size, timeout=ROOM_WAIT_S)
        reply = await self._direct_call(peer, SidecarVerb.ALLOC.value, request, AllocReply, ROOM_WAIT_S)
        return None if reply is None else reply.offset

    async def _direct_call(
        self,
        peer: DirectPeer,
        verb: str,
        msg: BaseModel,
        reply: type[R],
        timeout: float,
        payload: memoryview | None = None,
    ) -> R | None:
        """One request to a direct destination; None: take the usual path (see :meth:`_send_direct`)."""
        rank = peer.info.rank
        try:
            result = await peer.channel.call(verb, msg, reply, timeout + REPLY_MARGIN_S, payload or b"")
        except LocalUnavailable as exc:
            logger.info("direct %s to sidecar rank %d failed (%s); using the peer path", verb, rank, exc)
            self._direct.forget(rank)
            return None
        except RequestTimeout:
            raise SidecarTimeout(
                f"sidecar rank {rank} did not answer {verb} within {timeout + REPLY_MARGIN_S:.3f}s"
            ) from None
        except ServiceErrorReply as exc:
            if exc.error.error in ("memory_pressure", "too_large"):
                return None
            raise error_from_kind(exc.error.error, exc.error.message, exc.error.details) from None
        if getattr(result, "instance", peer.info.instance) != peer.info.instance:
            self._direct.forget(rank)  # restarted since we learnt it: learn it again on a later send
        return result

    # ------------------------------------------------------------------ spare reservations (`spares`)

    def _keep_spare(self, size: int, peer: DirectPeer | None = None) -> None:
        """After a copy send of ``size``: reserve the next block of that size in the background.

        In our own server's arena, or (``peer``) in the arena of a destination we send to directly.
        """
        if not self._keep_spares or self._closed or self._info is None:
            return
        held, arena_bytes = (
            (self._spares, self._info.arena_bytes) if peer is None else (peer.spares, peer.info.arena_bytes)
        )
        if not held.wants(size, arena_bytes):
            return
        held.reserving(size)
        self._spare_tasks.spawn(self._reserve_spare(size, peer))

    async def _reserve_spare(self, size: int, peer: DirectPeer | None) -> None:
        spare: Spare | None = None
        request = AllocRequest(size=size, timeout=spares.RESERVE_TIMEOUT_S, spare=True)
        try:
            if peer is None:
                reply = await self._call(
                    SidecarVerb.ALLOC, request, AllocReply, spares.RESERVE_TIMEOUT_S + REPLY_MARGIN_S
                )
            else:
                direct = await self._direct_call(
                    peer, SidecarVerb.ALLOC.value, request, AllocReply, spares.RESERVE_TIMEOUT_S
                )
                if direct is None:
                    raise SidecarError(f"sidecar rank {peer.info.rank} has no room or its socket failed")
                reply = direct
            spare = Spare(reply.instance, reply.offset, size)
        except SidecarError as exc:  # no room now, or the server is gone: the next send allocates
            rank = self.rank if peer is None else peer.info.rank
            logger.debug("no spare of %d bytes reserved on sidecar rank %d: %s", size, rank, exc)
        finally:
            kept = (self._spares if peer is None else peer.spares).reserved(spare, size)
        if spare is not None and not kept:
            await self._free_spare(spare, peer)

    async def _free_spare(self, spare: Spare, peer: DirectPeer | None = None) -> None:
        """Give a spare back (one of a previous server instance went with it)."""
        info = self._info if peer is None else peer.info
        if info is None or spare.instance != info.instance:
            return
        request = FreeRequest(instance=spare.instance, offset=spare.offset)
        timeout = min(self.timeout, SPARE_FREE_TIMEOUT_S)
        try:
            if peer is None:
                await self._call(SidecarVerb.FREE, request, SidecarAck, timeout)
            else:
                await self._direct_call(peer, SidecarVerb.FREE.value, request, SidecarAck, timeout)
        except SidecarError as exc:  # the TTL reclaims it
            logger.info("spare at offset %d of sidecar rank %d not freed: %s", spare.offset, info.rank, exc)

    async def _release_spares(self) -> None:
        """At close: let reservations under way end, then free every spare (bounded).

        Also those held in the arenas of destinations we send to directly.
        """
        await self._spare_tasks.settle(SPARE_FREE_TIMEOUT_S)
        for spare in self._spares.drain():
            await self._free_spare(spare)
        for peer in self._direct.known():
            for spare in peer.spares.drain():
                await self._free_spare(spare, peer)

    def _zero_copy_region(self, data: Any) -> _Region | None:
        """Return the arena region a tensor from :meth:`alloc_tensor` occupies, if it can be sent as is."""
        if not isinstance(data, torch.Tensor) or not self._regions:
            return None
        region = self._regions.get(data.data_ptr())
        if region is None or not data.is_contiguous():
            return None
        if self._info is None or region.instance != self._info.instance:
            logger.warning("tensor was allocated in a previous sidecar instance; copying it")
            self._regions.pop(data.data_ptr(), None)
            return None
        if data.numel() * data.element_size() > region.size:
            return None
        return region

    async def _send_cuda(
        self,
        ready: gpu.ProducerReady,
        id_: str,
        dst_ranks: list[list[int]],
        chunk_id: int,
        num_chunks: int | None,
        timeout: float,
        notify_released: bool = False,
    ) -> None:
        assert self._info is not None
        if (id_, chunk_id) in self._gpu_hold:
            raise BadRequest(f"id {id_!r} chunk {chunk_id} is already held for consumers by this client")
        src = ready.tensor
        meta = DataMeta(  # first: an unsupported dtype fails before any GPU work
            kind="cuda",
            dtype=torch_dtype_name(src.dtype),
            shape=list(src.shape),
            nbytes=src.numel() * src.element_size(),
        )
        gpu.check_ipc_allocator()  # before any copy: a clear error when the allocator cannot export
        # A private copy taken once the caller's stream reached `send` (see gpu_ipc: why a copy).
        staged = await gpu_ipc.stage(ready, time.monotonic() + timeout)
        exported = gpu_ipc.export(staged)
        self._gpu_hold[(id_, chunk_id)] = (staged, exported)  # until every consumer marked done
        try:
            location = Location(
                transport="cuda_ipc",
                offset=exported.offset,
                size=meta.nbytes,
                meta=meta,
                cuda_handle=exported.handle,
                device=exported.device,
                node=self._info.node,
            )
            await self._ensure_pull_subscription()
            msg = SendRequest(
                id=id_,
                chunk_id=chunk_id,
                num_chunks=num_chunks,
                dst_ranks=dst_ranks,
                instance=self._info.instance,
                location=location,
                timeout=timeout,
                notify_released=notify_released,
            )
            await self._call(SidecarVerb.SEND, msg, SidecarAck, timeout + REPLY_MARGIN_S)
        except BaseException:
            self._drop_gpu_hold((id_, chunk_id))
            raise

    def _drop_gpu_hold(self, key: tuple[str, int]) -> None:
        found = self._gpu_hold.pop(key, None)
        if found is not None:
            gpu_ipc.LOCAL_EXPORTS.remove(found[1].handle, found[1].offset)

    # ------------------------------------------------------------------ NCCL (GPU across nodes)

    def _link_lock(self, peer: int, direction: gpu_nccl.Direction) -> asyncio.Lock:
        # One transfer at a time per link: the n-th send pairs with the n-th receive on the other side.
        return self._link_locks.setdefault((peer, direction), asyncio.Lock())

    async def _ensure_pull_subscription(self) -> None:
        if self._pull_sub is None:
            assert self._nc is not None
            self._pull_sub = await self._nc.subscribe(sidecar_nccl_pull_subject(self.rank), cb=self._on_pull)

    async def _on_pull(self, msg: Any) -> None:
        """Serve a pull from a consumer on another node: acknowledge, then NCCL-send the chunk."""
        assert self._nc is not None
        try:
            req = NcclPullRequest.model_validate_json(msg.data)
            uid = gpu_nccl.uid_from_wire(req.nccl_uid) if req.nccl_uid else None
        except (ValueError, BadRequest) as exc:
            await self._reply_error(msg, "", 400, "bad_request", str(exc))
            return
        held = self._gpu_hold.get((req.id, req.chunk_id))
        if held is None:
            await self._reply_error(
                msg,
                req.request_id,
                410,
                "data_lost",
                f"rank {self.rank} no longer holds {req.id!r} chunk {req.chunk_id}",
            )
            return
        if uid is not None:
            # The consumer dropped its link (new, timed out, failed): ours is stale, end what runs on it.
            self._links.discard(req.dst_rank, "send")
        elif self._links.get(req.dst_rank, "send") is None:
            await self._reply_error(
                msg,
                req.request_id,
                409,
                GpuTransferFailed.kind,
                f"rank {self.rank} has no NCCL communicator for rank {req.dst_rank}; send a new unique id",
            )
            return
        assert self._info is not None
        await msg.respond(
            SidecarAck(request_id=req.request_id, instance=self._info.instance).model_dump_json().encode()
        )
        self._gpu_tasks.spawn(self._nccl_send(req.dst_rank, held[0], uid))

    async def _reply_error(self, msg: Any, request_id: str, code: int, kind: str, message: str) -> None:
        assert self._nc is not None
        await publish_error(self._nc, msg.reply, request_id, code, kind, message)

    async def _nccl_send(self, peer: int, tensor: torch.Tensor, uid: bytes | None) -> None:
        # Bounded: a consumer that died mid-transfer must not hold this link's lock forever.
        deadline = time.monotonic() + self.timeout
        async with self._link_lock(peer, "send"):
            if uid is not None:
                link = await gpu_nccl.open_link(
                    uid, 2, gpu_nccl.SENDER_INDEX, gpu.device_index(tensor.device), deadline
                )
                self._links.put(peer, "send", link)
            else:
                found = self._links.get(peer, "send")
                if found is None:  # aborted since the pull was acknowledged: the consumer times out
                    raise GpuTransferFailed(f"NCCL communicator with rank {peer} was aborted before the send")
                link = found
            if gpu.device_index(tensor.device) != link.device:
                with torch.cuda.device(link.device), torch.cuda.stream(link.stream):
                    tensor = tensor.to(f"cuda:{link.device}")
            await gpu_nccl.run(
                link, gpu_nccl.send_op(tensor, gpu_nccl.RECEIVER_INDEX), deadline, f"NCCL send to rank {peer}"
            )

    async def _nccl_pull(
        self, loc: Location, id_: str, chunk_id: int, timeout: float, device: int
    ) -> torch.Tensor:
        deadline = time.monotonic() + timeout
        src = loc.rank
        what = f"NCCL receive of {id_!r} chunk {chunk_id} from rank {src}"
        async with self._link_lock(src, "recv"):
            link = self._links.get(src, "recv")
            if link is not None and link.device != device:
                self._links.discard(src, "recv")
                link = None
            try:
                if link is not None:
                    try:
                        await self._request_pull(src, id_, chunk_id, "", deadline)
                    except GpuTransferFailed:  # the producer lost its side of the link: start afresh
                        self._links.discard(src, "recv")
                        link = None
                if link is None:
                    uid = gpu_nccl.new_unique_id()
                    await self._request_pull(src, id_, chunk_id, gpu_nccl.uid_to_wire(uid), deadline)
                    link = await gpu_nccl.open_link(uid, 2, gpu_nccl.RECEIVER_INDEX, device, deadline)
                    self._links.put(src, "recv", link)
                # Allocated on the device's current stream, like any tensor handed to the caller; the
                # link's stream first waits for that stream (a recycled block may still be read there).
                out = torch.empty(loc.meta.shape, dtype=torch_dtype(loc.meta.dtype), device=f"cuda:{device}")
                link.stream.wait_stream(torch.cuda.current_stream(device))
                await gpu_nccl.run(link, gpu_nccl.recv_op(out, gpu_nccl.SENDER_INDEX), deadline, what)
            except SidecarTimeout:
                raise RecvTimeout(f"{what} took longer than {timeout:.3f}s", id=id_) from None
        return out

    async def _request_pull(self, src: int, id_: str, chunk_id: int, uid: str, deadline: float) -> None:
        assert self._nc is not None
        req = NcclPullRequest(id=id_, chunk_id=chunk_id, dst_rank=self.rank, nccl_uid=uid)
        try:
            await request(
                self._nc,
                sidecar_nccl_pull_subject(src),
                req,
                SidecarAck,
                max(0.001, deadline - time.monotonic()),
            )
        except (NoResponders, RequestTimeout) as exc:
            raise DataLost(
                f"producer of rank {src} for {id_!r} chunk {chunk_id} is gone: {exc}", id=id_
            ) from None
        except ServiceErrorReply as exc:
            raise error_from_kind(exc.error.error, exc.error.message, exc.error.details) from None

    async def _on_released(self, msg: Any) -> None:
        event = ReleasedEvent.model_validate_json(msg.data)
        for key in event.keys:
            self._drop_gpu_hold((key.id, key.chunk_id))
            watch = self._watched.get(key.id)
            if watch is not None:
                watch.released.add(key.chunk_id)
                watch.changed.set()

    # ------------------------------------------------------------------ release notifications

    @on_owner_loop
    async def watch_releases(self, id: str) -> None:
        """Start recording releases of ``id``'s chunks sent with ``notify_released`` (before sending them)."""
        await self._connect()
        self._watched.setdefault(id, _ReleaseWatch(released=set(), changed=asyncio.Event()))

    @on_owner_loop
    async def wait_released(self, id: str, chunk_id: int, timeout: float | None = None) -> None:
        """Wait until every destination is done with chunk ``chunk_id`` of a watched ``id``.

        Raises :class:`SidecarTimeout` at the deadline (a consumer that stopped reading).
        """
        watch = self._watched.get(id)
        if watch is None:
            raise BadRequest(f"id {id!r} is not watched: call watch_releases before sending its chunks")
        t = timeout or self.timeout
        try:
            async with asyncio.timeout(t):
                while chunk_id not in watch.released:
                    watch.changed.clear()
                    await watch.changed.wait()
        except TimeoutError:
            raise SidecarTimeout(
                f"the consumers of {id!r} did not release chunk {chunk_id} within {t:.3f}s "
                f"(sidecar rank {self.rank})"
            ) from None
        watch.released.discard(chunk_id)

    @on_owner_loop
    async def unwatch_releases(self, id: str) -> None:
        """Stop recording releases of ``id`` (a finished or abandoned stream)."""
        self._watched.pop(id, None)

    @on_owner_loop
    async def close_stream(
        self,
        id: str,
        num_chunks: int,
        dst_ranks: list[list[int]] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """End a stream sent with ``num_chunks=None``: receives at ``chunk_id >= num_chunks`` return None."""
        t = timeout or self.timeout
        msg = CloseStreamRequest(id=id, num_chunks=num_chunks, dst_ranks=dst_ranks, timeout=t)
        await self._call(SidecarVerb.CLOSE, msg, SidecarAck, t + REPLY_MARGIN_S)

    # ------------------------------------------------------------------ receive side

    def recv(
        self,
        id: str,
        chunk_id: int = 0,
        timeout: float | None = None,
        *,
        copy: bool = False,
        device: torch.device | int | str | None = None,
    ) -> Coroutine[Any, Any, Any]:
        """Wait for chunk ``chunk_id`` of ``id`` (it may not have been sent yet).

        Tensors come back as zero-copy read-only views valid until :meth:`mark_done` (pass
        ``copy=True`` for a private, writable copy). Returns None past the end of a stream.
        Idempotent until :meth:`mark_done`. A CUDA tensor lands on, or is mapped into, ``device``
        (default: the caller's current CUDA device); GPU work reading a view must have finished
        (synchronize) before :meth:`mark_done`, after which the memory may be reused.
        """
        # On the caller's thread (also for recv_sync): the loop thread's current device is its own.
        captured = gpu.caller_device() if device is None else None
        return self._recv_owned(id, chunk_id, timeout, copy, device, captured)

    @on_owner_loop
    async def _recv_owned(
        self,
        id: str,
        chunk_id: int,
        timeout: float | None,
        copy: bool,
        device: torch.device | int | str | None,
        captured: int | None,
    ) -> Any:
        id_, timeout = id, timeout or self.timeout
        msg = RecvRequest(id=id_, chunk_id=chunk_id, timeout=timeout)
        with client_span("sidecar.recv", {"cornserve.sidecar.chunk_id": chunk_id}):
            reply = await self._call(SidecarVerb.RECV, msg, RecvReply, timeout + REPLY_MARGIN_S)
            if reply.location is not None:
                set_attributes({"cornserve.bytes": reply.location.size})
        if reply.end_of_stream:
            return None
        loc = reply.location
        assert loc is not None
        if loc.transport == "nccl":
            gpu.require_gpu()
            got = self._nccl_recvd.get((id_, chunk_id))
            if got is None:
                target = gpu.receive_device(device, captured)
                got = self._nccl_recvd[(id_, chunk_id)] = await self._nccl_pull(
                    loc, id_, chunk_id, timeout, target
                )
            return got.clone() if copy else got
        if loc.transport == "cuda_ipc":
            gpu.require_gpu()
            view = self._ipc.view((id_, chunk_id), loc, gpu.receive_device(device, captured))
            return view.clone() if copy else view
        mm = self._ro_maps.get(loc.arena)
        if mm is None:
            try:
                mm = self._ro_maps[loc.arena] = map_arena(loc.arena, writable=False)
            except FileNotFoundError:
                raise DataLost(
                    f"id {id_!r} chunk {chunk_id}: arena {loc.arena} is gone (its sidecar restarted)", id=id_
                ) from None
        return decode(loc.meta, mm, loc.offset, copy)

    @on_owner_loop
    async def mark_done(self, id: str, chunk_id: int = 0, *, wait: bool = True) -> None:
        """Release the chunk: views from :meth:`recv` must not be used afterwards.

        ``wait=False`` (after a ``copy=True`` receive, say) returns once the request is written to
        the server's control socket, without waiting for its answer: one round trip less on the
        caller's path, and a failure (an unknown id) is logged by the server instead of raised.
        Without a control socket it waits as usual.
        """
        self._nccl_recvd.pop((id, chunk_id), None)
        self._ipc.close((id, chunk_id))
        msg = DoneRequest(id=id, chunk_id=chunk_id)
        if not wait and self._local is not None:
            with self._typed_errors(SidecarVerb.DONE.value, self.timeout):
                if await self._tell_local(SidecarVerb.DONE.value, msg, self.timeout):
                    return
        await self._call(SidecarVerb.DONE, msg, SidecarAck, self.timeout)

    # ------------------------------------------------------------------ introspection

    @on_owner_loop
    async def stats(self) -> StatsReply:
        """Arena usage of our server."""
        return await self._call(SidecarVerb.STATS, StatsRequest(), StatsReply, self.timeout)

    @on_owner_loop
    async def info(self) -> InfoReply:
        """Identity of our server."""
        return await self._call(SidecarVerb.INFO, InfoRequest(), InfoReply, self.timeout)

    # ------------------------------------------------------------------ blocking twins (generated)

    connect_sync = blocking(connect)
    close_sync = blocking(close)
    alloc_tensor_sync = blocking(alloc_tensor)
    free_tensor_sync = blocking(free_tensor)
    send_sync = blocking(send)
    close_stream_sync = blocking(close_stream)
    watch_releases_sync = blocking(watch_releases)
    wait_released_sync = blocking(wait_released)
    unwatch_releases_sync = blocking(unwatch_releases)
    recv_sync = blocking(recv)
    mark_done_sync = blocking(mark_done)
    stats_sync = blocking(stats)
    info_sync = blocking(info)


def _check_destinations(id_: str, dst_ranks: list[list[int]], chunk_id: int, num_chunks: int | None) -> None:
    """Reject bad arguments before any memory is reserved."""
    if not id_:
        raise BadRequest("id must be a non-empty string")
    if not dst_ranks or any(not group for group in dst_ranks):
        raise BadRequest(f"dst_ranks must be a non-empty list of non-empty rank groups, got {dst_ranks!r}")
    if any(not isinstance(r, int) or r < 0 for group in dst_ranks for r in group):
        raise BadRequest(f"dst_ranks must hold non-negative integer ranks, got {dst_ranks!r}")
    if chunk_id < 0 or (num_chunks is not None and not 0 <= chunk_id < num_chunks):
        raise BadRequest(f"chunk_id {chunk_id} is outside num_chunks={num_chunks}")
