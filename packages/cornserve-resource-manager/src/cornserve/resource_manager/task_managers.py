"""The resource manager's side of its task managers: spawn, wait for, assign, inspect, stop.

Requests go through the bus's typed :class:`TaskManagerClient`; this module turns their failures
into the typed faults a deploy or scale replies with, including the end of the task manager's log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nats.aio.client import Client

from cornserve.bus.control import DeviceInfo, TaskManagerStatus
from cornserve.bus.micro import BusError, NoResponders, RequestTimeout, ServiceErrorReply, ServiceFault
from cornserve.bus.tm_client import TaskManagerClient
from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.spawner import Spawner, spawn_on_node

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskManagerControl:
    """Task-manager processes (through the spawner) and requests to them (through their client)."""

    nc: Client
    nats_url: str
    spawner: Spawner
    timeouts: TaskManagerTimeouts

    def client(self, task_key: str) -> TaskManagerClient:
        """The client of the task manager of `task_key`."""
        return TaskManagerClient(self.nc, task_key)

    async def start(self, dep: Deployment, deadline: float) -> TaskManagerStatus:
        """Spawn the task manager and wait until it answers (or exits, or the deadline passes)."""
        # The node of its first executor (a backend whose executors run beside their task manager
        # has all of a deployment's executors there: `one_node_per_deployment`).
        node = dep.devices[0].node if dep.devices else "local"
        dep.handle = await spawn_on_node(self.spawner, node, dep.task_key, dep.spec, self.nats_url)
        handle = dep.handle
        tm = self.client(dep.task_key)
        start_deadline = min(deadline, time.monotonic() + self.timeouts.start_s)
        while True:
            code = handle.exit_code()
            if code is not None:
                raise _task_manager_fault(
                    dep, 502, "deploy_failed", f"exited with code {code} before answering"
                )
            remaining = start_deadline - time.monotonic()
            if remaining <= 0:
                raise _task_manager_fault(
                    dep, 504, "deploy_timeout", "did not answer within its start deadline"
                )
            try:
                return await tm.status(min(1.0, remaining))
            except NoResponders:
                await asyncio.sleep(min(0.1, max(0.0, remaining)))
            except RequestTimeout:
                continue

    async def assign(
        self, dep: Deployment, executors: Mapping[str, Sequence[DeviceInfo]], deadline: float
    ) -> TaskManagerStatus:
        """Tell the task manager its desired executor set; returns once they are all ready."""
        try:
            return await self.client(dep.task_key).assign(executors, max(0.1, deadline - time.monotonic()))
        except ServiceErrorReply as exc:
            code = 504 if exc.code == "504" else 502
            raise ServiceFault(
                code,
                "deploy_timeout" if code == 504 else "deploy_failed",
                f"task {dep.task_key}: {exc.error.message}",
            ) from None
        except NoResponders:
            raise _task_manager_fault(dep, 502, "deploy_failed", "is gone") from None
        except RequestTimeout:
            raise ServiceFault(
                504, "deploy_timeout", f"task manager of {dep.task_key} did not answer its assignment in time"
            ) from None

    async def status(self, task_key: str) -> TaskManagerStatus:
        """The task manager's current executors; the bus's typed error if it does not answer."""
        return await self.client(task_key).status(self.timeouts.status_s)

    async def stop(self, dep: Deployment) -> None:
        """Ask the task manager to stop its executors and exit; kill its process group if it is still there.

        Without NATS (a node shutting down) the request could not arrive: its process group gets
        SIGTERM at once (the task manager stops its executors on it) instead of after `shutdown_s`.
        """
        if not self.nc.is_connected:
            logger.warning("NATS is unavailable: stopping the task manager of %s by signal", dep.task_key)
        else:
            try:
                await self.client(dep.task_key).shutdown(self.timeouts.shutdown_s)
            except BusError as exc:
                logger.warning("task manager of %s did not shut down cleanly: %s", dep.task_key, exc)
        await self.kill(dep)

    async def kill(self, dep: Deployment) -> None:
        """Kill the task manager's process group, if this resource manager has a handle to it."""
        if dep.handle is not None:
            await dep.handle.kill(self.timeouts.kill_grace_s)


@dataclass(frozen=True)
class TaskManagerTimeouts:
    """How long the resource manager waits for a task manager."""

    start_s: float = 60.0
    """From spawning it to its first answer."""
    status_s: float = 2.0
    """One status request."""
    shutdown_s: float = 15.0
    """Its clean shutdown, before its process group is killed."""
    kill_grace_s: float = 5.0
    """SIGTERM to SIGKILL of its process group."""


def _task_manager_fault(dep: Deployment, code: int, error: str, what: str) -> ServiceFault:
    """A fault about a task manager that is not serving, with the end of its log (the likely cause)."""
    tail = dep.handle.log_tail() if dep.handle is not None else ""
    return ServiceFault(code, error, f"task manager of {dep.task_key} {what}; its log ends with:\n{tail}")
