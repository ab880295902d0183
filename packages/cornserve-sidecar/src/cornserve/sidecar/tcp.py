"""Framing and socket setup for the cross-node data path between sidecar servers.

A transfer is: header frame -> receiver allocates and answers ready -> raw payload bytes sent
straight from the source arena and received straight into the destination arena
(``sock_recv_into`` on a memoryview slice: no intermediate Python buffers) -> receiver answers done.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import TypeVar

from pydantic import BaseModel

from cornserve.bus.sidecar import TcpAck, TcpHeader

SOCKET_BUFFER_BYTES = 16 * 1024 * 1024
"""Requested SO_SNDBUF/SO_RCVBUF; the kernel caps it at net.core.[rw]mem_max."""

RECV_CHUNK_BYTES = 8 * 1024 * 1024
"""Largest single recv_into; bounded so progress is steady and the loop stays responsive."""

MAX_FRAME_BYTES = 1024 * 1024
_LEN = struct.Struct("!I")
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


__all__ = ["TcpAck", "TcpHeader", "recv_exactly_into", "recv_frame", "send_frame", "tune"]
