"""`python -m cornserve.task_manager.main`: the process that runs one deployed unit task's executors.

The resource manager spawns it with the task's key and serialized form; it loads uploaded task
libraries first (the task's class may come from one), rebuilds the task, checks that the key
matches, and serves until told to shut down (request or SIGTERM/SIGINT), stopping its executors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats

from cornserve.bus.control import TaskLibraryRecord
from cornserve.bus.kv import TaskLibrarySync
from cornserve.runtime.nats_url import nats_url_from_env
from cornserve.task import TaskRegistryError, UnitTask, deserialize_task
from cornserve.task.library import load_task_library
from cornserve.task_manager.manager import TaskManager
from cornserve.task_manager.service import TaskManagerService

logger = logging.getLogger("cornserve.task_manager")

EXIT_BAD_TASK = 2


class TaskLoadError(RuntimeError):
    """The task given on the command line cannot be rebuilt here (unknown class, bad config, wrong key)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the task manager."""
    p = argparse.ArgumentParser(prog="cornserve-task-manager", description="Cornserve task manager")
    p.add_argument("--task-key", required=True, help="deployment key of the unit task")
    p.add_argument("--task-json", required=True, help="the task as serialize_task JSON")
    p.add_argument("--nats-url", default=None, help="NATS URL (default: $CORNSERVE_NATS_URL)")
    p.add_argument("--log-dir", default=None, help="directory for executor logs (default: a temp dir)")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between health checks")
    p.add_argument("--stop-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def _load_record(record: TaskLibraryRecord) -> None:
    loaded = load_task_library(record.name, record.source)
    logger.info("task library %s (%s) loaded: %s", record.name, record.sha256[:12], loaded.unit_tasks)


async def load_task(sync: TaskLibrarySync, task_json: str, task_key: str) -> UnitTask[Any, Any]:
    """Rebuild the task (refreshing task libraries once if its class is unknown) and check its key."""
    try:
        spec = json.loads(task_json)
    except ValueError as exc:
        raise TaskLoadError(f"--task-json is not JSON: {exc}") from exc
    try:
        task = deserialize_task(spec)
    except TaskRegistryError:
        await sync.refresh()
        task = deserialize_task(spec)
    if task.deployment_key != task_key:
        raise TaskLoadError(
            f"--task-key {task_key} does not match the task's deployment key {task.deployment_key}"
        )
    return task


async def run(args: argparse.Namespace) -> int:
    """Serve until shutdown; returns the exit code."""
    nats_url = args.nats_url or nats_url_from_env()
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="cornserve-tm-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(
        nats_url, name=f"cornserve-tm-{args.task_key}", max_reconnect_attempts=-1, reconnect_time_wait=0.5
    )
    sync = TaskLibrarySync(nc, _load_record)
    try:
        await sync.start()
        try:
            task = await load_task(sync, args.task_json, args.task_key)
        except Exception as exc:
            logger.error("cannot load task %s: %s: %s", args.task_key, type(exc).__name__, exc)
            return EXIT_BAD_TASK
        manager = TaskManager(
            args.task_key,
            task,
            nats_url,
            log_dir,
            health_interval_s=args.health_interval,
            stop_grace_s=args.stop_grace,
        )
        await manager.start()
        service = TaskManagerService(nc, manager, on_shutdown=stop.set)
        try:
            await service.start()
            logger.info("task manager for %s (%s) serving", args.task_key, task.display_name())
            await stop.wait()
            logger.info("task manager for %s shutting down", args.task_key)
        finally:
            await service.stop()
            await manager.close()
    finally:
        await sync.stop()
        await nc.drain()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of `cornserve-task-manager` and `python -m cornserve.task_manager.main`."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
