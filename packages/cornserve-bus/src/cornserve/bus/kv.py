"""JetStream key-value helpers: durable control state that survives service restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue
from pydantic import BaseModel

from cornserve.bus.control import KV_TASKLIBS, TaskLibraryRecord

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


async def open_bucket(nc: Client, bucket: str) -> KeyValue:
    """Open a KV bucket, creating it on first use (file storage, one value per key)."""
    js = nc.jetstream()
    try:
        return await js.key_value(bucket)
    except BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=1)


def kv_key(name: str) -> str:
    """A KV-safe key for a user-chosen name (KV keys allow [-/_=.a-zA-Z0-9])."""
    return "".join(c if c.isalnum() or c in "-_" else f"={ord(c):x}" for c in name)


async def kv_get(kv: KeyValue, key: str, model: type[M]) -> M | None:
    """One record, or None if absent (or deleted)."""
    try:
        entry = await kv.get(kv_key(key))
    except KeyNotFoundError:
        return None
    if entry.value is None or not entry.value:
        return None
    return model.model_validate_json(entry.value)


async def kv_put(kv: KeyValue, key: str, record: BaseModel) -> None:
    """Store one record."""
    await kv.put(kv_key(key), record.model_dump_json().encode())


async def kv_delete(kv: KeyValue, key: str) -> None:
    """Delete one record (absent is fine)."""
    with contextlib.suppress(KeyNotFoundError):
        await kv.delete(kv_key(key))


async def kv_all(
    kv: KeyValue, model: type[M], *, attempt_timeout_s: float = 10.0, attempts: int = 3
) -> list[M]:
    """Every record in a bucket, retrying a listing that stalls or fails (bounded).

    nats-py's key listing waits for an "initial values done" marker without a deadline; on a loaded
    server that marker can be lost, so each attempt gets its own deadline (and its own watcher).
    """
    for attempt in range(1, attempts + 1):
        try:
            async with asyncio.timeout(attempt_timeout_s):
                return await _list_records(kv, model)
        except (TimeoutError, nats.errors.Error) as exc:
            if attempt == attempts:
                raise
            logger.warning(
                "listing %s records failed (attempt %d of %d): %s; retrying",
                model.__name__,
                attempt,
                attempts,
                type(exc).__name__,
            )
            await asyncio.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


async def _list_records(kv: KeyValue, model: type[M]) -> list[M]:
    try:
        keys = await kv.keys()
    except NoKeysError:
        return []
    records = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            records.append(model.model_validate_json(entry.value))
    return records


class TaskLibrarySync:
    """Keeps a process's loaded task libraries in step with the KV bucket.

    `start()` loads every stored library, then a watcher loads new versions as they are uploaded.
    `load` is the process's loader (cornserve.task.library.load_task_library); a library that
    fails to load is logged and skipped, never fatal to the service.
    """

    def __init__(self, nc: Client, load: Callable[[TaskLibraryRecord], Awaitable[None] | None]) -> None:
        self._nc = nc
        self._load = load
        self._task: asyncio.Task[None] | None = None

    async def _apply(self, record: TaskLibraryRecord) -> None:
        try:
            result = self._load(record)
            if result is not None:
                await result
        except Exception:
            logger.exception("task library %r (sha256 %s) failed to load", record.name, record.sha256[:12])

    async def start(self) -> None:
        """Load what is stored now, then follow updates in the background."""
        kv = await open_bucket(self._nc, KV_TASKLIBS)
        for record in await kv_all(kv, TaskLibraryRecord):
            await self._apply(record)
        watcher = await kv.watchall(include_history=False, ignore_deletes=True)
        self._task = asyncio.create_task(self._follow(watcher))

    async def refresh(self) -> None:
        """Load every stored library now (e.g. before deserializing a task of an unknown class)."""
        kv = await open_bucket(self._nc, KV_TASKLIBS)
        for record in await kv_all(kv, TaskLibraryRecord):
            await self._apply(record)

    async def _follow(self, watcher: object) -> None:
        async for entry in watcher:  # type: ignore[attr-defined]
            if entry is None or not entry.value:
                continue
            await self._apply(TaskLibraryRecord.model_validate_json(entry.value))

    async def stop(self) -> None:
        """Stop following updates."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
