"""Framing and socket setup for the cross-node data path between sidecar servers.

A transfer is: header frame -> receiver allocates and answers ready -> raw payload bytes sent
straight from the source arena and received straight into the destination arena
(``sock_recv_into`` on a memoryview slice: no intermediate Python buffers) -> receiver answers done.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cornserve.bus.sidecar import TcpAck, TcpHeader
from cornserve.sidecar.tasks import BackgroundTasks

SOCKET_BUFFER_BYTES = 16 * 1024 * 1024
"""Requested SO_SNDBUF/SO_RCVBUF; the kernel caps it at net.core.[rw]mem_max."""

RECV_CHUNK_BYTES = 8 * 1024 * 1024
"""Largest single recv_into; bounded so progress is steady and the loop stays responsive."""

MAX_FRAME_BYTES = 1024 * 1024
HEADER_TIMEOUT_S = 5.0
ACK_GRACE_S = 1.0
_LEN = struct.Struct("!I")
logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)


class ProtocolError(Exception):
    """The peer broke the framing (closed early, oversized frame, bad JSON)."""


def tune(sock: socket.socket) -> None:
    """Big buffers, no Nagle, non-blocking (driven by the event loop)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)


async def recv_exactly_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely from ``sock``."""
    loop = asyncio.get_running_loop()
    pos, total = 0, len(view)
    while pos < total:
        n = await loop.sock_recv_into(sock, view[pos : min(total, pos + RECV_CHUNK_BYTES)])
        if n == 0:
            raise ProtocolError(f"peer closed the connection after {pos} of {total} bytes")
        pos += n


async def send_frame(sock: socket.socket, model: BaseModel) -> None:
    """Length-prefixed JSON frame."""
    body = model.model_dump_json().encode()
    await asyncio.get_running_loop().sock_sendall(sock, _LEN.pack(len(body)) + body)


async def recv_frame(sock: socket.socket, model: type[M]) -> M:
    """Read one length-prefixed JSON frame as ``model``."""
    head = bytearray(_LEN.size)
    await recv_exactly_into(sock, memoryview(head))
    (length,) = _LEN.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    body = bytearray(length)
    await recv_exactly_into(sock, memoryview(body))
    return model.model_validate_json(body)


class TransferRefused(Exception):
    """The receiving server answered with an error (``error`` is a sidecar error kind)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Refusal(Exception):
    """Raised by a receiver callback to refuse a transfer with a typed error."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


Allocate = Callable[[TcpHeader], Awaitable[tuple[int, memoryview]]]
"""Reserve room for the header's payload (waiting up to its deadline): (owner's token, destination view)."""
Land = Callable[[TcpHeader, int], Awaitable[None]]
"""The payload is in place at the reservation ``token``: take ownership of it."""
Abandon = Callable[[int], None]
"""The transfer failed after allocation: give reservation ``token`` back."""


class TcpReceiver:
    """Accepts transfers from peer servers; bytes go straight into views the owner hands out."""

    def __init__(self, host: str, port: int, allocate: Allocate, land: Land, abandon: Abandon) -> None:
        self.host = host
        self.port = port
        self._allocate = allocate
        self._land = land
        self._abandon = abandon
        self._listener: socket.socket | None = None
        self._tasks = BackgroundTasks(logger, "TCP receiver task")

    def start(self) -> int:
        """Bind and start accepting; returns the bound port."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.bind((self.host, self.port))
        sock.listen(64)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._listener = sock
        self._tasks.spawn(self._accept_forever(sock))
        return self.port

    async def close(self) -> None:
        """Stop accepting and cancel transfers in progress."""
        if self._listener is not None:
            self._listener.close()
        await self._tasks.close()

    async def _accept_forever(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, addr = await loop.sock_accept(listener)
            tune(conn)
            self._tasks.spawn(self._receive(conn, addr))

    async def _receive(self, conn: socket.socket, addr: object) -> None:
        """One transfer: header -> allocate -> ready -> payload -> land -> done."""
        token: int | None = None
        try:
            header = await asyncio.wait_for(recv_frame(conn, TcpHeader), HEADER_TIMEOUT_S)
            # The owner's allocate() answers by header.timeout; the grace lets that answer go out.
            async with asyncio.timeout(header.timeout + ACK_GRACE_S):
                try:
                    token, view = await self._allocate(header)
                except Refusal as r:
                    await send_frame(conn, TcpAck(ok=False, error=r.error, message=r.message))
                    return
                await send_frame(conn, TcpAck(ok=True))
                await recv_exactly_into(conn, view)
                del view
                try:
                    await self._land(header, token)
                except Refusal as r:
                    await send_frame(conn, TcpAck(ok=False, error=r.error, message=r.message))
                    return
                token = None  # owned by the receiver's owner now
                await send_frame(conn, TcpAck(ok=True))
        except (ProtocolError, OSError, TimeoutError, ValidationError) as exc:
            logger.warning("TCP transfer from %s failed: %s", addr, exc)
        finally:
            if token is not None:
                self._abandon(token)
            conn.close()


async def push(host: str, port: int, header: TcpHeader, payload: memoryview, timeout: float) -> None:
    """Send one chunk to a peer's :class:`TcpReceiver`, straight from ``payload``.

    Raises OSError (connect/IO), :class:`ProtocolError`, TimeoutError or :class:`TransferRefused`.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        tune(sock)
        # The receiver works to header.timeout; the grace lets its typed refusal (e.g. memory
        # pressure at its deadline) reach us instead of our own timeout firing first.
        async with asyncio.timeout(timeout + 2 * ACK_GRACE_S):
            await loop.sock_connect(sock, (host, port))
            await send_frame(sock, header)
            ready = await recv_frame(sock, TcpAck)
            if not ready.ok:
                raise TransferRefused(ready.error, ready.message)
            await loop.sock_sendall(sock, payload)
            done = await recv_frame(sock, TcpAck)
            if not done.ok:
                raise TransferRefused(done.error, done.message)
    finally:
        sock.close()
