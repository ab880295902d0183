"""Where a streamed chat completion's chunks go: the HTTP response, or NATS straight to the caller.

A dispatcher that relays a graph's stream reads the executor's SSE response and publishes each
chunk on the caller's subject: one process hop, one parse and one publish per token. When its
request names that subject (`STREAM_SUBJECT_HEADER`) and this executor has a NATS connection, the
executor publishes the chunks there itself (`PublishedChunks`) and the HTTP body only tells the
dispatcher how the stream ended (`PublishedStreamEnd`); otherwise it writes SSE (`SseChunks`).
Both take each piece's chunks as JSON objects and send them in one write or one message.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Protocol

import nats.errors
from aiohttp import web
from nats.aio.client import Client

from cornserve.bus.control import (
    STREAM_PUBLISHED_HEADER,
    STREAM_SUBJECT_HEADER,
    PublishedStreamEnd,
    StreamMessage,
    stream_batches,
    stream_items_message,
)
from cornserve.llm_executor.errors import ExecutorRequestError
from cornserve.llm_executor.sse import sse_line
from cornserve.runtime.nats import connect_nats

logger = logging.getLogger(__name__)

PUBLISHED_HEADERS = {STREAM_PUBLISHED_HEADER: "1"}
"""The response header that tells the dispatcher the stream is published."""

BEAT_INTERVAL_S = 1.0
"""Least time between two newlines on a published stream's HTTP body (the dispatcher's idle deadline)."""
_SUBJECT = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
"""A plain subject (no wildcards, no blanks): the only kind a stream is published on."""
MAX_SUBJECT_CHARS = 256


class PublishFailed(ExecutorRequestError):
    """A chunk could not be published on the caller's subject (NATS gone, or a chunk over the payload limit)."""

    status = 503
    error_type = "stream_publish_failed"


class ChunkSink(Protocol):
    """Where a streamed completion's chunks go (each one JSON object, UTF-8)."""

    async def write(self, chunks: list[bytes]) -> None:
        """Send the chunks of one piece now, together."""

    async def finish(self, chunks: list[bytes]) -> None:
        """Send the last chunks and end the stream."""

    async def fail(self, error: bytes) -> None:
        """End the stream with `error` (an OpenAI error body's JSON) instead."""


class SseChunks:
    """The chunks as `data:` lines of the SSE response, `[DONE]` last."""

    def __init__(self, response: web.StreamResponse) -> None:
        self._response = response

    async def write(self, chunks: list[bytes]) -> None:
        """One write for the piece's lines."""
        await self._response.write(b"".join(sse_line(chunk) for chunk in chunks))

    async def finish(self, chunks: list[bytes]) -> None:
        """The last lines and `[DONE]` with the end of the body (one socket write)."""
        await self._response.write_eof(
            b"".join([*(sse_line(chunk) for chunk in chunks), sse_line(b"[DONE]")])
        )

    async def fail(self, error: bytes) -> None:
        """The error line is the stream's last."""
        await self._response.write_eof(sse_line(error))


