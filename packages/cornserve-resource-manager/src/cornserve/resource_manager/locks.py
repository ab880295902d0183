"""Per-task-key locks: operations on one key never interleave, different keys run in parallel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from cornserve.bus.micro import ServiceFault


@dataclass
class KeyLocks:
    """One asyncio lock per task key, acquired with a deadline."""

    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def lock(self, key: str) -> asyncio.Lock:
        """The lock of `key` (for a holder that outlives one block, e.g. a background re-spawn)."""
        return self._locks.setdefault(key, asyncio.Lock())

    @asynccontextmanager
    async def held(self, key: str, timeout_s: float) -> AsyncIterator[None]:
        """Hold the lock of `key`; a typed 504 `busy` if another operation keeps it past `timeout_s`."""
        lock = self.lock(key)
        try:
            async with asyncio.timeout(timeout_s):
                await lock.acquire()
        except TimeoutError:
            raise ServiceFault(
                504, "busy", f"task {key}: another operation on it did not finish within {timeout_s:.1f}s"
            ) from None
        try:
            yield
        finally:
            lock.release()
