"""Requests to a same-node sidecar server over its control socket (`localserver`).

Used by the client library for its own server and by a server for same-node peers. A connection
carries one request at a time; idle ones are pooled, and a request that finds none opens another,
so a long-waiting ``recv`` never delays a ``send``. Any failure of the socket itself (the server is
gone, restarted, or closed the connection) is :class:`LocalUnavailable`, after which callers use
NATS, which reaches whatever instance now serves the rank; a reply's error is
:class:`LocalErrorReply` (a :class:`ServiceErrorReply`, as over NATS), and a missed deadline the
bus's :class:`RequestTimeout`. Every request has a deadline; a connection whose request timed out is
closed (its late reply must not answer the next request).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cornserve.bus.micro import RequestTimeout, ServiceErrorReply
from cornserve.bus.schemas import ErrorReply
from cornserve.bus.sidecar import SidecarAck
from cornserve.bus.sidecar_local import (
    CHALLENGE_BYTES,
    HELLO,
    MAX_JSON_BYTES,
    MAX_TRACE_BYTES,
    OK,
    ONE_WAY,
    REPLY_HEAD,
    REQUEST_HEAD,
    LocalHello,
)
from cornserve.runtime.tracing import TRACEPARENT, inject_headers

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
T = TypeVar("T")

SMALL_PAYLOAD_BYTES = 256 << 10
"""A payload up to this size is copied behind its frame and written with it in one call."""
MAX_IDLE = 16
"""Idle connections kept per channel."""

HelloFactory = Callable[[str], LocalHello]
"""Builds a peer's hello for a connection's challenge."""


class LocalUnavailable(Exception):
    """The socket failed (connect refused, closed mid-request, garbled reply): fall back to NATS."""


class LocalErrorReply(ServiceErrorReply):
    """The server answered with a typed error: a :class:`ServiceErrorReply`, as over NATS.

    So callers map a server's error once, whichever transport carried it (`client`, `peers`).
    """

    def __init__(self, path: Path, code: int, error: ErrorReply) -> None:
        super().__init__(str(path), str(code), error)


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class LocalChannel:
    """A pool of connections to one server's control socket."""

    def __init__(self, path: Path, hello: HelloFactory | None = None) -> None:
        self.path = path
        self._hello = hello
        self._idle: list[_Conn] = []
        self._closed = False

    async def call(
        self, verb: str, msg: BaseModel, reply: type[R], timeout: float, payload: bytes | memoryview = b""
    ) -> R:
        """One request; raises the bus's :class:`RequestTimeout` at ``timeout``, as a NATS request would."""
        body = msg.model_dump_json().encode()
        code, answer = await self._on_connection(
            verb, timeout, lambda conn: _exchange(conn, verb, body, payload)
        )
        try:
            if code != OK:
                raise LocalErrorReply(self.path, code, ErrorReply.model_validate_json(answer))
            return reply.model_validate_json(answer)
        except ValidationError as exc:
            raise LocalUnavailable(f"control socket {self.path}: malformed reply: {exc}") from None

    async def tell(self, verb: str, msg: BaseModel, timeout: float) -> None:
        """One request without a reply (`ONE_WAY`): returns once it is written; no answer is read.

        Fails as :meth:`call` does (a connection is opened if none is idle).
        """
        body = msg.model_dump_json().encode()

        async def one_way(conn: _Conn) -> None:
            _write(conn, verb, body, b"", one_way=True)
            await conn.writer.drain()

        await self._on_connection(verb, timeout, one_way)

    async def _on_connection(self, verb: str, timeout: float, work: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run ``work`` on an idle (or new) connection within ``timeout``, then pool it again.

        A connection whose work failed or timed out is closed (a late reply must not answer the next
        request); a failure of the socket itself is :class:`LocalUnavailable`.
        """
        if self._closed:
            raise LocalUnavailable(f"channel to {self.path} is closed")
        conn: _Conn | None = None
        try:
            async with asyncio.timeout(timeout):
                conn = self._idle.pop() if self._idle else await self._open()
                result = await work(conn)
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise RequestTimeout(f"{self.path} ({verb})", timeout) from None
        except (OSError, asyncio.IncompleteReadError, LocalUnavailable) as exc:
            if conn is not None:
                conn.close()
            raise LocalUnavailable(f"control socket {self.path}: {exc!r}") from None
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._release(conn)
        return result

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        conn = _Conn(reader, writer)
        try:
            challenge = (await reader.readexactly(CHALLENGE_BYTES)).decode("ascii")
            if self._hello is not None:
                hello = self._hello(challenge)
                code, body = await _exchange(conn, HELLO, hello.model_dump_json().encode(), b"")
                if code != OK:
                    raise LocalUnavailable(f"peer hello refused: {body[:200]!r}")
                SidecarAck.model_validate_json(body)
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.close()
        else:
            self._idle.append(conn)

    def close(self) -> None:
        """Close every idle connection; calls in flight close theirs when they end."""
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _write(conn: _Conn, verb: str, body: bytes, payload: bytes | memoryview, one_way: bool = False) -> None:
    v = verb.encode("ascii")
    trace = inject_headers().get(TRACEPARENT, "").encode("ascii")[:MAX_TRACE_BYTES]
    verb_len = len(v) | (ONE_WAY if one_way else 0)
    frame = REQUEST_HEAD.pack(verb_len, len(body), len(payload), len(trace)) + v + trace + body
    if len(payload) <= SMALL_PAYLOAD_BYTES:
        # One write, so one segment: a payload written apart can wake the server for the head alone,
        # which then waits a second loop turn for the bytes (a small put's latency, measured).
        conn.writer.write(frame + payload if len(payload) else frame)
    else:
        conn.writer.write(frame)
        conn.writer.write(payload)


async def _exchange(conn: _Conn, verb: str, body: bytes, payload: bytes | memoryview) -> tuple[int, bytes]:
    _write(conn, verb, body, payload)
    await conn.writer.drain()
    head = await conn.reader.readexactly(REPLY_HEAD.size)
    code, n = REPLY_HEAD.unpack(head)
    if n > MAX_JSON_BYTES:
        raise LocalUnavailable(f"reply of {n} bytes is over the cap")
    return code, await conn.reader.readexactly(n)