class PublishedChunks:
    """The chunks as StreamMessages on the caller's subject; the HTTP body says how it ended.

    Numbered from 0, one message per piece (its chunks as `items` when there are several), the last
    chunks with `end`. The body carries a newline at most every `BEAT_INTERVAL_S` while chunks
    go out (the dispatcher's idle deadline sees the stream moving) and one `PublishedStreamEnd`
    line last; a failure's error is in that line and the dispatcher publishes it.
    """

    def __init__(self, nc: Client, subject: str, response: web.StreamResponse) -> None:
        self._nc = nc
        self._subject = subject
        self._response = response
        self._seq = 0
        self._items = 0
        self._beat = time.monotonic()

    async def write(self, chunks: list[bytes]) -> None:
        """Publish the piece's chunks; a newline to the dispatcher when the last one is a second old."""
        await self._publish(chunks, end=False)
        now = time.monotonic()
        if now - self._beat >= BEAT_INTERVAL_S:
            self._beat = now
            await self._response.write(b"\n")

    async def finish(self, chunks: list[bytes]) -> None:
        """Publish the last chunks with the end; then the body's last line."""
        if chunks:
            await self._publish(chunks, end=True)
        else:
            await self._send(StreamMessage(seq=self._seq, end=True).model_dump_json().encode())
        await self._end(PublishedStreamEnd(messages=self._seq, items=self._items, end=True))

    async def fail(self, error: bytes) -> None:
        """Leave the end to the dispatcher: the failure as the SSE line it would have read."""
        line = sse_line(error).decode().rstrip("\n")
        await self._end(PublishedStreamEnd(messages=self._seq, items=self._items, end=False, line=line))

    async def _end(self, last: PublishedStreamEnd) -> None:
        await self._response.write_eof(last.model_dump_json().encode() + b"\n")

    async def _publish(self, chunks: list[bytes], end: bool) -> None:
        """As few messages as the payload limit allows (`stream_batches`); the last one ends the stream if `end`."""
        batches = stream_batches(chunks, self._nc.max_payload)
        for index, batch in enumerate(batches):
            await self._send(stream_items_message(self._seq, batch, end=end and index == len(batches) - 1))
            self._items += len(batch)

    async def _send(self, message: bytes) -> None:
        try:
            await self._nc.publish(self._subject, message)
        except nats.errors.Error as exc:
            raise PublishFailed(
                f"could not publish the stream on NATS: {type(exc).__name__}: {exc}"
            ) from None
        self._seq += 1


class StreamPublisher:
    """The executor's NATS connection for published streams, opened in the background at start.

    Until it is connected (or when no NATS URL was configured, or it never connects) requests are
    answered with SSE as before, so an executor started by hand serves the same API.
    """

    def __init__(self, nats_url: str | None, creds: str | None, name: str) -> None:
        self._url = nats_url
        self._creds = creds
        self._name = name
        self._nc: Client | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.published = 0
        """Streams published (the `/stats` figure)."""

    def start(self) -> None:
        """Begin connecting (no-op without a NATS URL)."""
        if self._url is not None and self._connecting is None:
            self._connecting = asyncio.create_task(self._connect(self._url), name="stream-publisher-connect")

    async def _connect(self, url: str) -> None:
        try:
            self._nc = await connect_nats(url, name=self._name, creds=self._creds)
        except Exception as exc:  # serving goes on over SSE: say so once, with the reason
            logger.warning(
                "streams are answered over HTTP only: no NATS connection (%s: %s)", type(exc).__name__, exc
            )
            return
        logger.info("streams are published on NATS when the dispatcher asks (%s)", url)

    def target(self, request: web.Request) -> tuple[str, Client] | None:
        """The subject and connection to publish the request's stream on, when it asks and we can."""
        subject = request.headers.get(STREAM_SUBJECT_HEADER)
        nc = self._nc
        if subject is None or nc is None or not nc.is_connected:
            return None
        if len(subject) > MAX_SUBJECT_CHARS or not _SUBJECT.match(subject):
            logger.warning("ignoring a malformed %s header; streaming over HTTP", STREAM_SUBJECT_HEADER)
            return None
        return subject, nc

    def chunks(self, target: tuple[str, Client], response: web.StreamResponse) -> PublishedChunks:
        """The sink of one published stream (counted in `published`); `response` carries `PUBLISHED_HEADERS`."""
        self.published += 1
        subject, nc = target
        return PublishedChunks(nc, subject, response)

    async def close(self) -> None:
        """Stop connecting, flush and close the connection."""
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._nc is not None:
            try:
                await asyncio.wait_for(self._nc.drain(), timeout=5.0)
            except (TimeoutError, nats.errors.Error) as exc:
                logger.warning("closing the stream publisher's NATS connection: %s", exc)
