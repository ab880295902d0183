"""The executor's invocation channel: unary invocations in frames (`cornserve.bus.invoke_channel`).

Why: the aiohttp server's per-request work was ~40% of an executor's CPU on a two-stage graph;
a dispatcher keeps one connection here and sends every unary invocation on it, with many in
flight at once. Each call runs as its own task through the same admission, parsing, handler and
error answers as ``POST /invoke`` (`ExecutorServer.admit`/`answer`), so the two paths answer the
same statuses and bodies. A ``CANCEL`` frame, or the connection closing, cancels the call's task,
as a closed HTTP connection does (aiohttp's ``handler_cancellation``).

The listener binds the same host as the HTTP port and takes no credentials, like the HTTP port
(docs/security.md, "Executor HTTP ports"). A frame over the limit, of an unknown kind, with
invalid meta, or reusing an id in flight closes its connection with a logged reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from cornserve.bus import invoke_channel as wire

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
"""A reply waits this long for a peer that stopped reading; then the connection is closed."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a call answers: the HTTP status and body ``POST /invoke`` would have answered."""

    status: int
    body: bytes
    retry_after: str | None = None


class Invoker(Protocol):
    """The executor side a channel calls (`ExecutorServer`)."""

    def admit(self) -> Answer | None:
        """Count a call in flight (None), or the refusal to answer at once (503 not ready, 429 full)."""

    def release(self) -> None:
        """Count an admitted call out (it answered, failed or was cancelled, maybe before it started)."""

    def answer(self, meta: wire.CallMeta, body: bytes) -> Awaitable[Answer]:
        """Run one admitted call: parse, handler, the answer ``POST /invoke`` would give."""


class ChannelServer:
    """The listener and its connections; `close` stops accepting, cancels calls, closes connections."""

    def __init__(self, invoker: Invoker, max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES) -> None:
        self._invoker = invoker
        self._max_frame_bytes = max_frame_bytes
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on `host:port` (the HTTP port's host)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)

    def close(self) -> None:
        """Stop listening and close every connection (their calls are cancelled)."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close("the executor is stopping")

    async def wait_closed(self, timeout_s: float) -> None:
        """Until the listener is closed (bounded)."""
        if self._server is not None:
            async with asyncio.timeout(timeout_s):
                await self._server.wait_closed()


class _Connection(wire.ChannelProtocol):
    """One dispatcher's connection: frames in, a task per call, replies out in any order."""

    def __init__(self, owner: ChannelServer) -> None:
        super().__init__()
        self._owner = owner
        self._reader = wire.FrameReader(owner._max_frame_bytes)
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._peer = "?"

    # ----- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._peer = str(transport.get_extra_info("peername"))
        self._owner._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connections.discard(self)
        self._writable.set()  # writers waiting see the closed transport and give up
        for task in self._calls.values():
            task.cancel()  # the caller is gone, as a closed HTTP connection
        self._calls.clear()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
            for frame in frames:
                self._on_frame(frame)
        except wire.FrameError as exc:
            self.close(f"malformed frame: {exc}")

    # ----- frames ---------------------------------------------------------------------------------

    def _on_frame(self, frame: wire.Frame) -> None:
        if frame.kind == wire.CALL:
            meta = wire.parse_call(frame)
            if frame.request_id in self._calls:
                raise wire.FrameError(f"call {frame.request_id} is already in flight on this connection")
            refused = self._owner._invoker.admit()
            if refused is not None:
                self._write(frame.request_id, refused)
                return
            request_id = frame.request_id
            task = asyncio.get_running_loop().create_task(self._serve(request_id, meta, frame.body))
            self._calls[request_id] = task
            # A done callback, not a `finally`: a task cancelled before its first step never runs its body.
            task.add_done_callback(lambda _: self._done(request_id, task))
        elif frame.kind == wire.CANCEL:
            running = self._calls.pop(frame.request_id, None)
            if running is not None:  # else it already answered: the reply crossed the cancel
                running.cancel()
        else:
            raise wire.FrameError(f"a {frame.kind} frame (a reply) is not something a caller sends")

    def _done(self, request_id: int, task: asyncio.Task[None]) -> None:
        if self._calls.get(request_id) is task:
            del self._calls[request_id]
        self._owner._invoker.release()

    async def _serve(self, request_id: int, meta: wire.CallMeta, body: bytes) -> None:
        try:
            answer = await self._owner._invoker.answer(meta, body)
        except Exception as exc:  # answer() turns failures into answers: this is a bug, still answered
            logger.exception("invocation channel call %d failed unexpectedly", request_id)
            text = f"{type(exc).__name__}: {exc}"
            answer = Answer(500, json.dumps({"error": f"the executor failed: {text}"}).encode())
        self._calls.pop(request_id, None)  # a cancel from now on finds nothing: the reply is on its way
        if not self._writable.is_set():
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    await self._writable.wait()
            except TimeoutError:
                self.close(f"the peer read no reply for {DRAIN_TIMEOUT_S:g} s")
                return
        self._write(request_id, answer)

    def _write(self, request_id: int, answer: Answer) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        meta = wire.reply_meta(answer.status, answer.retry_after)
        size = wire.REST_HEAD_BYTES + len(meta) + len(answer.body)
        if size > self._owner._max_frame_bytes:
            # Sent as is, the caller would refuse the frame and close the connection under every call on it.
            message = f"the output's {size} bytes are over the invocation channel's frame limit of {self._owner._max_frame_bytes}"
            logger.warning("call %d: %s", request_id, message)
            answer = Answer(500, json.dumps({"error": message}).encode())
            meta = wire.reply_meta(answer.status)
        transport.write(wire.encode(wire.REPLY, request_id, meta, answer.body))

    def close(self, reason: str) -> None:
        """Close the connection (its calls are cancelled by `connection_lost`)."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            if reason != "the executor is stopping":
                logger.warning("closing the invocation channel from %s: %s", self._peer, reason)
            transport.close()
