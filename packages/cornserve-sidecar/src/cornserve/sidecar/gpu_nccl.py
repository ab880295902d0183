"""NCCL between GPU clients on different nodes: unique ids, communicators, bounded operations.

One communicator per (peer, direction): a link this client *sends* on to ``peer`` and another it
*receives* on from ``peer``, so two ranks pulling from each other at the same time use different
communicators and never wait on each other. Each link carries one transfer at a time (the client
holds a lock per link), so the n-th send on one side always pairs with the n-th receive on the other.

The consumer makes the unique id (``cupy.cuda.nccl.get_unique_id()``: 128 ``bytes`` in CuPy 14)
whenever it has no link, and carries it, hex, in its pull request; a pull with an id tells the
producer that the consumer's old link is gone, so the producer aborts its own and joins the new one.

Every operation runs on the link's own stream and is bounded: on a timeout, an error or a
cancellation the communicator is aborted (``ncclCommAbort`` also ends a kernel still waiting for its
peer) and discarded, never reused, so a later transfer cannot pair with a half-finished operation.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cornserve.sidecar import gpu
from cornserve.sidecar.errors import BadRequest, GpuTransferFailed, GpuUnavailable, SidecarTimeout

logger = logging.getLogger(__name__)

UNIQUE_ID_BYTES = 128
"""``NCCL_UNIQUE_ID_BYTES``: the size of ``ncclUniqueId``."""
_UID_HEX = re.compile(f"[0-9a-f]{{{2 * UNIQUE_ID_BYTES}}}")

Direction = Literal["send", "recv"]
SENDER_INDEX = 0
RECEIVER_INDEX = 1


def check_unique_id(uid: object) -> bytes:
    """Return ``uid`` when it is what ``NcclCommunicator(ndev, bytes commId, rank)`` takes."""
    if not isinstance(uid, bytes):
        raise GpuUnavailable(
            f"NCCL unique id is a {type(uid).__name__}, not bytes: the GPU paths need CuPy >= {gpu.MIN_CUPY_MAJOR}"
        )
    if len(uid) != UNIQUE_ID_BYTES:
        raise GpuUnavailable(f"NCCL unique id has {len(uid)} bytes, not {UNIQUE_ID_BYTES}")
    return uid


def new_unique_id() -> bytes:
    """A fresh NCCL unique id (the consumer of a new link makes it)."""
    from cupy.cuda import nccl

    return check_unique_id(nccl.get_unique_id())


def uid_to_wire(uid: bytes) -> str:
    """The unique id as it travels in a pull request: lowercase hex."""
    return check_unique_id(uid).hex()


def uid_from_wire(value: object) -> bytes:
    """Parse a unique id received from the bus; :class:`BadRequest` unless exactly 256 hex digits."""
    if not isinstance(value, str):
        raise BadRequest(f"NCCL unique id must be a hex string, got {type(value).__name__}")
    if not _UID_HEX.fullmatch(value):
        raise BadRequest(
            f"NCCL unique id must be {2 * UNIQUE_ID_BYTES} lowercase hex digits, got {len(value)} chars"
        )
    return bytes.fromhex(value)


@dataclass
class NcclLink:
    """One communicator, the device it was built on and the stream its operations run on."""

    comm: Any
    device: int
    stream: Any
    """A ``torch.cuda.Stream`` of ``device`` (never the legacy default stream)."""
    nranks: int = 2
    aborted: bool = False

    def abort(self) -> None:
        """Abort the communicator (idempotent); pending NCCL kernels and blocked calls return."""
        if self.aborted:
            return
        self.aborted = True
        try:
            self.comm.abort()
        except Exception:
            logger.exception("ncclCommAbort failed (the communicator is discarded anyway)")


def _nccl_error(exc: BaseException) -> str:
    text = str(exc)
    if "invalid usage" in text.lower():
        text += (
            " (two ranks on one GPU are refused by NCCL, 'Duplicate GPU detected'; "
            "set NCCL_DEBUG=WARN to see NCCL's reason)"
        )
    return text


async def open_link(uid: bytes, nranks: int, index: int, device: int, deadline: float) -> NcclLink:
    """Build a communicator on ``device`` (blocks until every rank joined, so in a worker thread).

    ``ncclCommInitRank`` cannot be interrupted: on timeout the thread is abandoned and, should it
    still succeed later, aborts the communicator it made, so a late peer can never use it.
    """
    gpu.require_gpu()
    check_unique_id(uid)
    abandoned = threading.Event()
    guard = threading.Lock()
    made: list[Any] = []

    def init() -> Any:
        import cupy
        from cupy.cuda import nccl

        with cupy.cuda.Device(device):
            comm = nccl.NcclCommunicator(nranks, uid, index)
        with guard:
            if abandoned.is_set():
                comm.abort()
                return None
            made.append(comm)
        return comm

    def abandon() -> None:
        with guard:
            abandoned.set()
            for comm in made:  # finished just as the wait gave up: nobody will use it
                comm.abort()

    try:
        comm = await asyncio.wait_for(asyncio.to_thread(init), max(0.0, deadline - time.monotonic()))
    except asyncio.CancelledError:
        abandon()
        raise
    except TimeoutError:
        abandon()
        raise SidecarTimeout(
            f"NCCL communicator on cuda:{device} was not complete before the deadline"
        ) from None
    except GpuUnavailable:
        raise
    except Exception as exc:  # cupy_backends...nccl.NcclError; its module needs CuPy to import
        raise GpuTransferFailed(f"NCCL communicator on cuda:{device}: {_nccl_error(exc)}") from exc
    return NcclLink(comm=comm, device=device, stream=gpu.new_stream(device), nranks=nranks)


NcclOp = Callable[[Any, int], None]
"""``op(comm, stream_ptr)`` enqueues NCCL calls on the link's stream."""


