"""`cancel_on_disconnect`: a client that hangs up cancels the handler; one that stays never does.

A real aiohttp server on a loopback port and a real client connection (no mocks of the transport).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from cornserve.gateway.disconnect import cancel_on_disconnect

POLL_S = 0.02
DEADLINE_S = 10.0


class Seen:
    """What the handlers saw, for the test to wait on."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = asyncio.Event()
        self.cancelled_after_block = False


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Seen]]:
    seen = Seen()

    async def hang(request: web.Request) -> web.Response:
        try:
            async with cancel_on_disconnect(request, poll_s=POLL_S):
                seen.started.set()
                await asyncio.sleep(DEADLINE_S)
        except asyncio.CancelledError:
            seen.cancelled.set()
            raise
        return web.Response(text="late")

    async def quick(request: web.Request) -> web.Response:
        async with cancel_on_disconnect(request, poll_s=POLL_S):
            await asyncio.sleep(0)
        try:  # past the block the watcher is gone: nothing cancels this wait
            await asyncio.sleep(5 * POLL_S)
        except asyncio.CancelledError:
            seen.cancelled_after_block = True
            raise
        seen.finished.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hang", hang)
    app.router.add_post("/quick", quick)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_client_that_hangs_up_cancels_the_handler(server: tuple[str, Seen]) -> None:
    url, seen = server
    async with aiohttp.ClientSession() as http:
        request = asyncio.create_task(http.post(f"{url}/hang", data=b"{}"))
        async with asyncio.timeout(DEADLINE_S):
            await seen.started.wait()
        request.cancel()  # the client gives up: its connection closes
        await asyncio.gather(request, return_exceptions=True)
    async with asyncio.timeout(DEADLINE_S):
        await seen.cancelled.wait()


async def test_the_watch_ends_with_the_block(server: tuple[str, Seen]) -> None:
    url, seen = server
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(DEADLINE_S):
            async with http.post(f"{url}/quick", data=b"{}") as resp:
                assert resp.status == 200
                assert await resp.text() == "ok"
    assert seen.finished.is_set()
    assert not seen.cancelled_after_block
