"""Writing streamed HTTP responses: NDJSON lines or server-sent events."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


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

    async def start(self) -> None:
        """Send the headers."""
        await self.response.prepare(self._request)

    async def send(self, data: Any, event: str | None = None) -> None:
        """Write one JSON item (as an NDJSON line or an SSE `data:` event)."""
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        if self.sse:
            head = f"event: {event}\n" if event else ""
            await self.response.write(f"{head}data: {text}\n\n".encode())
        else:
            await self.response.write(text.encode() + b"\n")

    async def fail(self, body: dict[str, Any]) -> None:
        """Write an error item; the stream ends after it."""
        await self.send(body, event="error")

    async def close(self) -> web.StreamResponse:
        """End the stream."""
        if self.sse:
            await self.response.write(b"event: end\ndata: {}\n\n")
        await self.response.write_eof()
        return self.response
