"""Which event loop owns a client's NATS connection, and how to reach it from anywhere.

A client used from asyncio binds to the loop that first awaits it: its calls then run inline,
with no thread hop (that is the latency-critical path of executors). A client first used through
a ``*_sync`` method gets a private loop on a daemon thread instead, so engine threads without an
event loop can call it; async calls from other loops hop onto the owning loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopRunner:
    """Runs a client's coroutines on the loop that owns its connection."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _start_private(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        ready.wait()
        return loop

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the owning loop (binding to the current loop on first use)."""
        current = asyncio.get_running_loop()
        with self._lock:
            if self.loop is None or self.loop.is_closed():
                self.loop = current
        if self.loop is current:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Block the calling thread until ``coro`` finished on the owning loop."""
        with self._lock:
            if self.loop is None or self.loop.is_closed():
                self.loop = self._start_private()
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            coro.close()
            raise RuntimeError(
                "a *_sync sidecar call on the loop that owns the client would deadlock; await it"
            )
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def stop(self) -> None:
        """Stop the private loop thread, if one was started."""
        thread, loop = self._thread, self.loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._thread = None
