"""The dispatcher's side of executors' invocation channels (`cornserve.bus.invoke_channel`).

Why: a unary invocation over HTTP cost the aiohttp client ~0.2 ms of CPU per call on top of the
executor's server; here one connection per executor carries every unary invocation, each a call
frame answered by a reply frame with the same id, many in flight at once. `GraphRunner` uses it
for executors that advertise a channel (`RouteReply.channel`) and HTTP for everything else
(streams, executors without one).

Failures keep HTTP's shapes: a connection that cannot be opened raises `ChannelRefused` (what
aiohttp's ClientConnectorError was: nothing reached the executor), a connection that breaks or
sends a malformed frame fails every call in flight on it with `ChannelBroken`, and a call whose
caller is cancelled sends a cancel frame so the executor cancels its handler (as a closed HTTP
connection did). Every wait is bounded: opening a connection by `connect_timeout_s`, a call by
its `timeout_s` (the graph's remaining time), a write by the same deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cornserve.bus import invoke_channel as wire

logger = logging.getLogger(__name__)


class ChannelError(Exception):
    """A channel call that got no answer."""


class ChannelRefused(ChannelError):
    """The connection could not be opened: nothing reached the executor."""


class ChannelBroken(ChannelError):
    """The connection closed or broke the format while the call was in flight."""


@dataclass(frozen=True, slots=True)
class ChannelReply:
    """An executor's answer: the HTTP status and body ``POST /invoke`` would have given."""

    status: int
    body: bytes
    retry_after: str | None


class ExecutorChannels:
    """One connection per executor channel address, opened on first use and again after it closed."""

    def __init__(
        self, *, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES, connect_timeout_s: float = 10.0
    ) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.connect_timeout_s = connect_timeout_s
        self._connections: dict[str, _Connection] = {}
        self._opening: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def call(
        self, address: str, path: str, body: bytes, trace: Mapping[str, str], timeout_s: float
    ) -> ChannelReply:
        """Send one call to the channel at `address` (``host:port``) and wait for its reply.

        Raises ChannelRefused, ChannelBroken, or TimeoutError past `timeout_s`; cancelling the caller
        sends a cancel frame.
        """
        async with asyncio.timeout(timeout_s):
            connection = await self._connection(address)
            return await connection.call(path, body, trace)

    async def close(self) -> None:
        """Close every connection (their calls fail as broken)."""
        self._closed = True
        for connection in list(self._connections.values()):
            connection.close("the dispatcher is stopping")
        self._connections.clear()

    def open_connections(self) -> int:
        """How many connections are open (for tests and diagnostics)."""
        return sum(1 for c in self._connections.values() if c.open)

    async def _connection(self, address: str) -> _Connection:
        connection = self._connections.get(address)
        if connection is not None and connection.open:
            return connection
        # One connect per address at a time: the calls that arrive meanwhile use the one it opens.
        lock = self._opening.setdefault(address, asyncio.Lock())
        async with lock:
            if self._closed:
                raise ChannelBroken("the dispatcher is stopping")
            connection = self._connections.get(address)
            if connection is None or not connection.open:
                connection = await self._open(address)
                self._connections[address] = connection
            return connection

    def _forget(self, connection: _Connection) -> None:
        """A closed connection leaves the pool (an executor restarted on a new port is never called again here)."""
        if self._connections.get(connection.address) is connection:
            del self._connections[connection.address]
            lock = self._opening.get(connection.address)
            if lock is not None and not lock.locked():
                del self._opening[connection.address]

    async def _open(self, address: str) -> _Connection:
        host, sep, port_text = address.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ChannelRefused(f"{address!r} is not a host:port channel address")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(address, self.max_frame_bytes, self._forget),
                    host.strip("[]"),
                    int(port_text),
                )
        except TimeoutError:
            raise ChannelRefused(f"connecting to {address} took over {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise ChannelRefused(f"{type(exc).__name__}: {exc}") from None
        return connection


class _Connection(wire.ChannelProtocol):
    """One open channel: calls out, replies in (any order), matched by request id."""

    def __init__(self, address: str, max_frame_bytes: int, on_lost: Callable[[_Connection], None]) -> None:
        super().__init__()
        self.address = address
        self._on_lost = on_lost
        self._reader = wire.FrameReader(max_frame_bytes)
        self._pending: dict[int, asyncio.Future[ChannelReply]] = {}
        self._next_id = 0
        self._lost: str | None = None

    @property
    def open(self) -> bool:
        return self._lost is None and self._transport is not None and not self._transport.is_closing()

    async def call(self, path: str, body: bytes, trace: Mapping[str, str]) -> ChannelReply:
        if not self._writable.is_set():
            await self._writable.wait()  # the caller's deadline bounds it
        transport = self._transport
        if self._lost is not None or transport is None or transport.is_closing():
            raise ChannelBroken(self._lost or "the connection is closed")
        self._next_id += 1
        request_id = self._next_id
        reply: asyncio.Future[ChannelReply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        transport.write(wire.encode(wire.CALL, request_id, wire.call_meta(path, dict(trace)), body))
        try:
            return await reply
        except asyncio.CancelledError:
            # The caller gave up (its graph failed or timed out, its client left): stop the handler.
            if self._pending.pop(request_id, None) is not None and not transport.is_closing():
                transport.write(wire.encode(wire.CANCEL, request_id))
            raise

    def close(self, reason: str) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._fail(reason)

    # ----- asyncio.Protocol -----------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(
            f"the connection closed ({type(exc).__name__}: {exc})"
            if exc
            else "the executor closed the connection"
        )

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self._reader.feed(data):
                if frame.kind != wire.REPLY:
                    raise wire.FrameError(f"a kind-{frame.kind} frame is not something an executor sends")
                meta = wire.parse_reply(frame)
                reply = self._pending.pop(frame.request_id, None)
                if reply is not None and not reply.done():  # else: cancelled, the reply crossed the cancel
                    reply.set_result(ChannelReply(meta.status, frame.body, meta.retry_after))
        except wire.FrameError as exc:
            logger.warning("closing the invocation channel to %s: malformed frame: %s", self.address, exc)
            self.close(f"the executor sent a malformed frame: {exc}")

    def _fail(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            self._on_lost(self)
        self._writable.set()
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            if not reply.done():
                reply.set_exception(ChannelBroken(reason))