async def run(link: NcclLink, op: NcclOp, deadline: float, what: str) -> None:
    """Enqueue ``op`` on the link's stream and wait for it; abort the link on any failure."""

    def enqueue() -> gpu.Pollable:
        with torch.cuda.device(link.device):
            op(link.comm, int(link.stream.cuda_stream))
            done = gpu.new_event()
            done.record(link.stream)
            return done

    await bounded(link, enqueue, deadline, what)


async def bounded(link: NcclLink, enqueue: Callable[[], gpu.Pollable], deadline: float, what: str) -> None:
    """Run ``enqueue`` (NCCL calls, then an event) and wait for the event, all before ``deadline``.

    The enqueue itself may block (NCCL connects peers lazily on first use), so it runs in a worker
    thread; completion is polled. A timeout, an error or a cancellation aborts the link.
    """
    if link.aborted:
        raise GpuTransferFailed(f"{what}: the NCCL communicator was aborted")
    try:
        remaining = max(0.0, deadline - time.monotonic())
        try:
            done = await asyncio.wait_for(asyncio.to_thread(enqueue), remaining)
        except TimeoutError:
            raise SidecarTimeout(f"{what}: NCCL did not accept the operation before the deadline") from None
        await gpu.wait_event(done, deadline, what)
        link.comm.check_async_error()
    except SidecarTimeout:
        link.abort()
        raise
    except BaseException as exc:
        link.abort()
        if isinstance(exc, Exception) and not isinstance(exc, GpuTransferFailed):
            raise GpuTransferFailed(f"{what}: {_nccl_error(exc)}") from exc
        raise


class NcclLinks:
    """A client's links by (peer rank, direction); a discarded link is aborted, never reused."""

    def __init__(self) -> None:
        self._links: dict[tuple[int, Direction], NcclLink] = {}

    def get(self, peer: int, direction: Direction) -> NcclLink | None:
        """The live link with ``peer`` in ``direction``; an aborted one is forgotten here."""
        link = self._links.get((peer, direction))
        if link is not None and link.aborted:
            del self._links[(peer, direction)]
            return None
        return link

    def put(self, peer: int, direction: Direction, link: NcclLink) -> None:
        """Make ``link`` the one with ``peer`` in ``direction``, aborting the one it replaces."""
        old = self._links.get((peer, direction))
        if old is not None and old is not link:
            old.abort()
        self._links[(peer, direction)] = link

    def discard(self, peer: int, direction: Direction) -> None:
        """Abort and forget the link with ``peer`` in ``direction`` (the other side starts afresh)."""
        old = self._links.pop((peer, direction), None)
        if old is not None:
            old.abort()

    def close(self) -> None:
        """Abort every link (the client is closing)."""
        for link in self._links.values():
            link.abort()
        self._links.clear()


def send_op(tensor: torch.Tensor, peer_index: int) -> NcclOp:
    """NCCL-send a contiguous CUDA tensor's bytes to ``peer_index``."""
    nbytes = tensor.numel() * tensor.element_size()

    def op(comm: Any, stream: int) -> None:
        from cupy.cuda import nccl

        comm.send(tensor.data_ptr(), nbytes, nccl.NCCL_UINT8, peer_index, stream)

    return op


def recv_op(out: torch.Tensor, peer_index: int) -> NcclOp:
    """NCCL-receive into a preallocated contiguous CUDA tensor from ``peer_index``."""
    nbytes = out.numel() * out.element_size()

    def op(comm: Any, stream: int) -> None:
        from cupy.cuda import nccl

        comm.recv(out.data_ptr(), nbytes, nccl.NCCL_UINT8, peer_index, stream)

    return op


def self_exchange_op(src: torch.Tensor, out: torch.Tensor) -> NcclOp:
    """Send ``src`` to this rank and receive it into ``out`` inside one group call.

    The only NCCL point-to-point check one GPU allows: NCCL refuses two ranks on one GPU, and an
    ungrouped send to oneself would wait forever for a receive queued behind it.
    """

    def op(comm: Any, stream: int) -> None:
        from cupy.cuda import nccl

        nccl.groupStart()
        try:
            send_op(src, 0)(comm, stream)
            recv_op(out, 0)(comm, stream)
        finally:
            nccl.groupEnd()

    return op
