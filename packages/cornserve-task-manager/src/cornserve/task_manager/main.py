"""`python -m cornserve.task_manager.main`: the process that runs one deployed unit task's executors.

The resource manager spawns it with the task's key and serialized form; it loads uploaded task
libraries first (the task's class may come from one), rebuilds the task, checks that the key
matches, and serves until told to shut down (request or SIGTERM/SIGINT), stopping its executors.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, ClassVar

from nats.aio.client import Client
from pydantic import AfterValidator, Field

from cornserve.bus.control import TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync
from cornserve.runtime.metrics import current_metrics_url
from cornserve.runtime.service import run_service, stop_callback
from cornserve.runtime.settings import CommaSeparated, ProcessInfo, ServiceSettings
from cornserve.task import TaskError, UnitTask, deserialize_task
from cornserve.task.errors import TaskRegistryError
from cornserve.task.executor_flags import check_allowed_names, check_executor_flags
from cornserve.task.library import load_task_library
from cornserve.task_manager.containers import ExecutorContainers
from cornserve.task_manager.manager import TaskManager
from cornserve.task_manager.metrics import watch_manager
from cornserve.task_manager.service import TaskManagerService

logger = logging.getLogger("cornserve.task_manager")


class TaskLoadError(RuntimeError):
    """The task given on the command line cannot be rebuilt here (unknown class, bad config, wrong key)."""


class TaskManagerSettings(ServiceSettings):
    """Flags and ``CORNSERVE_*`` environment of a task manager (the resource manager's spawner writes them)."""

    process: ClassVar[ProcessInfo] = ProcessInfo(
        "task-manager", "cornserve-task-manager", "Cornserve task manager"
    )

    task_key: str = Field(min_length=1)
    """Deployment key of the unit task."""
    task_json: str
    """The task as serialize_task JSON."""
    log_dir: Path | None = None
    """Directory for executor logs (default: a new temp dir)."""
    health_interval: float = Field(default=1.0, gt=0)
    """Seconds between executor health checks."""
    stop_grace: float = Field(default=5.0, gt=0)
    """Seconds between SIGTERM and SIGKILL when stopping an executor."""
    executor_host: str = Field(default="127.0.0.1", min_length=1)
    """Address executors listen on and are routed to: loopback on one machine, the node's routable address across machines."""
    executor_containers: Path | None = None
    """JSON file (written by the docker spawner): run executors as containers on their devices' nodes."""
    executor_nats_creds: Path | None = None
    """NATS credentials file of the executor role, handed to executors (none: they get no credentials)."""
    allow_executor_flags: Annotated[CommaSeparated, AfterValidator(check_allowed_names)] = Field(
        default_factory=list
    )
    """Executor flags that widen exposure a task config may pass anyway (inherited from the cluster's environment)."""

    @property
    def nats_client_name(self) -> str:
        """One NATS client name per deployed task."""
        return f"cornserve-tm-{self.task_key}"


def _load_record(record: TaskLibraryRecord) -> None:
    loaded = load_task_library(record.name, record.source)
    logger.info("task library %s (%s) loaded: %s", record.name, record.sha256[:12], loaded.unit_tasks)


async def load_task(
    sync: TaskLibrarySync, task_json: str, task_key: str, allowed_flags: Collection[str] = ()
) -> UnitTask[Any, Any]:
    """Rebuild the task (refreshing task libraries once if its class is unknown) and check its key.

    The task's config must also pass the executor-flag policy: the gateway checks it too, but the
    task manager is where the command line is built, so a task that reached the bus some other way
    is refused here before any executor starts.
    """
    try:
        spec = json.loads(task_json)
    except ValueError as exc:
        raise TaskLoadError(f"--task-json is not JSON: {exc}") from exc
    try:
        try:
            task = deserialize_task(spec)
        except TaskRegistryError:
            await sync.refresh()
            task = deserialize_task(spec)
    except TaskError as exc:
        raise TaskLoadError(f"cannot rebuild task {task_key}: {exc}") from exc
    if task.deployment_key != task_key:
        raise TaskLoadError(
            f"--task-key {task_key} does not match the task's deployment key {task.deployment_key}"
        )
    try:
        check_executor_flags(task, allowed_flags)
    except TaskError as exc:
        raise TaskLoadError(f"refusing task {task_key}: {exc}") from exc
    return task


@asynccontextmanager
async def serve(settings: TaskManagerSettings, nc: Client) -> AsyncIterator[None]:
    """Load the task, start its executors and serve; leaving the context stops them."""
    log_dir = settings.log_dir or Path(tempfile.mkdtemp(prefix="cornserve-tm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    sync = TaskLibrarySync(nc, _load_record)
    try:
        await sync.start()
        task = await load_task(sync, settings.task_json, settings.task_key, settings.allow_executor_flags)
        manager = TaskManager(
            settings.task_key,
            task,
            settings.nats_url,
            log_dir,
            health_interval_s=settings.health_interval,
            stop_grace_s=settings.stop_grace,
            executor_nats_creds=settings.executor_nats_creds,
            executor_host=settings.executor_host,
            executor_containers=(
                None
                if settings.executor_containers is None
                else ExecutorContainers.load(settings.executor_containers)
            ),
            metrics_url=current_metrics_url(),
        )
        await manager.start()
        watch_manager(manager)
        service = TaskManagerService(nc, manager, on_shutdown=stop_callback())
        try:
            await service.start()
            logger.info("task manager for %s (%s) serving", settings.task_key, task.display_name())
            yield
        finally:
            await service.stop()
            await manager.close()
    finally:
        await sync.stop()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `cornserve-task-manager` and `python -m cornserve.task_manager.main`."""
    sys.exit(run_service(TaskManagerSettings, serve, argv=argv, expected_errors=(TaskLoadError,)))


if __name__ == "__main__":
    main()
