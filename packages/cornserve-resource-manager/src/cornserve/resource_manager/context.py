"""What the resource manager's operations share: deployments, devices, locks, store and task managers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

from cornserve.resource_manager.deployment import Deployment
from cornserve.resource_manager.devices import DeviceInventory
from cornserve.resource_manager.events import Announcer
from cornserve.resource_manager.locks import KeyLocks
from cornserve.resource_manager.store import DeploymentStore
from cornserve.resource_manager.task_managers import TaskManagerControl
from cornserve.resource_manager.tasks import TaskLoader


@dataclass
class ResourceManagerContext:
    """The state of one resource manager; each operation module takes it as its first argument.

    Every change of one key's deployment happens under `locks.held(key)`.
    """

    inventory: DeviceInventory
    store: DeploymentStore
    announcer: Announcer
    task_managers: TaskManagerControl
    tasks: TaskLoader
    lock_timeout_s: float = 900.0
    """How long an operation waits for another one on the same task key."""
    recovery_timeout_s: float = 600.0
    """Re-spawning a task manager after a restart, or restoring executors after a failed scale-up."""
    locks: KeyLocks = field(default_factory=KeyLocks)
    deployments: dict[str, Deployment] = field(default_factory=dict)
    background: set[asyncio.Task[None]] = field(default_factory=set)
    """Work that outlives a request (re-spawns after a restart); cancelled on close."""

    async def discard(self, dep: Deployment) -> None:
        """Forget a deployment that never became (or no longer is) ready: free devices, kill its TM."""
        self.deployments.pop(dep.task_key, None)
        self.inventory.release(dep.task_key)
        await asyncio.shield(self.task_managers.kill(dep))

    async def persist_and_announce(self, dep: Deployment, kind: Literal["ready", "updated"]) -> None:
        """Store the deployment's record and tell every dispatcher it changed."""
        await self.store.save(dep)
        await self.announcer.changed(kind, dep.info())
