"""Writing streamed HTTP responses: NDJSON lines or server-sent events.

Items that come in a burst (an app yielding several items without waiting, e.g. the tokens of a
relayed stream whose reader fell behind) leave in one write instead of one each: the first item of
a loop iteration is written at once, the others sent in the same iteration are buffered and
written together as soon as the sender waits. An item sent alone is written as before.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

FLUSH_BYTES = 64 * 1024
"""A burst this large is written without waiting for the sender to pause."""


def wants_sse(request: web.Request) -> bool:
    """Whether the client asked for server-sent events."""
    return "text/event-stream" in request.headers.get("Accept", "")


class StreamWriter:
    """One streamed response; `send` writes an item, `fail` an error, `close` ends it."""

    def __init__(self, request: web.Request, status: int = 200) -> None:
        self._request = request
        self.sse = wants_sse(request)
        content_type = "text/event-stream" if self.sse else "application/x-ndjson"
        self.response = web.StreamResponse(
            status=status, headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._in_burst = False
        """An item was written in this loop iteration: the next ones wait for the burst's write."""
        self._flush: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        """Why a burst's write failed (the client went away): raised by the next send."""

    async def start(self) -> None:
        """Send the headers."""
        await self.response.prepare(self._request)

    def _encode(self, data: Any, event: str | None) -> bytes:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        if self.sse:
            head = f"event: {event}\n" if event else ""
            return f"{head}data: {text}\n\n".encode()
        return text.encode() + b"\n"

    async def send(self, data: Any, event: str | None = None) -> None:
        """Write one JSON item (as an NDJSON line or an SSE `data:` event)."""
        if self._error is not None:
            raise self._error
        chunk = self._encode(data, event)
        if not self._in_burst and self._flush is None and not self._pending:
            self._in_burst = True
            asyncio.get_running_loop().call_soon(self._end_burst)
            await self.response.write(chunk)
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= FLUSH_BYTES:
            await self._drain()

    def _end_burst(self) -> None:
        """The sender waited (a new loop iteration): write what it buffered meanwhile."""
        self._in_burst = False
        if self._pending and self._flush is None:
            self._flush = asyncio.ensure_future(self._write_pending())

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                data = b"".join(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
                await self.response.write(data)
        except (ConnectionError, RuntimeError) as exc:  # the client went away, or the response ended
            self._error = exc
            self._pending.clear()
            logger.debug("a streamed response's write failed: %s", exc)
        finally:
            self._flush = None

    async def _drain(self) -> None:
        """Everything sent so far is written (or its write failed: raised)."""
        if self._flush is not None:
            await asyncio.shield(self._flush)
        if self._pending and self._error is None:
            self._flush = asyncio.ensure_future(self._write_pending())
            await asyncio.shield(self._flush)
        if self._error is not None:
            raise self._error

    async def fail(self, body: dict[str, Any]) -> None:
        """Write an error item; the stream ends after it."""
        await self.send(body, event="error")

    async def close(self) -> web.StreamResponse:
        """End the stream (after everything sent so far is written)."""
        await self._drain()
        # The end event and the end of the body in one write (the client reads the end at once).
        await self.response.write_eof(b"event: end\ndata: {}\n\n" if self.sse else b"")
        return self.response
