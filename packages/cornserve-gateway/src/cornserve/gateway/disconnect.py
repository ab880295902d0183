"""Cancelling an app driver whose client hung up.

aiohttp cancels a handler on connection loss only with `handler_cancellation`, which the gateway
leaves off: cancelling a half-done app registration or release would leave state behind. App
invocations are different: nothing but the caller waits for them, and a driver nobody reads keeps
dispatchers, executors and the LLM busy. `cancel_on_disconnect` watches the connection of one
invocation and cancels the handler's task when it closes; the driver's clean-up (closing its
streams, abandoning its graphs) then cancels its graphs in the dispatchers (`dispatch_client`).

Why it polls (every `POLL_S`) instead of waiting for a connection-lost signal: aiohttp (3.14)
exposes none to a handler. Its protocol's `connection_lost` cancels the handler task only under
`handler_cancellation`, and otherwise only sets an exception on the request's body stream, which
wakes nothing once the body was read (it even clears the stream's `on_eof` callbacks); hooking
the protocol's private method would break with any aiohttp release. So a watcher looks at the
transport: one timer per invocation in flight (admission bounds them per app), firing ten times a
second for a check that costs a few attribute reads. A timer rather than a sleeping task: a task
per invocation had to be created, run once, cancelled and awaited when the invocation ended, which
put two more event-loop turns before every response (measured on the dispatch benchmark's
concurrency-1 path, docs/performance.md).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

logger = logging.getLogger(__name__)

POLL_S = 0.1
"""How often the connection is looked at (a closed one is noticed within this)."""


def client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or closing)."""
    transport = request.transport
    return transport is None or transport.is_closing()


@asynccontextmanager
async def cancel_on_disconnect(request: web.Request, poll_s: float = POLL_S) -> AsyncIterator[None]:
    """Within the block, a closed client connection cancels the current task (as handler cancellation would).

    The task ends with CancelledError, which aiohttp treats as a client that went away.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        if not client_gone(request):
            timer = loop.call_later(poll_s, check)
            return
        timer = None
        logger.info("client of %s %s went away; cancelling the app driver", request.method, request.path)
        task.cancel("the client went away")

    timer = loop.call_later(poll_s, check)
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
