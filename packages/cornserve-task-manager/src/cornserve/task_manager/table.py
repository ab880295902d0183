"""Publishing the executor table: dispatchers route from it instead of asking `route` each time.

The table lists the ready executors (id, URL, sidecar ranks). It is published on
`cornserve.tm.<key>.table` whenever that list changes (checked every `CHECK_S`, or at once when
the manager asks, e.g. when an executor starts draining) and every `interval_s` otherwise, so a
dispatcher that missed a message, or started later, has it within one interval; a dispatcher
takes a table older than `ExecutorTable.STALE_INTERVALS` intervals for gone and asks `route`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from nats.aio.client import Client

from cornserve.bus.control import ExecutorTable, TableEntry, tm_subject

logger = logging.getLogger(__name__)

CHECK_S = 0.05
"""How often the ready set is compared with the last published one (a cheap tuple comparison)."""


class TablePublisher:
    """Publishes one task manager's table; `version` grows with each change within this process."""

    def __init__(
        self, nc: Client, task_key: str, entries: Callable[[], list[TableEntry]], interval_s: float = 1.0
    ) -> None:
        self.nc = nc
        self.task_key = task_key
        self.entries = entries
        self.interval_s = interval_s
        self.instance = uuid.uuid4().hex
        self.version = 0
        self._published: list[TableEntry] | None = None
        self._last = 0.0
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Publish now and then keep it current."""
        self._task = asyncio.create_task(self._loop(), name=f"table-{self.task_key}")

    async def stop(self) -> None:
        """Stop publishing (dispatchers fall back to `route` once the last table is stale)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def current(self) -> int:
        """The version that describes the ready set right now (bumped here if it changed)."""
        entries = self.entries()
        if entries != self._published:
            self.version += 1
            self._published = entries
            self._dirty.set()
        return self.version

    def changed(self) -> int:
        """The manager changed the ready set: publish at once; returns the new version."""
        version = self.current()
        self._dirty.set()
        return version

    async def _loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(CHECK_S):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            try:
                before = self.version
                self.current()
                if (
                    self._dirty.is_set()
                    or self.version != before
                    or time.monotonic() - self._last >= self.interval_s
                ):
                    self._dirty.clear()
                    await self._publish()
            except Exception:
                logger.exception("publishing the executor table of %s failed", self.task_key)

    async def _publish(self) -> None:
        table = ExecutorTable(
            task_key=self.task_key,
            instance=self.instance,
            version=self.version,
            executors=list(self._published or []),
            interval_s=self.interval_s,
        )
        self._last = time.monotonic()
        await self.nc.publish(tm_subject(self.task_key, "table"), table.model_dump_json().encode())
