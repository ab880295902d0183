"""Unit tasks from their wire specs, with the task libraries the gateway stored loaded on demand."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client

from cornserve.bus.control import TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync
from cornserve.bus.micro import ServiceFault
from cornserve.task import TaskRegistryError, UnitTask, deserialize_task
from cornserve.task.library import load_task_library

logger = logging.getLogger(__name__)


def _load_record(record: TaskLibraryRecord) -> None:
    loaded = load_task_library(record.name, record.source)
    logger.info("task library %s (%s) loaded: %s", record.name, record.sha256[:12], loaded.unit_tasks)


class TaskLoader:
    """Rebuilds unit tasks; a class no loaded library defines triggers one refresh of the libraries."""

    def __init__(self, nc: Client) -> None:
        self._libraries = TaskLibrarySync(nc, _load_record)

    async def start(self) -> None:
        """Load every stored task library and follow new ones."""
        await self._libraries.start()

    async def stop(self) -> None:
        """Stop following task libraries."""
        await self._libraries.stop()

    async def load(self, spec: Any) -> UnitTask[Any, Any]:
        """The unit task of `spec`; a typed 400 `bad_task` if it cannot be rebuilt."""
        try:
            try:
                return deserialize_task(spec)
            except TaskRegistryError:
                await self._libraries.refresh()
                return deserialize_task(spec)
        except Exception as exc:
            raise ServiceFault(400, "bad_task", f"{type(exc).__name__}: {exc}") from exc


def devices_per_executor(task: UnitTask[Any, Any]) -> int:
    """How many devices one executor of `task` needs, by its descriptor; a typed 400 if it cannot say."""
    try:
        n = int(task.descriptor.num_devices(task))
    except Exception as exc:
        raise ServiceFault(
            400, "bad_task", f"{type(task.descriptor).__name__}.num_devices failed: {exc}"
        ) from exc
    if n < 1:
        raise ServiceFault(400, "bad_task", f"{type(task.descriptor).__name__}.num_devices returned {n}")
    return n
