"""The gateway's streamed responses: a burst of items leaves in one write, every item arrives in order.

A real aiohttp server (the gateway's `StreamWriter` in a handler) and a real client; the handler
sends bursts (items without waiting in between) and single items, with pauses in between.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cornserve.gateway.streaming import FLUSH_BYTES, StreamWriter

BOUND = 30.0


class Recorder:
    """Counts the writes that reach the response (what the client reads as chunks)."""

    def __init__(self) -> None:
        self.writes = 0


async def serve(handler: Any) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/stream", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/stream"
    finally:
        await runner.cleanup()


def counting(writer: StreamWriter, recorder: Recorder) -> None:
    write = writer.response.write

    async def counted(data: bytes) -> None:
        recorder.writes += 1
        await write(data)

    writer.response.write = counted  # type: ignore[method-assign]


async def read_lines(url: str, headers: dict[str, str] | None = None) -> list[str]:
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers or {}) as response:
        assert response.status == 200
        return (await response.text()).splitlines()


@pytest.mark.parametrize("sse", [False, True])
async def test_bursts_are_written_together_and_arrive_in_order(sse: bool) -> None:
    recorder = Recorder()

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = StreamWriter(request)
        await stream.start()
        counting(stream, recorder)
        index = 0
        for burst in (1, 5, 1, 1, 3):
            for _ in range(burst):
                await stream.send({"index": index}, event="item")
                index += 1
            await asyncio.sleep(0.01)  # the sender waits: the burst is written
        return await stream.close()

    headers = {"Accept": "text/event-stream"} if sse else None
    async with asyncio.timeout(BOUND):
        async for url in serve(handler):
            lines = await read_lines(url, headers)
    if sse:
        data = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
        assert data[-1] == {}  # the end event
        data = data[:-1]
    else:
        data = [json.loads(line) for line in lines]
    assert data == [{"index": i} for i in range(11)]
    # A burst of one is one write; a longer burst two: its first item at once, the rest together.
    # (The SSE end event leaves with the end of the body, in `write_eof`.)
    assert recorder.writes == 1 + 2 + 1 + 1 + 2


async def test_a_burst_ending_the_stream_is_written_by_close() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        stream = StreamWriter(request)
        await stream.start()
        for index in range(4):
            await stream.send({"index": index})
        return await stream.close()

    async with asyncio.timeout(BOUND):
        async for url in serve(handler):
            lines = await read_lines(url)
    assert [json.loads(line) for line in lines] == [{"index": i} for i in range(4)]


async def test_a_large_burst_is_written_without_waiting_for_a_pause() -> None:
    recorder = Recorder()
    item = {"text": "x" * 1000}
    count = 3 * FLUSH_BYTES // 1000

    async def handler(request: web.Request) -> web.StreamResponse:
        stream = StreamWriter(request)
        await stream.start()
        counting(stream, recorder)
        for _ in range(count):
            await stream.send(item)
        writes_before_close = recorder.writes
        response = await stream.close()
        assert writes_before_close >= 2
        return response

    async with asyncio.timeout(BOUND):
        async for url in serve(handler):
            lines = await read_lines(url)
    assert len(lines) == count and all(json.loads(line) == item for line in lines)
