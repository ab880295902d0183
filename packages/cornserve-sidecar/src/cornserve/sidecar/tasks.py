"""Fire-and-forget coroutines that are still owned: referenced, failures logged, cancelled on close.

A bare ``asyncio.ensure_future`` can be garbage-collected mid-flight and its exception is only
reported at interpreter exit; every background job of the sidecar (server and client) goes through
one :class:`BackgroundTasks` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any


class BackgroundTasks:
    """A set of running tasks whose failures are logged under ``what``."""

    def __init__(self, logger: logging.Logger, what: str) -> None:
        self._logger = logger
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background of the running loop."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._logger.error("%s failed", self._what, exc_info=task.exception())

    async def settle(self, timeout: float) -> None:
        """Let the running tasks finish for up to ``timeout`` seconds, then cancel what is left."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        await self.close()

    async def close(self) -> None:
        """Cancel every task still running and wait until they all ended."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
